"""The `.scene` file: its format, read as untrusted input (`bundle`), and the cached
scenes as list, show and rm see them (`catalog`).
May import: families and the ground modules."""
