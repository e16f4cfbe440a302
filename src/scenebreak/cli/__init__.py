"""The command line: each Click command parses, builds a config, calls one library
function and prints the result (`commands`), and `console` draws the progress on
stderr. The only place that knows Click or rich; nothing imports this package.
May import: every package below it."""
