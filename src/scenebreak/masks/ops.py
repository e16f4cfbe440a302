"""Clean-up of binary masks with numpy only (no scipy): connected components, hole
filling, speck removal, dilation by a disk, and overlap between masks.

Break-A-Scene wants loose masks: a solid blob that covers the object is better than
a precise outline with holes and stray pixels, so segmenter output is tidied here.
Masks are 2-D arrays; anything non-zero is inside."""

from __future__ import annotations

import numpy as np


def label(mask: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """Connected components: an int32 image (0 outside, 1..n inside) and n.

    Works on runs (horizontal stretches of inside pixels): runs on neighbouring rows
    that touch are merged with union-find, so the Python work grows with the number
    of runs, not of pixels."""
    mask = np.asarray(mask).astype(bool)
    height, width = mask.shape
    padded = np.zeros((height, width + 2), np.int8)
    padded[:, 1:-1] = mask
    step = np.diff(padded, axis=1)
    rows, starts = np.nonzero(step == 1)
    _, ends = np.nonzero(step == -1)  # exclusive; row-major order pairs them with starts
    parent = list(range(len(rows)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    # 8-connected runs may touch diagonally, 4-connected ones must share a column.
    slack = 1 if connectivity == 8 else 0
    first = np.searchsorted(rows, np.arange(height + 1))
    for y in range(1, height):
        a0, a1, b1 = first[y - 1], first[y], first[y + 1]
        if a0 == a1 or a1 == b1:
            continue
        # For each run b on row y, the runs a on row y-1 with start_a < end_b + slack
        # and start_b < end_a + slack (the runs of one row are sorted and disjoint).
        lo = np.searchsorted(ends[a0:a1] + slack, starts[a1:b1], side="right")
        hi = np.searchsorted(starts[a0:a1], ends[a1:b1] + slack, side="left")
        for b, (l, h) in enumerate(zip(lo.tolist(), hi.tolist())):
            for a in range(l, h):
                ra, rb = root(a0 + a), root(a1 + b)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([root(i) for i in range(len(rows))], dtype=np.int64)
    _, ids = np.unique(roots, return_inverse=True)
    labels = np.zeros((height, width), np.int32)
    lengths = ends - starts
    flat = np.repeat(rows * width + starts - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
    labels.reshape(-1)[flat] = np.repeat(ids.astype(np.int32) + 1, lengths)
    return labels, int(ids.max() + 1) if len(ids) else 0


def fill_holes(mask: np.ndarray, max_hole: int | None = None) -> np.ndarray:
    """Fill the regions of outside pixels that the image border cannot reach (those of
    at most `max_hole` pixels, if given)."""
    mask = np.asarray(mask).astype(bool)
    # Outside regions are 4-connected when the object is 8-connected (and vice versa),
    # so a diagonal gap in an outline does not let the outside leak in.
    outside, count = label(~mask, connectivity=4)
    border = np.unique(np.concatenate([outside[0], outside[-1], outside[:, 0], outside[:, -1]]))
    enclosed = np.ones(count + 1, bool)
    enclosed[0] = False
    enclosed[border] = False
    if max_hole is not None:
        enclosed &= np.bincount(outside.reshape(-1), minlength=count + 1) <= max_hole
    return (mask | enclosed[outside]).astype(np.uint8)


# A hole a clean-up fills: at most this share of the photo. SAM's masks have small holes
# (highlights, texture) that a loose mask should not; a larger enclosed region (a bowl's
# contents seen from above, the view through a frame) is something else, often another
# object, which the handle must not learn as its own. (SAM's own generator fills holes
# below a size too: remove_small_regions.)
MAX_FILLED_HOLE = 0.01


def remove_specks(mask: np.ndarray, min_area: int) -> np.ndarray:
    """Drop 8-connected pieces smaller than `min_area` pixels; the largest piece always
    stays, so a small object is never wiped out."""
    labels, count = label(mask)
    if count == 0:
        return np.zeros(labels.shape, np.uint8)
    areas = np.bincount(labels.reshape(-1), minlength=count + 1)
    areas[0] = 0
    keep = areas >= min_area
    keep[int(areas.argmax())] = True
    keep[0] = False
    return keep[labels].astype(np.uint8)


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Grow the mask by a disk: a pixel is inside when an inside pixel lies within
    `radius` pixels (Euclidean)."""
    mask = np.asarray(mask).astype(bool)
    if radius <= 0:
        return mask.astype(np.uint8)
    height, width = mask.shape
    # The disk is a stack of horizontal segments: for each row offset dy, grow the rows
    # by the segment's half width (a sliding window sum), then shift by dy.
    padded = np.zeros((height, width + 2 * radius + 1), np.int32)
    padded[:, radius + 1:radius + 1 + width] = mask
    cumulative = np.cumsum(padded, axis=1)
    out = np.zeros((height, width), bool)
    last_half, grown = None, None
    # Rows dy and -dy share a half width: one grown row image serves both, and only the
    # latest is kept (a cache of every width held ~radius full images: 7 GB at 12 MP).
    for dy in range(radius + 1):
        half = int(np.floor(np.sqrt(radius * radius - dy * dy)))
        if half != last_half:
            # Sum of mask[x - half .. x + half] from the cumulative sums (padded by radius + 1).
            hi = cumulative[:, radius + 1 + half:radius + 1 + half + width]
            lo = cumulative[:, radius - half:radius - half + width]
            last_half, grown = half, (hi - lo) > 0
        if dy >= height:
            continue
        out[dy:] |= grown[:height - dy]
        if dy:
            out[:-dy] |= grown[dy:]
    return out.astype(np.uint8)


def default_min_area(size: tuple[int, int]) -> int:
    """The smallest piece a mask keeps unless told otherwise: 0.1% of the image."""
    return max(1, round(0.001 * size[0] * size[1]))


def clean(mask: np.ndarray, min_area: int, fill: bool = True, grow: int = 0) -> np.ndarray:
    """The whole clean-up, in order: fill small holes, drop specks, dilate."""
    mask = np.asarray(mask).astype(bool).astype(np.uint8)
    if fill:
        mask = fill_holes(mask, max_hole=max(1, round(MAX_FILLED_HOLE * mask.size)))
    mask = remove_specks(mask, min_area)
    return dilate(mask, grow)


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """x0, y0, x1, y1 (x1, y1 exclusive) of the inside pixels; None when empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def overlaps(masks: list[np.ndarray], limit: float = 0.5) -> list[tuple[int, int, float]]:
    """Pairs (i, j, fraction) whose shared pixels exceed `limit` of the smaller mask:
    two handles would then compete for the same pixels."""
    found = []
    flat = [np.asarray(m).astype(bool).reshape(-1) for m in masks]
    for i in range(len(flat)):
        for j in range(i + 1, len(flat)):
            smaller = min(flat[i].sum(), flat[j].sum())
            if smaller == 0:
                continue
            fraction = float((flat[i] & flat[j]).sum() / smaller)
            if fraction > limit:
                found.append((i, j, fraction))
    return found
