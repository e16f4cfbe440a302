"""Mask files: each mask written as `STEM.maskN.png` (0/255, the photo's size) and a
preview of all of them drawn over the photo as `STEM.masks-preview.png`."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import maskops

if TYPE_CHECKING:
    from .masking import MaskResult

PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 200, 0), (145, 30, 180), (70, 220, 220),
           (245, 130, 48), (240, 50, 230), (128, 128, 0), (0, 128, 128)]


def mask_name(image_path: Path, index: int) -> str:
    return f"{Path(image_path).stem}.mask{index}.png"


def preview_name(image_path: Path) -> str:
    return f"{Path(image_path).stem}.masks-preview.png"


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def write_masks(image_path: Path, image, results: list[MaskResult], out_dir: Path) -> Path:
    """Write STEM.mask1.png ... (0/255, the image's size) and STEM.masks-preview.png,
    each atomically; masks of an earlier run with higher numbers are removed so that
    `STEM.mask*.png` globs only this run's. Sets each result's path; returns the preview's."""
    from PIL import Image

    from .paths import write_atomically

    # Encode everything first: once the first file is written, nothing can fail but the disk.
    files = [(out_dir / mask_name(image_path, i), _png(Image.fromarray(r.mask * 255))) for i, r in enumerate(results, 1)]
    preview = out_dir / preview_name(image_path)
    files.append((preview, _png(draw_preview(image, results))))
    for path, data in files:
        write_atomically(path, lambda tmp, data=data: tmp.write_bytes(data))
    for result, (path, _) in zip(results, files):
        result.path = path
    stale = re.compile(re.escape(Path(image_path).stem) + r"\.mask(\d+)\.png$")
    for old in out_dir.iterdir():
        match = stale.match(old.name)
        if match and int(match.group(1)) > len(results):
            old.unlink()
    return preview


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
