"""`export` against a hostile or busy file system, and scenes that name their handles
awkwardly: the target folder is only ever created or (with --force) an earlier export
replaced; what appears there while an export runs is left alone, and so is anything
the export did not make. Bad targets are one line and exit 2."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file
from helpers import craft

from scenebreak.cli.commands import cli
from scenebreak.errors import InvalidInput, NoSpace
from scenebreak.exports.export import MARKER, export


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() and not p.is_symlink() else os.readlink(p)
                                       if p.is_symlink() else None) for p in sorted(root.rglob("*"))}


def one_error(result, code: int, phrase: str) -> None:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and phrase in lines[0], result.stderr


def export_cli(*args):
    return CliRunner().invoke(cli, ["export", *map(str, args)])


@pytest.fixture
def during_write(monkeypatch):
    """`during_write(action)`: run `action(tmp)` inside the export, once its files are
    written to the temporary folder `tmp` and before it is moved into place."""
    import scenebreak.exports.export as export_module

    def install(action):
        original = export_module._write_embeddings
        depth = []

        def write(scene, folder):
            original(scene, folder)
            if not depth:  # an export the action runs itself is left as it is
                depth.append(folder)
                try:
                    action(folder)
                finally:
                    depth.pop()

        monkeypatch.setattr(export_module, "_write_embeddings", write)

    return install


# -- the target changes while the export runs --------------------------------------------------------

def test_a_folder_made_at_the_target_meanwhile_is_left_alone(learned, tmp_path, during_write):
    target = tmp_path / "out" / "emb"

    def someone_else(_tmp):
        target.mkdir(parents=True)
        (target / "mine.txt").write_text("not yours")

    during_write(someone_else)
    one_error(export_cli(learned.path, "-f", "embeddings", "-o", target), 2, "appeared while exporting")
    assert snapshot(tmp_path / "out") == {"emb": None, "emb/mine.txt": b"not yours"}  # and no temporary folder


def test_two_exports_at_once_to_one_new_folder(learned, tmp_path, during_write):
    """The other export finishes first: without --force the later one fails and leaves
    it whole; with --force it replaces it (an earlier export), and nothing is left over."""
    target = tmp_path / "out" / "emb"

    def other_export(_tmp):
        export(learned.path, target, "embeddings")
        (target / "stale.txt").write_text("from the other export")

    during_write(other_export)
    one_error(export_cli(learned.path, "-f", "embeddings", "-o", target), 2, "appeared while exporting")
    files = {"emb", f"emb/{MARKER}", "emb/asset1.safetensors", "emb/asset2.safetensors"}
    assert set(snapshot(tmp_path / "out")) == files | {"emb/stale.txt"}

    shutil.rmtree(target)
    result = export_cli(learned.path, "-f", "embeddings", "-o", target, "--force")
    assert result.exit_code == 0, result.output
    assert set(snapshot(tmp_path / "out")) == files


def test_force_never_replaces_what_is_not_an_export_even_if_it_appears_meanwhile(learned, tmp_path, during_write):
    target = tmp_path / "out" / "emb"
    export(learned.path, target, "embeddings")

    def swap(_tmp):
        (target / MARKER).unlink()  # no longer an earlier export
        (target / "mine.txt").write_text("not yours")

    during_write(swap)
    one_error(export_cli(learned.path, "-f", "embeddings", "-o", target, "--force"), 2, "--force")
    after = snapshot(tmp_path / "out")
    assert after["emb/mine.txt"] == b"not yours" and set(after) == {"emb", "emb/mine.txt", "emb/asset1.safetensors",
                                                                    "emb/asset2.safetensors"}


def test_an_earlier_export_goes_back_if_the_new_one_cannot_take_its_place(learned, tmp_path, monkeypatch):
    import scenebreak.exports.export as export_module

    target = tmp_path / "out" / "emb"
    export(learned.path, target, "embeddings")
    (target / "note.txt").write_text("earlier")
    before = snapshot(tmp_path / "out")
    rename = os.rename

    def refuse_the_new_one(source, destination):
        if str(source).endswith(".sbx-tmp") and not Path(destination).exists():  # moved aside: now in its place
            raise PermissionError(13, "Permission denied", str(destination))
        rename(source, destination)

    monkeypatch.setattr(export_module.os, "rename", refuse_the_new_one)
    result = export_cli(learned.path, "-f", "embeddings", "-o", target, "--force")
    assert result.exit_code == 1 and "Permission denied" in result.stderr
    assert snapshot(tmp_path / "out") == before


def test_a_failed_export_leaves_nothing_behind(learned, tmp_path, during_write):
    def crash(_tmp):
        raise RuntimeError("the disk went away")

    during_write(crash)
    result = export_cli(learned.path, "-f", "embeddings", "-o", tmp_path / "out" / "emb")
    assert result.exit_code == 1 and "the disk went away" in result.stderr
    assert snapshot(tmp_path / "out") == {}


def test_a_dead_exports_temporary_folders_are_removed_by_the_next_one(learned, tmp_path, during_write):
    """Named after their host and process, a killed export's temporary folders are
    deleted by the next export to the same target; a live process's, another host's
    and anything else are not."""
    out = tmp_path / "out"
    seen = []
    during_write(lambda tmp: seen.append(tmp.name))
    export(learned.path, out / "first", "embeddings")
    name, host_pid, kind = seen[0].rsplit(".", 2)
    host = host_pid.split("-")[0]
    assert name == ".first" and kind == "sbx-tmp" and host_pid.split("-")[1] == str(os.getpid())
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = [out / f".emb.{host}-{dead_pid}-0a1b.sbx-tmp", out / f".emb.{host}-{dead_pid}-c2d3.sbx-old"]
    kept = [out / f".emb.{host}-{os.getppid()}-0a1b.sbx-tmp",  # a live process
            out / f".emb.{'f' * 8 if host != 'f' * 8 else '0' * 8}-{dead_pid}-0a1b.sbx-tmp",  # another host's
            out / f".other.{host}-{dead_pid}-0a1b.sbx-tmp",  # another target's
            out / ".emb.notes"]
    export(learned.path, out / "emb", "embeddings")  # (an export there: the one aside is the dead run's leftover)
    for folder in stale + kept:
        folder.mkdir()
        (folder / "file").write_text("x")
    (out / f".emb.{host}-{dead_pid}-9999.sbx-tmp").symlink_to(out / ".emb.notes")  # a link is never followed
    export(learned.path, out / "emb", "embeddings", force=True)
    assert not any(folder.exists() for folder in stale)
    assert all((folder / "file").read_text() == "x" for folder in kept)
    assert (out / f".emb.{host}-{dead_pid}-9999.sbx-tmp").is_symlink()


def test_an_export_killed_after_moving_the_earlier_one_aside_gets_it_back(learned, tmp_path, during_write):
    """`export --force` killed between moving the earlier export aside and putting the
    new one in place left neither at -o; the next export deleted the one aside before
    writing, and if that export failed too (a full disk), the earlier one was lost."""
    from scenebreak.paths import HOST_TAG

    out = tmp_path / "emb"
    export(learned.path, out, "embeddings")
    before = snapshot(out)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    os.rename(out, tmp_path / f".emb.{HOST_TAG}-{int(dead.stdout)}-c2d3.sbx-old")  # where the killed run left it

    def full(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    during_write(full)
    with pytest.raises(NoSpace):
        export(learned.path, out, "embeddings", force=True)
    assert snapshot(out) == before and [p.name for p in tmp_path.iterdir()] == ["emb"]  # back, and nothing else


# -- bad targets ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("below", ["sub", "a/b/c"])
def test_a_target_below_a_file_is_one_line(learned, tmp_path, below):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    before = snapshot(tmp_path)
    one_error(export_cli(learned.path, "-f", "embeddings", "-o", notes / below), 2, "notes.txt is a file")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_a_symbolic_link_at_the_target_is_one_line(learned, tmp_path, force):
    empty, exported = tmp_path / "empty", tmp_path / "exported"
    empty.mkdir()
    export(learned.path, exported, "embeddings")
    for name, to in (("to-empty", empty), ("to-export", exported), ("dangling", tmp_path / "nowhere")):
        (tmp_path / name).symlink_to(to)
    before = snapshot(tmp_path)
    for name in ("to-empty", "to-export", "dangling"):
        one_error(export_cli(learned.path, "-f", "embeddings", "-o", tmp_path / name, *force), 2, "is a symbolic link")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("target", ["readonly/out", "readonly/new/out"])
def test_a_target_in_a_folder_that_cannot_be_written_is_one_line_before_loading(learned, tmp_path, monkeypatch, target):
    """Was a Permission-denied line naming the temporary folder, after the a1111 export
    had loaded the base model and extracted its LoRA."""
    import scenebreak.exports.a1111
    import scenebreak.exports.export

    real = scenebreak.exports.export.is_writable_folder
    # (tests may run as root, who can write anywhere: the check is stood in for)
    monkeypatch.setattr(scenebreak.exports.export, "is_writable_folder",
                        lambda folder: "readonly" not in str(folder) and real(folder))
    monkeypatch.setattr(scenebreak.exports.a1111, "prepare", lambda *a, **k: pytest.fail("the base model was loaded"))
    (tmp_path / "readonly").mkdir()
    before = snapshot(tmp_path)
    for format in ("embeddings", "a1111"):
        one_error(export_cli(learned.path, "-f", format, "-o", tmp_path / target), 2, "not a folder you can write to")
    assert snapshot(tmp_path) == before


# -- handles that differ only in letter case -----------------------------------------------------------

def test_handles_that_differ_only_in_case_are_a_damaged_scene(learned, tmp_path):
    """CLIP's tokenizer lowercases: `<Cat>` and `<cat>` are one token in a prompt, so
    such a scene cannot name its objects apart (learn never makes one). Its exports
    once got triggers apart by case; the scene is now refused in one line."""
    def same_but_case(meta):
        meta["handles"][0]["token"], meta["handles"][1]["token"] = "<Cat>", "<cat>"

    scene_path = craft(learned.path, tmp_path / "photo.scene", same_but_case)
    result = export_cli(scene_path, "-f", "a1111", "-o", tmp_path / "a1111", "--rank", "2")
    assert result.exit_code == 2 and "two handles differ only in letter case" in result.stderr, result.output
    assert not (tmp_path / "a1111").exists()


def test_distinct_names():
    from scenebreak.exports.a1111 import MAX_STEM, distinct_names

    assert distinct_names(["a", "b"]) == ["a", "b"]
    assert distinct_names(["x-Cat", "x-cat", "x-cat-2", "x-CAT"]) == ["x-Cat", "x-cat-3", "x-cat-2", "x-CAT-4"]
    long = "n" * MAX_STEM
    names = distinct_names([long, long.upper()])
    assert names[0] == long and len(names[1]) == MAX_STEM and names[1].endswith("-2")


def test_an_export_into_an_empty_folder_works_where_rename_refuses_any_folder(learned, tmp_path, monkeypatch):
    """Windows renames onto no folder, not even an empty one (FileExistsError): an export
    into an existing empty folder, which is allowed, failed there after all the writing
    as a folder that "appeared while exporting"."""
    import errno

    import scenebreak.exports.export as export_module

    real_rename = os.rename

    def windows_rename(src, dst):
        if Path(dst).is_dir():
            raise FileExistsError(errno.EEXIST, "Cannot create a file when that file already exists", str(dst))
        return real_rename(src, dst)

    monkeypatch.setattr(export_module.os, "rename", windows_rename)
    out = tmp_path / "empty"
    out.mkdir()
    export(learned.path, out, "embeddings")
    assert any(out.iterdir())
    # A folder with something in it is still never replaced (without --force, an export's only).
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(InvalidInput, match="exists|not empty|appeared"):
        export(learned.path, tmp_path / "mine", "embeddings")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]



def test_an_export_is_on_the_disk_before_it_takes_its_place_and_the_old_one_goes(learned, tmp_path, monkeypatch):
    """Renamed in unsynced, then the earlier export deleted: after a power cut the new
    folder could hold empty weight files, and the old one was gone."""
    import scenebreak.exports.export as export_module
    import scenebreak.paths as paths

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("names open files through /proc (Linux)")
    target = tmp_path / "emb"
    assert export_cli(learned.path, "-f", "embeddings", "-o", target).exit_code == 0
    events = []
    real_fsync, real_rename, real_rmtree = os.fsync, os.rename, shutil.rmtree
    monkeypatch.setattr(paths.os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(export_module.os, "rename", lambda a, b: events.append(("rename", str(b))) or real_rename(a, b))
    monkeypatch.setattr(export_module.shutil, "rmtree", lambda p, **k: events.append(("rmtree", str(p)))
                        or real_rmtree(p, **k))
    assert export_cli(learned.path, "-f", "embeddings", "-o", target, "--force").exit_code == 0
    placed = events.index(("rename", str(target)))
    assert any(kind == "fsync" and where.endswith(".safetensors") for kind, where in events[:placed]), events
    synced_parent = events.index(("fsync", str(tmp_path)), placed)
    removed_old = next(i for i, (kind, where) in enumerate(events) if kind == "rmtree" and "sbx-old" in where)
    assert placed < synced_parent < removed_old, events


def test_an_older_scenes_handle_named_as_a_windows_device_exports_under_another_file_name(learned, tmp_path):
    """COM1.safetensors opens the serial port on Windows (and nul.x the null device): a
    handle from before names had to be portable gets a file name that is a file."""
    def devices(meta):
        meta["handles"][0]["token"], meta["handles"][1]["token"] = "<COM1>", "<nul.v2>"

    scene_path = craft(learned.path, tmp_path / "old.scene", devices)
    result = export_cli(scene_path, "-f", "embeddings", "-o", tmp_path / "emb")
    assert result.exit_code == 0, result.output
    assert [Path(line).name for line in result.stdout.splitlines()] == ["COM1-handle.safetensors",
                                                                        "nul-handle.v2.safetensors"]
    assert set(load_file(tmp_path / "emb" / "COM1-handle.safetensors")) == {"<COM1>"}
