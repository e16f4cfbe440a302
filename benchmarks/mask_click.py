"""Milliseconds per click on a photo already embedded by Segment Anything (the page's
clicks, `mask --point`): prompts scaled from the sizes kept at set_image (scenebreak's
way) against SAM's processor run over the whole photo for each click to scale them
(the earlier way), at several photo sizes. The tests' tiny random SAM unless
--segmenter names a real one (SAM's own decoder then adds its time to both rows).

    python benchmarks/mask_click.py                          # tiny SAM, 2 and 12 megapixels
    python benchmarks/mask_click.py --segmenter facebook/sam-vit-base --megapixels 12 50
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))  # the tiny model builders
TINY = "the tests' tiny random SAM (128 px)"


def via_processor(segmenter, **prompts) -> dict:
    """The earlier way: SAM's processor over the whole photo, for one prompt's tensors."""
    inputs = segmenter.processor(images=segmenter.image, return_tensors="pt", **prompts)
    return {key: inputs[key] for key in prompts}


def per_click_ms(segmenter, clicks: int) -> float:
    width, height = segmenter.image.size
    segmenter.from_clicks([(width // 3, height // 3)], [1])  # warm-up
    started = time.perf_counter()
    for i in range(clicks):
        segmenter.from_clicks([(width // 3 + i, height // 2)], [1])
    return (time.perf_counter() - started) / clicks * 1000


def main(argv=None) -> list[dict]:
    import numpy as np
    import torch
    from PIL import Image

    from scenebreak.device import choose_device
    from scenebreak.masks.segmenter import Segmenter
    from figures import save_results
    from train_step import machine

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--segmenter", help="a SAM hub id or folder (default: the tests' tiny random SAM)")
    parser.add_argument("--megapixels", type=float, nargs="+", default=[2.0, 12.0])
    parser.add_argument("--clicks", type=int, default=5, help="timed clicks per row after one warm-up")
    parser.add_argument("--results-dir", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)

    ref = args.segmenter
    if ref is None:
        from tinymodels import build_tiny_segmentation_models

        ref = str(build_tiny_segmentation_models(Path(tempfile.mkdtemp(prefix="mask-click-")))[1])
    segmenter = Segmenter(ref, choose_device("cpu"))
    rows = []
    for megapixels in args.megapixels:
        width = max(8, int((megapixels * 1e6 * 4 / 3) ** 0.5))  # a 4:3 photo
        height = max(8, width * 3 // 4)
        photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8))
        segmenter.set_image(photo)
        ours = per_click_ms(segmenter, args.clicks)
        segmenter.prompt_tensors = lambda **prompts: via_processor(segmenter, **prompts)
        try:
            theirs = per_click_ms(segmenter, args.clicks)
        finally:
            del segmenter.prompt_tensors
        rows.append({"photo": f"{width}x{height}", "megapixels": round(width * height / 1e6, 1),
                     "kept_sizes_ms": round(ours, 1), "processor_per_click_ms": round(theirs, 1)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    command = "python benchmarks/mask_click.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = ["# A click on an embedded photo: prompts scaled from the kept sizes against SAM's processor per click", "",
             f"- machine: {machine('cpu')}; torch {torch.__version__}; segmenter: "
             f"{args.segmenter or TINY}; {args.clicks} timed clicks per row",
             f"- date: {datetime.date.today()}; command: `{command.strip()}`", "",
             "| photo | megapixels | ms per click, sizes kept (scenebreak) | ms per click, processor per click (before) |",
             "|---|---|---|---|"]
    lines += [f"| {r['photo']} | {r['megapixels']} | {r['kept_sizes_ms']} | {r['processor_per_click_ms']} |"
              for r in rows]
    stem = "mask_click-cpu" + ("" if args.segmenter is None else "-" + Path(args.segmenter).name)
    save_results(args.results_dir, stem, "\n".join(lines), {"command": command, "rows": rows})
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
