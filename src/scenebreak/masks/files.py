"""Mask files: each mask written as `STEM.maskN.png` (0/255, the photo's size), a
preview of all of them drawn over the photo as `STEM.masks-preview.png`, and a record
of the masks written, `.STEM.masks.json`: a later run with fewer masks removes only
those of its earlier ones that are still as scenebreak wrote them, never a file the
user made or changed. A STEM too long for the file system is shortened (paths.py)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InvalidInput
from ..paths import fit_file_name, remove_stale_temporaries, sync_folder, temporary_beside
from . import ops as maskops

PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 200, 0), (145, 30, 180), (70, 220, 220),
           (245, 130, 48), (240, 50, 230), (128, 128, 0), (0, 128, 128)]
PREVIEW_SUFFIX = ".masks-preview.png"  # the longest name made from the stem
RECORD_FORMAT = "scenebreak.masks"
MAX_RECORD_BYTES = 1 << 20  # a record is a few hundred bytes; anything bigger is not ours


@dataclass
class MaskResult:
    """One mask a run made: where it came from, its score, and where it was written."""

    label: str  # the prompt, "box 1", "point 2", "points" or "segment 3"
    source: str  # prompt | box | point | auto
    score: float  # prompts: the detector's score; otherwise SAM's predicted IoU
    mask: np.ndarray  # (H, W) uint8 in {0, 1}, the image's size
    path: Path | None = None
    detections: list | None = None  # prompts: the detector's boxes it came from (x0, y0, x1, y1), best first

    @property
    def area(self) -> int:
        return int(self.mask.sum())

    @property
    def box(self) -> tuple[int, int, int, int] | None:
        return maskops.bounding_box(self.mask)

    def to_dict(self) -> dict:
        detections = None if self.detections is None else [[round(float(v), 1) for v in box] for box in self.detections]
        return {"path": str(self.path) if self.path else None, "label": self.label, "source": self.source,
                "score": round(float(self.score), 4), "box": list(self.box or ()), "area": self.area,
                "detections": detections}


def _stem(image_path: Path) -> str:
    """The photo's stem as every name of its masks starts, shortened for all alike."""
    return fit_file_name(Path(image_path).stem, "", longest_suffix=PREVIEW_SUFFIX)


def mask_name(image_path: Path, index: int) -> str:
    return f"{_stem(image_path)}.mask{index}.png"


def preview_name(image_path: Path) -> str:
    return _stem(image_path) + PREVIEW_SUFFIX


def record_name(image_path: Path) -> str:
    return f".{_stem(image_path)}.masks.json"


def output_paths(image_path: Path, out_dir: Path, count: int) -> list[Path]:
    """What `write_masks` writes for `count` masks: the masks, the preview, the record."""
    out_dir = Path(out_dir)
    return ([out_dir / mask_name(image_path, i) for i in range(1, count + 1)]
            + [out_dir / preview_name(image_path), out_dir / record_name(image_path)])


def check_outputs(paths: list[Path]) -> None:
    """Refuse a folder where an output goes, before anything is written (a file or a
    link there is replaced; a folder would stop the run half-way)."""
    for path in paths:
        try:
            in_the_way = stat.S_ISDIR(os.lstat(path).st_mode)
        except OSError:
            continue  # nothing there (or no folder yet)
        if in_the_way:
            raise InvalidInput(f"cannot write {path}: a folder of that name is in the way; move it, or choose another --out-dir")


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _fingerprint(data: bytes) -> list:
    return [len(data), hashlib.sha256(data).hexdigest()]


class MaskInTheWay(InvalidInput):
    """A file where a mask goes that scenebreak did not write for this photo: `why`
    says whose it is; the message ends with the command line's ways out (the page
    words its own from `path` and `why`)."""

    def __init__(self, path: Path, why: str, ways_out: str):
        self.path, self.why = path, why
        super().__init__(f"{path} {why}: {ways_out}")


