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


def remove_specks(mask: np.ndarray, min_area: int, keep_at=()) -> np.ndarray:
    """Drop 8-connected pieces smaller than `min_area` pixels; the largest piece always
    stays, so a small object is never wiped out, and so do the pieces under the points
    `keep_at` ((x, y) clicks on the object: the one clicked may be the small one)."""
    labels, count = label(mask)
    if count == 0:
        return np.zeros(labels.shape, np.uint8)
    areas = np.bincount(labels.reshape(-1), minlength=count + 1)
    areas[0] = 0
    keep = areas >= min_area
    keep[int(areas.argmax())] = True
    height, width = labels.shape
    for x, y in keep_at:
        keep[labels[min(max(int(y), 0), height - 1), min(max(int(x), 0), width - 1)]] = True
    keep[0] = False
    return keep[labels].astype(np.uint8)


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Grow the mask by a disk: a pixel is inside when an inside pixel lies within
    `radius` pixels (Euclidean). In time and memory of a few images whatever the
    radius (a sweep per row of the disk took 90 s at 24 megapixels and radius 1024)."""
    mask = np.asarray(mask).astype(bool)
    if radius <= 0 or not mask.any():
        return mask.astype(np.uint8)
    # Only the mask's box grown by the radius can change: the work is done there.
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    y0, y1 = max(rows[0] - radius, 0), min(rows[-1] + 1 + radius, mask.shape[0])
    x0, x1 = max(cols[0] - radius, 0), min(cols[-1] + 1 + radius, mask.shape[1])
    out = np.zeros(mask.shape, np.uint8)
    out[y0:y1, x0:x1] = _dilated(mask[y0:y1, x0:x1], radius)
    return out


def _dilated(mask: np.ndarray, radius: int) -> np.ndarray:
    """dilate's work on a (cropped) mask: a bool image of the same shape."""
    height, width = mask.shape
    far = np.int32(2**30)
    # How far each pixel is, up or down its column, from the column's nearest inside
    # pixel: the running last inside row above it and first below it.
    rows = np.arange(height, dtype=np.int32)[:, None]
    above = np.where(mask, rows, -far)
    np.maximum.accumulate(above, axis=0, out=above)
    gap = rows - above
    del above
    below = np.where(mask, rows, far)[::-1]
    below = np.minimum.accumulate(below, axis=0)[::-1]
    np.minimum(gap, below - rows, out=gap)
    del below
    # That pixel of the column reaches sideways along the row as far as the disk allows
    # at that height: floor(sqrt(r^2 - gap^2)) (the disk's half width there), -1 past it.
    reach = np.full(gap.shape, -1, np.int32)
    near = gap <= radius
    reach[near] = np.floor(np.sqrt(radius * radius - gap[near].astype(np.int64) ** 2))
    del gap, near
    # A pixel is inside when a column's reach on its left or right gets to it: running
    # maxima of the right ends from the left, minima of the left ends from the right.
    cols = np.arange(width, dtype=np.int32)
    ends = np.where(reach >= 0, cols + reach, -far)
    np.maximum.accumulate(ends, axis=1, out=ends)
    out = ends >= cols
    ends = np.where(reach >= 0, cols - reach, far)[:, ::-1]
    ends = np.minimum.accumulate(ends, axis=1)[:, ::-1]
    out |= ends <= cols
    return out


def default_min_area(size: tuple[int, int]) -> int:
    """The smallest piece a mask keeps unless told otherwise: 0.1% of the image."""
    return max(1, round(0.001 * size[0] * size[1]))


def clean(mask: np.ndarray, min_area: int, fill: bool = True, grow: int = 0, keep_at=()) -> np.ndarray:
    """The whole clean-up, in order: fill small holes, drop specks (but the pieces under
    the clicks `keep_at`), dilate."""
    mask = np.asarray(mask).astype(bool).astype(np.uint8)
    if fill:
        mask = fill_holes(mask, max_hole=max(1, round(MAX_FILLED_HOLE * mask.size)))
    mask = remove_specks(mask, min_area, keep_at)
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
