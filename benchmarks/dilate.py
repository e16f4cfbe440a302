"""Seconds to dilate one object's mask (`--dilate` of `mask`, `edit`, `extract-bg`) on a
photo-sized image: scenebreak's way (the mask's box grown by the radius, then running
maxima along columns and rows: time independent of the radius) against the earlier
row-by-row sweep of the disk (one pass over the whole image per row of the disk),
with the pixels of both compared. No torch.

    python benchmarks/dilate.py                               # 24 MP, radii 16 256 1024
    python benchmarks/dilate.py --megapixels 12 --radii 64 512
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def row_sweep(mask: np.ndarray, radius: int) -> np.ndarray:
    """The earlier dilation: for each row offset of the disk, the whole image's rows
    grown by that row's half width (sliding sums), shifted into place."""
    mask = np.asarray(mask).astype(bool)
    if radius <= 0:
        return mask.astype(np.uint8)
    height, width = mask.shape
    padded = np.zeros((height, width + 2 * radius + 1), np.int32)
    padded[:, radius + 1:radius + 1 + width] = mask
    cumulative = np.cumsum(padded, axis=1)
    out = np.zeros((height, width), bool)
    last_half, grown = None, None
    for dy in range(radius + 1):
        half = int(np.floor(np.sqrt(radius * radius - dy * dy)))
        if half != last_half:
            hi = cumulative[:, radius + 1 + half:radius + 1 + half + width]
            lo = cumulative[:, radius - half:radius - half + width]
            last_half, grown = half, (hi - lo) > 0
        if dy >= height:
            continue
        out[dy:] |= grown[:height - dy]
        if dy:
            out[:-dy] |= grown[dy:]
    return out.astype(np.uint8)


def seconds(fn, *args) -> tuple[float, np.ndarray]:
    started = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - started, result


def main(argv=None) -> list[dict]:
    from scenebreak.masks.ops import dilate
    from figures import save_results
    from train_step import machine

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megapixels", type=float, default=24.0)
    parser.add_argument("--radii", type=int, nargs="+", default=[16, 256, 1024])
    parser.add_argument("--results-dir", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)

    width = int((args.megapixels * 1e6 * 3 / 2) ** 0.5)  # a 3:2 photo
    height = width * 2 // 3
    mask = np.zeros((height, width), bool)  # an object of about a fifth of the photo, off centre
    yy, xx = np.ogrid[:height, :width]
    mask[((yy - height * 0.45) / (height * 0.25)) ** 2 + ((xx - width * 0.4) / (width * 0.2)) ** 2 <= 1] = True
    rows = []
    for radius in args.radii:
        ours, grown = seconds(dilate, mask, radius)
        before, swept = seconds(row_sweep, mask, radius)
        rows.append({"radius": radius, "scenebreak_s": round(ours, 2), "row_sweep_s": round(before, 2),
                     "same_pixels": bool(np.array_equal(grown, swept))})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    command = "python benchmarks/dilate.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = ["# Dilating one object's mask: the mask's box and running maxima against the row-by-row disk sweep", "",
             f"- machine: {machine('cpu')}; numpy {np.__version__}; photo {width}x{height} "
             f"({width * height / 1e6:.1f} MP), the object an ellipse over about a fifth of it",
             f"- date: {datetime.date.today()}; command: `{command.strip()}`", "",
             "| radius | s, scenebreak | s, row sweep (before) | same pixels |", "|---|---|---|---|"]
    lines += [f"| {r['radius']} | {r['scenebreak_s']} | {r['row_sweep_s']} | {r['same_pixels']} |" for r in rows]
    save_results(args.results_dir, "dilate-cpu", "\n".join(lines), {"command": command, "rows": rows})
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