def check_replaceable(image_path: Path, mask_paths: list[Path], force: bool, earlier: dict | None = None) -> None:
    """Refuse to replace a mask file scenebreak did not write as it is now (one you drew
    or edited, or a link), unless `force`: masks are often touched up by hand."""
    if force or not mask_paths:
        return
    record = Path(mask_paths[0]).parent / record_name(image_path)
    if earlier is None:
        earlier = read_record(record, image_path)
    for path in mask_paths:
        if os.path.lexists(path) and not is_our_mask(path, earlier.get(path.name, [])):
            if is_our_mask(path, read_record(record, image_path, any_photo=True).get(path.name, [])):
                raise MaskInTheWay(path, f"is a mask of another photo named {Path(image_path).stem} (scenebreak wrote "
                                         "it for that one)", "write elsewhere with --out-dir, or pass --force to replace it")
            raise MaskInTheWay(path, "is not a mask scenebreak wrote (yours, or edited since)",
                               "move it, write elsewhere with --out-dir, or pass --force to replace it")


def write_masks(image_path: Path, image, results: list[MaskResult], out_dir: Path, force: bool = False) -> Path:
    """Write STEM.mask1.png ... (0/255, the image's size) and STEM.masks-preview.png,
    all or none; then remove the masks of an earlier run with higher numbers, so that
    `STEM.mask[0-9]*.png` globs only this run's, as far as the record shows them unchanged.
    A mask file there that scenebreak did not write is replaced only with `force`.
    Sets each result's path; returns the preview's."""
    from PIL import Image

    out_dir = Path(out_dir)
    paths = output_paths(image_path, out_dir, len(results))
    check_outputs(paths)
    *mask_paths, preview, record = paths
    # Encode everything first: once the first file is written, nothing can fail but the disk.
    files = [(path, _png(Image.fromarray(r.mask * 255))) for path, r in zip(mask_paths, results)]
    files.append((preview, _png(draw_preview(image, results))))
    # Masks recorded for another photo of the same name are not this photo's to replace
    # (`force`: they are, and so are their unchanged leftovers, which a glob would pick up).
    earlier = read_record(record, image_path, any_photo=force)
    check_replaceable(image_path, mask_paths, force, earlier)
    now = {path.name: [_fingerprint(data)] for path, data in files[:-1]}
    photo = photo_print(image_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The record names the old and the new masks before any is replaced: an interrupted
    # run leaves nothing a later one cannot recognise as its own.
    both = {name: earlier.get(name, []) + now.get(name, []) for name in {**earlier, **now}}
    _replace_all([(record, _record(both, photo))])
    _replace_all(files)
    for result, path in zip(results, mask_paths):
        result.path = path
    left = {name: prints for name, prints in earlier.items() if name not in now and not _remove_if_ours(out_dir / name, prints)}
    _replace_all([(record, _record({**left, **now}, photo))])
    return preview


def _record(masks: dict, photo: dict | None) -> bytes:
    return json.dumps({"format": RECORD_FORMAT, "version": 1, "photo": photo, "masks": masks}, indent=1).encode()


def photo_print(image_path: Path) -> dict | None:
    """Which photo a record's masks belong to: its file (the resolved path) and its
    content ([size, sha256]); the same file edited since is still the same photo."""
    try:
        return {"path": str(Path(image_path).resolve()), "content": _fingerprint(Path(image_path).read_bytes())}
    except OSError:
        return None


def _same_photo(recorded, photo: dict | None) -> bool:
    if not isinstance(recorded, dict) or photo is None:
        return False
    return recorded.get("path") == photo["path"] or recorded.get("content") == photo["content"]


def read_record(path: Path, image_path: Path, any_photo: bool = False) -> dict[str, list]:
    """The masks an earlier run wrote for this photo, by name: {name: [[size, sha256],
    ...]}; a record of another photo of the same name (cat.jpg beside cat.png, or one
    from another folder) counts only with `any_photo`. A record is as untrusted as any
    file: only this photo's mask names in this folder count, and anything odd (a link,
    a stranger's JSON) makes it empty."""
    try:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_RECORD_BYTES:
            return {}
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT or not isinstance(data.get("masks"), dict):
        return {}
    # (A record from before photos were recorded has none: it counts, as it did then.)
    if not any_photo and data.get("photo") is not None and not _same_photo(data["photo"], photo_print(image_path)):
        return {}
    name_pattern = re.compile(re.escape(_stem(image_path)) + r"\.mask[1-9][0-9]{0,3}\.png")
    masks = {}
    for name, prints in data["masks"].items():
        if not (isinstance(name, str) and name_pattern.fullmatch(name) and isinstance(prints, list)):
            continue
        good = [p for p in prints if isinstance(p, list) and len(p) == 2 and type(p[0]) is int and isinstance(p[1], str)]
        if good:
            masks[name] = good[:16]
    return masks


def is_our_mask(path: Path, prints: list) -> bool:
    """Whether `path` is a plain file (never a link: links are not followed) with the size
    and sha256 of a mask scenebreak wrote."""
    try:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_size not in {size for size, _ in prints}:
            return False
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0))
        with os.fdopen(fd, "rb") as file:
            return [info.st_size, hashlib.sha256(file.read()).hexdigest()] in prints
    except OSError:
        return False


