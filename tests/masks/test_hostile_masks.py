"""`mask` (and the names and crops made from a photo) against hostile or odd surroundings:
files of the user's beside the masks, a symlinked --out-dir, folders named like an
output, photo names near the file-name limit, very long photos, too many masks. Each
case either works or is refused with exit 2 and one line, and nothing outside the
command's own files is written, replaced or deleted."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from scenebreak import load_scene
from scenebreak.config import MAX_LEARNED_HANDLES as MOST
from scenebreak.cli.commands import cli

NAME_ROOM = 255 - 32  # a file name plus write_atomically's temp prefix and suffix fit in 255 bytes


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture
def segmenter(tiny_segmentation):
    return ["--segmenter", tiny_segmentation[1]]


def error_lines(result):
    return [line for line in result.stderr.splitlines() if line.startswith("Error")]


def snapshot(*roots: Path) -> dict:
    """Every entry under the roots (links not followed): its kind, size, time and, for a
    link, where it points."""
    entries = {}
    for root in roots:
        for path in [root, *root.rglob("*")]:
            stat = path.lstat()
            target = os.readlink(path) if path.is_symlink() else None
            entries[str(path)] = (stat.st_mode, stat.st_size, stat.st_mtime_ns, target)
    return entries


def user_file(path: Path, grey: int = 7) -> Path:
    """A file of the user's with a name scenebreak could use: an image, so that nothing
    but its being the user's own tells it apart."""
    Image.new("L", (96, 80), grey).save(path)
    return path


# -- deleting only what scenebreak wrote ----------------------------------------------------------

