"""A small scatter plot drawn with Pillow alone (no matplotlib): identity similarity
against prompt similarity, one labelled point per handle, like the paper's figure."""

from __future__ import annotations

import math

WIDTH, HEIGHT = 640, 480
LEFT, RIGHT, TOP, BOTTOM = 70, 30, 40, 60  # margins around the plotting area
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _axis(values: list[float]) -> tuple[float, float, list[float]]:
    """Axis limits around `values` (cosine similarities) with some room, on tidy tick
    steps, never past a cosine's -1 and 1; and the ticks."""
    low, high = min(values), max(values)
    pad = max((high - low) * 0.15, 0.02)
    step = _tick_step(high - low + 2 * pad)
    low, high = max(math.floor((low - pad) / step) * step, -1.0), min(math.ceil((high + pad) / step) * step, 1.0)
    return low, high, [low + i * step for i in range(int(math.floor((high - low) / step + 1e-9)) + 1)]


def _tick_step(span: float) -> float:
    raw = span / 5
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)


def scatter(points: list[tuple[str, float, float]], title: str, x_label: str, y_label: str,
            notes: list[str] = ()):
    """A PIL image of `points` (label, x, y); `notes` are lines printed under the title
    (e.g. handles that could not be placed)."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    x0, y0, x1, y1 = LEFT, TOP, WIDTH - RIGHT, HEIGHT - BOTTOM
    draw.rectangle((x0, y0, x1, y1), outline=(0, 0, 0))
    draw.text((WIDTH / 2, 12), title, fill=(0, 0, 0), font=font, anchor="mt")
    for i, note in enumerate(notes):
        draw.text((x0 + 6, y0 + 6 + 14 * i), note, fill=(120, 120, 120), font=font)
    draw.text(((x0 + x1) / 2, HEIGHT - 18), x_label, fill=(0, 0, 0), font=font, anchor="mm")
    # The y label, written sideways on its own small image.
    label = Image.new("RGB", (int(draw.textlength(y_label, font=font)) + 4, 14), "white")
    ImageDraw.Draw(label).text((2, 1), y_label, fill=(0, 0, 0), font=font)
    label = label.rotate(90, expand=True)
    image.paste(label, (8, int((y0 + y1) / 2 - label.height / 2)))
    if not points:
        draw.text(((x0 + x1) / 2, (y0 + y1) / 2), "nothing to plot", fill=(120, 120, 120), font=font, anchor="mm")
        return image

    (xl, xh, x_ticks), (yl, yh, y_ticks) = _axis([p[1] for p in points]), _axis([p[2] for p in points])

    def at(x: float, y: float) -> tuple[float, float]:
        return x0 + (x - xl) / (xh - xl) * (x1 - x0), y1 - (y - yl) / (yh - yl) * (y1 - y0)

    for tick in x_ticks:
        px, _ = at(tick, yl)
        draw.line((px, y1, px, y1 + 5), fill=(0, 0, 0))
        draw.line((px, y0, px, y1), fill=(235, 235, 235))
        draw.text((px, y1 + 8), f"{tick:.2f}", fill=(0, 0, 0), font=font, anchor="mt")
    for tick in y_ticks:
        _, py = at(xl, tick)
        draw.line((x0 - 5, py, x0, py), fill=(0, 0, 0))
        draw.line((x0, py, x1, py), fill=(235, 235, 235))
        draw.text((x0 - 8, py), f"{tick:.2f}", fill=(0, 0, 0), font=font, anchor="rm")
    draw.rectangle((x0, y0, x1, y1), outline=(0, 0, 0))  # again, over the grid lines
    placed: list[tuple[float, float, float, float]] = []  # label boxes drawn so far
    for i, (name, x, y) in enumerate(points):
        px, py = at(x, y)
        colour = COLOURS[i % len(COLOURS)]
        draw.ellipse((px - 5, py - 5, px + 5, py + 5), fill=colour, outline=(0, 0, 0))
        # Points close together: move the label down until it overlaps no other label.
        box = (px + 8, py - 8, px + 8 + draw.textlength(name, font=font), py + 4)
        while any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
            box = (box[0], box[1] + 12, box[2], box[3] + 12)
        placed.append(box)
        draw.text(box[:2], name, fill=colour, font=font)
    return image