def _remove_if_ours(path: Path, prints: list) -> bool:
    """Delete `path` if it is a mask scenebreak wrote, unchanged. True unless it was ours
    and stays."""
    try:
        if is_our_mask(path, prints):
            path.unlink()
        return True
    except FileNotFoundError:
        return True  # gone already
    except OSError:
        return False


def _replace_all(files: list[tuple[Path, bytes]]) -> None:
    """Write each file under a temp name beside it, then rename all of them into place:
    a failure while writing (a full disk) leaves every one as it was."""
    staged = []
    try:
        for path, data in files:
            remove_stale_temporaries(path)  # a killed run's (a mask folder is the user's own)
            tmp = temporary_beside(path)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
            fd = os.open(tmp, flags, 0o666)  # a new file (never through a link), with the usual permissions
            staged.append(tmp)
            with os.fdopen(fd, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())  # on the disk before it takes its name (a power cut)
        for tmp, (path, _) in zip(staged, files):
            os.replace(tmp, path)
        if files:
            sync_folder(files[0][0].parent)
    finally:
        for tmp in staged:
            if os.path.lexists(tmp):
                os.unlink(tmp)


def draw_preview(image, results: list[MaskResult], max_side: int = 1024):
    """The photo with each mask tinted in its own colour, outlined, and labelled with
    its number and label; at most `max_side` pixels on the long side."""
    from PIL import Image, ImageDraw, ImageFont

    scale = min(1.0, max_side / max(image.size))
    size = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
    canvas = np.asarray(image.convert("RGB").resize(size, Image.Resampling.LANCZOS), dtype=np.float32)
    outline = max(1, round(min(size) / 200))
    masks = [np.asarray(Image.fromarray(r.mask * 255).resize(size, Image.Resampling.NEAREST)) > 0 for r in results]
    for i, mask in enumerate(masks):
        colour = np.array(PALETTE[i % len(PALETTE)], np.float32)
        canvas[mask] = canvas[mask] * 0.5 + colour * 0.5
        edge = maskops.dilate(mask, outline).astype(bool) & ~mask
        canvas[edge] = colour
    picture = Image.fromarray(canvas.round().astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default(size=max(10, round(min(size) / 28)))
    for i, (mask, result) in enumerate(zip(masks, results)):
        box = maskops.bounding_box(mask)
        if box is None:
            continue
        text = f"{i + 1} {result.label}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        w, h = right - left + 8, bottom - top + 6
        x = min(max(0, box[0]), size[0] - w)
        y = min(max(0, box[1]), size[1] - h)
        colour = PALETTE[i % len(PALETTE)]
        draw.rectangle((x, y, x + w, y + h), fill=colour)
        ink = (0, 0, 0) if sum(colour) > 400 else (255, 255, 255)
        draw.text((x + 4 - left, y + 3 - top), text, fill=ink, font=font)
    return picture