def test_a_users_own_mask_file_is_never_deleted(scene_files, segmenter, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    mine = user_file(out / "photo.mask4.png")
    before = mine.read_bytes()
    result = run("mask", scene_files["image"], "--box", "12,8,44,40", "--box", "52,42,84,74", "--out-dir", out, *segmenter)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [str(out / "photo.mask1.png"), str(out / "photo.mask2.png")]
    assert mine.read_bytes() == before


def test_stale_masks_of_an_earlier_run_go_but_not_ones_the_user_replaced(scene_files, segmenter, tmp_path):
    out = tmp_path / "out"
    boxes = ["--box", "12,8,44,40", "--box", "52,42,84,74", "--box", "0,0,30,30"]
    first = run("mask", scene_files["image"], *boxes, "--out-dir", out, *segmenter)
    assert first.exit_code == 0, first.output
    user_file(out / "photo.mask3.png")  # edited by hand since: the user's now
    edited = (out / "photo.mask3.png").read_bytes()
    again = run("mask", scene_files["image"], "--box", "12,8,44,40", "--out-dir", out, *segmenter)
    assert again.exit_code == 0, again.output
    assert not (out / "photo.mask2.png").exists()  # scenebreak's own, unchanged: removed
    assert (out / "photo.mask3.png").read_bytes() == edited


def test_a_symlinked_out_dir_keeps_the_users_files_in_its_target(scene_files, segmenter, tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    mine = [user_file(target / f"photo.mask{i}.png", i) for i in (2, 3, 4)]
    (tmp_path / "link").symlink_to(target, target_is_directory=True)
    before = snapshot(*mine)
    result = run("mask", scene_files["image"], "--box", "12,8,44,40", "--out-dir", tmp_path / "link", *segmenter)
    assert result.exit_code == 0, result.output
    assert snapshot(*mine) == before
    assert (target / "photo.mask1.png").exists()


def test_deleting_never_follows_a_symlink(scene_files, segmenter, tmp_path):
    """A mask of an earlier run, moved away by the user and linked back: neither the
    link nor the file it points to is scenebreak's to delete."""
    out, kept = tmp_path / "out", tmp_path / "kept"
    first = run("mask", scene_files["image"], "--box", "12,8,44,40", "--box", "52,42,84,74", "--out-dir", out, *segmenter)
    assert first.exit_code == 0, first.output
    kept.mkdir()
    (out / "photo.mask2.png").rename(kept / "mask2.png")
    (out / "photo.mask2.png").symlink_to(kept / "mask2.png")
    before = snapshot(kept, out / "photo.mask2.png")
    again = run("mask", scene_files["image"], "--box", "12,8,44,40", "--out-dir", out, *segmenter)
    assert again.exit_code == 0, again.output
    assert snapshot(kept, out / "photo.mask2.png") == before


def test_a_crafted_record_cannot_make_mask_delete_anything_else(scene_files, segmenter, tmp_path):
    """The record of what mask wrote is untrusted: names that are not this photo's
    masks in this folder are ignored, however right their sizes and hashes."""
    out = tmp_path / "out"
    out.mkdir()
    victims = [user_file(out / "notes.png"), user_file(out / "other.mask2.png"), user_file(tmp_path / "photo.mask2.png")]
    prints = [[[v.stat().st_size, hashlib.sha256(v.read_bytes()).hexdigest()]] for v in victims]
    names = ["notes.png", "other.mask2.png", "../photo.mask2.png", str(victims[2])]  # the last one absolute
    record = {"format": "scenebreak.masks", "version": 1, "masks": dict(zip(names, prints + prints[2:]))}
    (out / ".photo.masks.json").write_text(json.dumps(record))
    before = snapshot(*victims)
    result = run("mask", scene_files["image"], "--box", "12,8,44,40", "--out-dir", out, *segmenter)
    assert result.exit_code == 0, result.output
    assert snapshot(*victims) == before


# -- outputs that cannot be written ---------------------------------------------------------------

@pytest.mark.parametrize("blocked", ["photo.mask2.png", "photo.masks-preview.png"])
def test_a_folder_named_like_an_output_is_refused_before_writing(scene_files, segmenter, tmp_path, blocked):
    out = tmp_path / "out"
    (out / blocked).mkdir(parents=True)
    (out / blocked / "keep.txt").write_text("keep")
    before = snapshot(out, scene_files["image"].parent)
    result = run("mask", scene_files["image"], "--box", "12,8,44,40", "--box", "52,42,84,74", "--out-dir", out, *segmenter)
    assert result.exit_code == 2, result.output
    assert len(error_lines(result)) == 1 and blocked in error_lines(result)[0] and "folder" in error_lines(result)[0]
    assert result.stdout == "" and "Traceback" not in result.output
    assert snapshot(out, scene_files["image"].parent) == before  # nothing half-written


def test_a_folder_in_the_way_is_found_before_any_model_loads(scene_files, segmenter, tmp_path):
    (scene_files["image"].parent / "photo.mask1.png").mkdir()
    result = run("mask", scene_files["image"], "--point", "20,20", *segmenter)
    assert result.exit_code == 2 and len(error_lines(result)) == 1 and "photo.mask1.png" in error_lines(result)[0]
    assert "loading" not in result.stderr


# -- names near the file-name limit ---------------------------------------------------------------

def _named(scene_files, folder: Path, stem: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    photo = folder / f"{stem}.png"
    photo.write_bytes(scene_files["image"].read_bytes())
    return photo


@pytest.mark.parametrize("stem", ["p" * 231, "é" * 117])  # 235 and 238 bytes with ".png"
def test_a_photo_with_a_name_near_the_limit_gets_short_distinct_names(scene_files, segmenter, tmp_path, stem):
    photo = _named(scene_files, tmp_path / "in", stem)
    twin = _named(scene_files, tmp_path / "in", stem[:-3] + "xyz")  # the same first 200 bytes
    args = ["--box", "12,8,44,40", "--point", "70,60", *segmenter]
    result = run("mask", photo, *args, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    names = [Path(m["path"]).name for m in data["masks"]] + [Path(data["preview"]).name]
    assert all(len(os.fsencode(n)) <= NAME_ROOM for n in names), [len(os.fsencode(n)) for n in names]
    assert names[0].endswith(".mask1.png") and names[1].endswith(".mask2.png") and names[2].endswith(".masks-preview.png")
    assert len({n.split(".mask")[0] for n in names}) == 1  # one shortened stem for all of them
    assert all(Path(m["path"]).exists() for m in data["masks"])
    again = run("mask", photo, *args)
    assert again.stdout.splitlines() == [m["path"] for m in data["masks"]]  # the same names each time
    other = run("mask", twin, *args)
    assert other.exit_code == 0, other.output
    assert not set(other.stdout.splitlines()) & set(again.stdout.splitlines())  # and another photo's differ


def test_a_photo_with_a_long_name_learns_under_its_default_name(scene_files, tiny_model, tmp_path):
    photo = _named(scene_files, tmp_path / "in", "фото-" + "p" * 220)
    result = run("learn", photo, "--masks", *scene_files["masks"], "--base-model", tiny_model, "--steps1", "1",
                 "--steps2", "0", "--no-prior", "-q")
    assert result.exit_code == 0, result.output
    assert Path(result.stdout.strip()).exists()


def test_edit_of_a_photo_with_a_long_name_writes_a_short_name(learned, scene_files, tmp_path):
    photo = _named(scene_files, tmp_path / "in", "p" * 231)
    out = tmp_path / "out"
    result = run("edit", photo, "--mask", scene_files["masks"][0], "--scene", learned.path, "a photo of <asset1>",
                 "--steps", 2, "-n", 2, "--seed", 0, "--out-dir", out)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(set(lines)) == 2 and all(Path(line).exists() and len(os.fsencode(Path(line).name)) <= NAME_ROOM
                                        for line in lines)
    assert all(Path(line).name.endswith(f"-edit-a-photo-of-asset1-{seed}.png") for line, seed in zip(lines, (0, 1)))


# -- how many masks -------------------------------------------------------------------------------

def test_more_masks_than_learn_takes_are_refused_up_front(scene_files, segmenter, tmp_path):
    boxes = [a for i in range(MOST + 1) for a in ("--box", f"1,1,{10 + i % 80},{10 + i % 60}")]
    for args in (boxes, ["--auto", "--max-masks", MOST + 1], ["--box", "1,1,20,20", "--auto", "--max-masks", MOST]):
        result = run("mask", scene_files["image"], *args, "--out-dir", tmp_path / "out", *segmenter)
        assert result.exit_code == 2, result.output
        assert len(error_lines(result)) == 1 and f"at most {MOST}" in result.stderr
        assert "loading" not in result.stderr and not (tmp_path / "out").exists()


def test_as_many_masks_as_learn_takes_work_and_overlaps_are_summed_up(scene_files, segmenter, tmp_path):
    boxes = [a for i in range(MOST) for a in ("--box", f"1,1,{10 + i % 80},{10 + i % 60}")]
    result = run("mask", scene_files["image"], *boxes, "--out-dir", tmp_path, *segmenter)
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == MOST
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning")]
    assert 1 <= len(warnings) <= 11 and "more pairs" in warnings[-1]  # not one line per overlapping pair


# -- very long photos -----------------------------------------------------------------------------

def long_photo(folder: Path, size=(20000, 100), inset=100) -> tuple[Path, Path, Path]:
    """A photo far wider than high with an object `inset` pixels from each end, and
    their masks."""
    width, height = size
    folder.mkdir(parents=True, exist_ok=True)
    image = np.full((height, width, 3), 200, np.uint8)
    left, right = np.zeros((height, width), np.uint8), np.zeros((height, width), np.uint8)
    near, far = slice(inset, inset + 300), slice(width - inset - 300, width - inset)
    image[10:90, near], left[10:90, near] = (220, 30, 30), 255
    image[10:90, far], right[10:90, far] = (30, 30, 220), 255
    paths = folder / "long.png", folder / "left.png", folder / "right.png"
    for path, array in zip(paths, (image, left, right)):
        Image.fromarray(array).save(path)
    return paths


def test_a_very_long_photo_learns(tiny_model, tmp_path):
    """The square around the objects is 14000 pixels wide: 196 megapixels, over Pillow's
    bomb limit, had it been built at the photo's scale."""
    photo, left, right = long_photo(tmp_path / "in", inset=3000)
    result = run("learn", photo, "--masks", left, right, "--base-model", tiny_model, "--steps1", "1", "--steps2", "0",
                 "--no-prior", "--resolution", 256, "-q", "-o", tmp_path / "long.scene")
    assert result.exit_code == 0, result.output
    assert load_scene(tmp_path / "long.scene").meta["crop_box"] == [3000, -6950, 17000, 7050]  # padded above and below


def _peak_mb(code: str) -> float:
    """Run `code` in a fresh Python and return its peak resident memory in MB (Linux's
    VmHWM: ru_maxrss would include the parent's, from before exec)."""
    script = code + "\nprint(next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM')))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr
    return int(done.stdout.splitlines()[-1]) / 1024


def test_masks_and_edits_of_a_very_long_photo_stay_small(learned, tiny_segmentation, scene_files, tmp_path):
    """`mask` and `edit` of a 12000x100 photo (the square around its objects would be 144
    megapixels, under Pillow's bomb limit) take little more memory than of a small one:
    neither builds a square at the photo's scale."""
    if not Path("/proc/self/status").exists():
        pytest.skip("needs Linux's /proc to measure peak memory")
    photo, left, _ = long_photo(tmp_path / "in", (12000, 100))

    def mask_and_edit(image, mask, point):
        return (f"from scenebreak.masks.masking import make_masks; from scenebreak.sample.edit import edit\n"
                f"from scenebreak.config import EditConfig, MaskConfig\n"
                f"make_masks({str(image)!r}, boxes=[(10, 10, 40, 60)], points=[{point}], auto=True, "
                f"config=MaskConfig(segmenter={str(tiny_segmentation[1])!r}), out_dir={str(tmp_path / 'm')!r})\n"
                f"edit({str(image)!r}, [({str(mask)!r}, 'a photo of <asset1>')], {str(learned.path)!r}, "
                f"EditConfig(steps=2), out_dir={str(tmp_path / 'e')!r})")

    small = _peak_mb(mask_and_edit(scene_files["image"], scene_files["masks"][0], (70, 50)))
    long = _peak_mb(mask_and_edit(photo, left, (11700, 50)))
    assert long - small < 100, (small, long)
