"""Warnings about masks a user made, before a run spends its time on them: a mask that
covers nearly the whole photo (inverted?), two masks of one object, a soft mask
(images.load_masks says that), and a photo whose EXIF rotation a mask tool may have
ignored where the sizes cannot tell."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .files import is_our_mask, read_record, record_name

# A mask past this share of the photo is likely inverted, or not one object (one past
# half of it, where it frames a hole: frames_a_hole).
MAX_COVER = 0.9
SAME_OBJECT = 0.9  # two masks whose intersection is this much of their union mark one object twice
_TURNS = {2: "mirrored", 3: "upside down", 4: "upside down and mirrored", 5: "sideways", 6: "sideways",
          7: "sideways", 8: "sideways"}


def mask_warnings(image_path: Path, size: tuple[int, int], turned: int, masks: np.ndarray,
                  mask_paths: list[Path], notes: list[str] = (), objects: bool = True) -> list[str]:
    """Lines to warn with about `masks` (N, H, W) of the photo at `image_path` (its
    upright `size`, turned from EXIF orientation `turned`), read from `mask_paths`;
    `notes`: load_masks' own. `objects`: masks of one object each (learn's), not
    regions to repaint (edit's, which may well cover most of a photo)."""
    lines = list(notes)
    for path, mask in zip(mask_paths, masks if objects else []):
        cover = float(mask.mean())
        if cover > MAX_COVER or (cover > 0.5 and frames_a_hole(mask)):
            lines.append(f"mask {path} covers {cover:.0%} of the photo: inverted? The object must be the non-zero "
                         "part, on a zero (black or transparent) background")
    for i, j, iou in _same_objects(masks) if objects else []:
        lines.append(f"masks {mask_paths[i]} and {mask_paths[j]} are {iou:.0%} the same: two handles for one object "
                     "(the same mask twice?)")
    if objects:
        lines += _glob_order(mask_paths)
    # Sideways on a photo that is not square, a mask of the stored pixels has the wrong size
    # (refused, saying why); upside down, mirrored or square, nothing tells.
    ambiguous = turned in (2, 3, 4) or (turned in range(5, 9) and size[0] == size[1])
    if ambiguous and not all(_written_by_us(image_path, path) for path in mask_paths):
        lines.append(f"the photo {image_path} is stored {_TURNS[turned]} with an EXIF rotation and read upright, as "
                     "viewers show it: masks must be drawn on the upright photo (a tool that ignores the rotation "
                     "marks the wrong place)")
    return lines


def frames_a_hole(mask: np.ndarray) -> bool:
    """The mask runs all around the photo's edge and its zero part lies inside: the look
    of an object's mask inverted (white background, black object), however small the
    object. An object's own mask has background at some edge."""
    edge = np.concatenate([mask[0], mask[-1], mask[:, 0], mask[:, -1]])
    return bool(edge.all()) and not mask.all()


def _glob_order(mask_paths: list[Path]) -> list[str]:
    """`STEM.mask[0-9]*.png` sorts mask10 before mask2: from ten masks on, a shell glob
    gives the handles another order than the masks' numbers."""
    found = [re.fullmatch(r"(.*)\.mask([0-9]+)\.png", Path(p).name) for p in mask_paths]
    if len(found) < 2 or not all(found) or len({(Path(p).parent, m[1]) for p, m in zip(mask_paths, found)}) != 1:
        return []
    numbers = [int(m[2]) for m in found]
    if numbers == sorted(numbers):
        return []
    at = next(i for i, n in enumerate(numbers) if n != sorted(numbers)[i])
    return [f"the masks come in the order {', '.join(f'mask{n}' for n in numbers[:at + 2])}...: handle {at + 1} learns "
            f"mask{numbers[at]} (a shell glob sorts mask10 before mask2); pass them in number order (ls -v) if "
            "that is not what you meant"]


def _same_objects(masks: np.ndarray) -> list[tuple[int, int, float]]:
    """Pairs (i, j, IoU) of masks that are nearly one (IoU above SAME_OBJECT). (A mask
    inside another is no such pair: a handle for a part is a use of its own.)"""
    flat = masks.reshape(len(masks), -1).astype(bool)
    pairs = []
    for i in range(len(flat)):
        for j in range(i + 1, len(flat)):
            iou = float((flat[i] & flat[j]).sum() / max((flat[i] | flat[j]).sum(), 1))
            if iou > SAME_OBJECT:
                pairs.append((i, j, iou))
    return pairs


def _written_by_us(image_path: Path, mask_path: Path) -> bool:
    """A mask `scenebreak mask` (or the page) wrote for this photo, unchanged: drawn on
    the upright photo."""
    mask_path = Path(mask_path)
    prints = read_record(mask_path.parent / record_name(image_path), image_path).get(mask_path.name)
    return bool(prints) and is_our_mask(mask_path, prints)
