"""`scenebreak mask` from start to finish: one loose mask per object, from text prompts
(an open-vocabulary detector finds a box, Segment Anything turns it into a mask), from
boxes or clicks (straight to SAM), or automatically (the largest distinct segments).
Everything asked for is checked before a model loads; then the models run (detector.py,
segmenter.py), the masks are cleaned up for Break-A-Scene (ops.py), overlaps are
reported, and the masks and their preview are written (files.py)."""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..arguments import config_argument, flag_argument, function_argument, path_argument, text_arguments
from ..config import MAX_LEARNED_HANDLES, MaskConfig, default_model
from ..errors import InvalidInput, InvalidMask, fixable_failures
from ..events import Message, Progress, Reporter, silent
from .. import kept
from ..hub import check_models_available, downloads_reported, transformers_model_of_kind
from ..paths import is_writable_folder
from . import ops as maskops
from .detector import KINDS as DETECTOR_KINDS, WANTED as DETECTOR_WANTED, Detector, check_texts
from .files import MaskResult, check_outputs, check_replaceable, output_paths, write_masks
from .segmenter import AUTO_MAX_COVER, Segmenter

OVERLAP_LIMIT = 0.5  # report pairs sharing more than half of the smaller mask
OVERLAP_WARNINGS = 10  # pairs named one by one; more are counted in one line
MAX_INSTANCES = 16  # matches of one prompt merged by --all-instances, the best-scored first


@dataclass
class MaskModels:
    """The models one make_masks call used, kept for the next (see kept.py)."""

    segmenter: Segmenter | None = None
    detector: Detector | None = None


@dataclass
class MaskRun:
    image: Path
    masks: list[MaskResult]
    preview: Path | None
    overlaps: list[tuple[int, int, float]] = field(default_factory=list)  # 0-based pairs
    detector: str | None = None
    segmenter: str | None = None
    threshold: float | None = None  # the score a prompt's match had to pass (None: no prompt)

    @property
    def paths(self) -> list[Path]:
        return [m.path for m in self.masks]

    def to_dict(self) -> dict:
        return {
            "image": str(self.image), "preview": str(self.preview) if self.preview else None,
            "masks": [m.to_dict() for m in self.masks],
            "overlaps": [{"masks": [i + 1, j + 1], "fraction": round(f, 3)} for i, j, f in self.overlaps],
            "detector": self.detector, "segmenter": self.segmenter, "threshold": self.threshold,
            "paths": [str(p) for p in self.paths],
        }


# -- parsing and validation -------------------------------------------------------------------

def _numbers(text: str, count: int, what: str) -> tuple[float, ...]:
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != count or not all(np.isfinite(values)):
        raise InvalidInput(f"{what} {text!r} must be {count} comma-separated numbers"
                           + (" X,Y" if count == 2 else " X0,Y0,X1,Y1"))
    return values


def parse_point(text: str) -> tuple[float, float]:
    """'X,Y' in image pixels."""
    return _numbers(text, 2, "point")


def parse_box(text: str) -> tuple[float, float, float, float]:
    """'X0,Y0,X1,Y1' in image pixels, the top-left corner first."""
    x0, y0, x1, y1 = _numbers(text, 4, "box")
    if not (x0 < x1 and y0 < y1):
        raise InvalidInput(f"box {text!r} must be X0,Y0,X1,Y1 with X0 < X1 and Y0 < Y1 (top-left, then bottom-right)")
    return x0, y0, x1, y1


def check_inside(points, boxes, size: tuple[int, int]) -> None:
    width, height = size
    for x, y in points:
        if not (0 <= x < width and 0 <= y < height):
            raise InvalidInput(f"point {x:g},{y:g} is outside the image ({width}x{height}; X in 0..{width - 1}, Y in 0..{height - 1})")
    for box in boxes:
        x0, y0, x1, y1 = box
        if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            raise InvalidInput(f"box {','.join(f'{v:g}' for v in box)} reaches outside the image ({width}x{height})")


class NothingMatches(InvalidInput):
    """No match of a prompt scored above the threshold."""

    ADVICE = "try a lower --threshold, other words, or point at it with --point X,Y or --box X0,Y0,X1,Y1"

    def __init__(self, prompt: str, best: float | None, threshold: float):
        self.prompt, self.best, self.threshold = prompt, best, threshold
        super().__init__(f"nothing matches {self._named()} above --threshold {threshold:g}: {self.ADVICE}")

    def _named(self) -> str:
        if self.best is None:
            return f"{self.prompt!r}"
        # Rounded down: 0.999 at --threshold 1 read "best score 1.00 above --threshold 1".
        return f"{self.prompt!r} (best score {math.floor(self.best * 100 + 1e-9) / 100:.2f})"

    @classmethod
    def of_all(cls, missed: list[NothingMatches]) -> InvalidInput:
        """One error naming every prompt that matched nothing (the first alone stopped the run,
        and the user ran the detector again once per word)."""
        if len(missed) == 1:
            return missed[0]
        return InvalidInput(f"nothing matches {', '.join(m._named() for m in missed)} above --threshold "
                            f"{missed[0].threshold:g}: {cls.ADVICE}")


def check_one_object(prompt: str) -> None:
    """Grounding DINO reads every "." and "?" (its tokenizer's own tokens, with or
    without a space after) as the end of one phrase and the start of the next: a prompt
    "cat. dog" or "cat.dog" became one mask of whichever phrase scored best (with
    --all-instances, of both). A prompt of those marks alone names nothing."""
    phrases = [part.strip() for part in re.split(r"[.?]", prompt) if part.strip()]
    if not phrases:
        raise InvalidInput(f"-p {prompt!r} names no object: describe the object, e.g. -p 'red bowl'")
    if len(phrases) > 1:
        raise InvalidInput(f"-p {prompt!r} reads as {len(phrases)} phrases ({', '.join(map(repr, phrases))}) to the "
                           "detector: one object per --prompt, without '.' or '?' inside (give each its own -p)")


def check_count(asked: int, auto: bool, max_masks: int) -> None:
    """More masks than one scene can learn are of no use: refused before any model loads."""
    most = asked + (max_masks if auto else 0)
    if most > MAX_LEARNED_HANDLES:
        counted = f" (--auto counts as its --max-masks, {max_masks})" if auto else ""
        raise InvalidInput(f"up to {most} masks asked for{counted}, but learn takes at most {MAX_LEARNED_HANDLES} "
                           "objects in one scene: ask for fewer")


def check_writable(folder: Path) -> None:
    if not is_writable_folder(Path(folder)):
        raise InvalidInput(f"cannot write masks to {folder}: choose another folder with --out-dir")


# -- the whole command -----------------------------------------------------------------------------

@fixable_failures()
def make_masks(image_path, prompts=(), points=(), boxes=(), auto: bool = False, config: MaskConfig | None = None,
               out_dir=None, report: Reporter = silent, excludes=(), force: bool = False) -> MaskRun:
    """Make, clean and write one mask per prompt, box and point (or group of points)
    and, with `auto`, the largest distinct segments; in that order. `excludes` are
    clicks beside the object of the points (one point, or a group): its mask leaves
    them out. A mask file there that scenebreak did not write (drawn or edited by
    hand) is replaced only with `force`. Everything is checked before the first file
    is written."""
    from ..device import choose_device
    from ..images import load_image
    from ..hub import quiet_libraries

    config = config_argument(config, MaskConfig)
    config.validate()
    image_path = path_argument(image_path, "image")
    auto, force = flag_argument(auto, "auto"), flag_argument(force, "force")
    out_dir = path_argument(out_dir, "out_dir") if out_dir is not None else None
    report = function_argument(report, "report") or silent
    prompts = [p.strip() for p in text_arguments(prompts, "prompts", allow_none=True)]
    points, excludes = (_places(v, 2, what) for v, what in ((points, "points"), (excludes, "excludes")))
    boxes = _places(boxes, 4, "boxes")
    if any(not p for p in prompts):
        raise InvalidInput("a --prompt is empty: describe the object, e.g. -p 'red bowl'")
    for prompt in prompts:
        check_one_object(prompt)
    # "X,Y" strings (as on the command line) or number pairs/quadruples.
    points = [parse_point(p) if isinstance(p, str) else tuple(map(float, p)) for p in points]
    boxes = [parse_box(b) if isinstance(b, str) else parse_box(",".join(map(str, b))) for b in boxes]
    excludes = [parse_point(p) if isinstance(p, str) else tuple(map(float, p)) for p in excludes]
    if excludes and not points:
        raise InvalidInput("--exclude X,Y leaves a spot out of the mask of --point clicks: click on the object with --point too")
    if excludes and len(points) > 1 and not config.group:
        raise InvalidInput("--exclude belongs to one object's clicks: add --group so that the --point clicks make one mask")
    if not (prompts or points or boxes or auto):
        raise InvalidInput("nothing to segment: give --prompt TEXT, --point X,Y, --box X0,Y0,X1,Y1 or --auto")
    asked = len(prompts) + len(boxes) + (min(1, len(points)) if config.group else len(points))
    check_count(asked, auto, config.max_masks)
    image_path = Path(image_path)
    image = load_image(image_path)
    check_inside(points + excludes, boxes, image.size)
    out_dir = Path(out_dir) if out_dir is not None else image_path.parent
    check_writable(out_dir)
    outputs = output_paths(image_path, out_dir, asked + (1 if auto else 0))  # --auto makes one or more
    check_outputs(outputs)
    check_replaceable(image_path, outputs[:-2], force)  # (before the models load; all of them again when written)
    min_area = config.min_area if config.min_area is not None else maskops.default_min_area(image.size)
    if auto and min_area > image.size[0] * image.size[1]:  # (no segment could pass: said now, not as "none found")
        raise InvalidInput(f"--min-area {min_area} is more pixels than the photo has ({image.size[0]}x{image.size[1]}): "
                           "--auto would keep nothing; give a smaller --min-area")

    quiet_libraries()
    device = choose_device(config.device)
    detector_ref = config.detector or default_model("detector")
    segmenter_ref = config.segmenter or default_model("segmenter")
    with downloads_reported(report):
        check_models_available([(detector_ref, "detector", "--detector")] * bool(prompts)
                               + [(segmenter_ref, "segmenter", "--segmenter")])
    if prompts:  # each is read whole by the detector (its tokenizer says; no weights load)
        check_texts(*transformers_model_of_kind(detector_ref, "detector", "--detector", DETECTOR_KINDS, DETECTOR_WANTED,
                                                tokenizer=True), prompts, "-p")
    # A loop of make_masks over photos (a notebook, a script) loads the models once: they
    # are kept for the next call with the same segmenter on the same device (kept.py).
    key = ("mask models", segmenter_ref, device.name)
    models = kept.take(key) or MaskModels()
    detector = None
    if prompts:
        if models.detector is None or models.detector.ref != detector_ref:
            report(Message(f"loading detector {detector_ref} on {device.name}"))
            models.detector = None  # (the other one's memory first)
            models.detector = Detector(detector_ref, device)
        detector = models.detector
    if models.segmenter is None:
        report(Message(f"loading segmenter {segmenter_ref} on {device.name}"))
        models.segmenter = Segmenter(segmenter_ref, device)
    segmenter = models.segmenter

    steps = len(prompts) + (1 if boxes else 0) + (1 if points else 0) + (1 if auto else 0) + 1
    done = 0

    def tick():
        nonlocal done
        done += 1
        report(Progress("segmenting", done, steps))

    report(Progress("segmenting", 0, steps))
    segmenter.set_image(image)
    tick()
    # label, source, score, mask, detections; a click's mask, its clicks too
    raw: list[tuple] = []
    missed: list[NothingMatches] = []
    for prompt in prompts:
        try:
            raw.append((prompt, "prompt", *find_object(detector, segmenter, image, prompt, config)))
        except NothingMatches as miss:  # every prompt is tried, then all that matched nothing are named
            missed.append(miss)
        tick()
    if missed:
        raise NothingMatches.of_all(missed)
    if boxes:
        for i, (mask, score) in enumerate(segmenter.from_boxes(boxes), 1):
            raw.append((f"box {i}", "box", score, mask, None))
        tick()
    if points:
        made = ([segmenter.from_clicks(points + excludes, [1] * len(points) + [0] * len(excludes))] if excludes
                else segmenter.from_points(points, together=config.group))
        clicked = [points] if excludes or config.group else [[p] for p in points]  # (each mask's own clicks)
        for i, ((mask, score), on) in enumerate(zip(made, clicked), 1):
            raw.append(("points" if config.group else f"point {i}", "point", score, mask, None, on))
        tick()

    results = [cleaned_result(label, source, score, mask, min_area, config, found, *on)
               for label, source, score, mask, found, *on in raw]
    if auto:
        # A few spare segments: the clean-up may still empty or merge some.
        segments = segmenter.automatic(config.grid, limit=3 * config.max_masks)
        found = _largest_segments(segments, config, min_area, image.size, [r.mask for r in results])
        if not found and not results:
            raise InvalidInput("--auto found no distinct segment: click on the objects with --point X,Y "
                               "or give --box X0,Y0,X1,Y1 or --prompt TEXT")
        if not found:
            report(Message("--auto found no segment apart from the masks asked for", "warning"))
        results += found
        tick()

    run = write_run(image_path, image, results, out_dir, report, detector_ref if prompts else None, segmenter_ref,
                    force=force, threshold=detector.threshold(config.threshold) if detector else None)
    segmenter.forget_image()
    kept.keep(key, models)  # (a failed call never gets here: what it half used goes)
    return run


def _places(value, size: int, what: str) -> list:
    """Points (size 2) or boxes (4) from Python: "X,Y" strings or number pairs (boxes:
    quadruples), a list of them, or one alone (a string, or a flat tuple of numbers: one
    place, not its numbers); None is none."""
    def one(place) -> bool:
        return isinstance(place, (list, tuple)) and len(place) == size and all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) for v in place)

    if value is None:
        return []
    if isinstance(value, np.ndarray):  # (numpy coordinates: a pair, or an N x 2 array)
        value = value.tolist() if value.ndim > 1 else tuple(value.tolist())
    if isinstance(value, (list, tuple)):
        value = type(value)(tuple(v.tolist()) if isinstance(v, np.ndarray) else v for v in value)
    if isinstance(value, str) or one(value):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) or one(v) for v in value):
        return list(value)
    shape = "X,Y strings or (x, y) pairs" if size == 2 else "X0,Y0,X1,Y1 strings or (x0, y0, x1, y1) tuples"
    raise InvalidInput(f"{what} must be {shape}, or a list of them: not {str(value)[:60]!r}")


def find_object(detector, segmenter, image, prompt: str, config: MaskConfig) -> tuple[float, np.ndarray, list]:
    """The detector's score, SAM's mask (not yet cleaned) of the object `prompt` names,
    and the detector's boxes it was made from; NothingMatches where none passes."""
    found, scores = detector.detect(image, prompt)
    threshold = detector.threshold(config.threshold)
    above = scores > threshold
    if not above.any():
        raise NothingMatches(prompt, float(scores.max()) if len(scores) else None, threshold)
    # The best-scored matches only (sorted by score): at --threshold 0 all of Grounding DINO's
    # 900 queries are above it, and each would be a full-size mask from SAM.
    chosen = found[above][:MAX_INSTANCES] if config.all_instances else found[:1]
    merged = None
    for mask, _ in segmenter.from_boxes(chosen):
        merged = mask if merged is None else np.maximum(merged, mask, out=merged)
    return float(scores[0]), merged, [tuple(map(float, box)) for box in chosen]


def cleaned_result(label: str, source: str, score: float, mask: np.ndarray, min_area: int, config: MaskConfig,
                   detections: list | None = None, clicks=()) -> MaskResult:
    """SAM's mask cleaned up for Break-A-Scene (ops.clean; the pieces under `clicks` on
    the object always stay); an empty one is refused."""
    cleaned = maskops.clean(mask, min_area, fill=config.fill_holes, grow=config.dilate, keep_at=clicks)
    if not cleaned.any():
        raise InvalidMask(f"the mask for {label!r} came out empty: try --box X0,Y0,X1,Y1 around the object, "
                          "or clicks on it with --point X,Y")
    return MaskResult(label, source, score, cleaned, detections=detections)


def write_run(image_path: Path, image, results: list[MaskResult], out_dir: Path, report: Reporter = silent,
              detector: str | None = None, segmenter: str | None = None, force: bool = False,
              threshold: float | None = None) -> MaskRun:
    """Report the overlapping pairs, write the masks and their preview (files.py)."""
    for n, result in enumerate(results, 1):
        cover = float(np.asarray(result.mask).astype(bool).mean())
        if cover > AUTO_MAX_COVER:  # SAM took the surroundings and the hole filling closed them over the object
            report(Message(f"mask {n} ({result.label}) covers {cover:.0%} of the photo: likely not the object alone; "
                           "check the preview, or give --box X0,Y0,X1,Y1 around it", level="warning"))
    found_overlaps = maskops.overlaps([r.mask for r in results], OVERLAP_LIMIT)
    for i, j, fraction in found_overlaps[:OVERLAP_WARNINGS]:
        report(Message(f"masks {i + 1} ({results[i].label}) and {j + 1} ({results[j].label}) overlap: {fraction:.0%} of "
                       "the smaller one; their handles will compete for those pixels", level="warning"))
    if len(found_overlaps) > OVERLAP_WARNINGS:
        report(Message(f"{len(found_overlaps) - OVERLAP_WARNINGS} more pairs of masks overlap as much (--json lists them all)",
                       level="warning"))
    preview = write_masks(image_path, image, results, out_dir, force)
    return MaskRun(image_path, results, preview, found_overlaps, detector, segmenter, threshold)


# An --auto segment this much inside one kept before (or one the user asked for) is a part
# of that object, or the same one again after the clean-up: not a distinct object.
AUTO_MAX_INSIDE = 0.9


def _largest_segments(segments, config: MaskConfig, min_area: int, size, taken=()) -> list[MaskResult]:
    """The `max_masks` largest segments after clean-up, leaving out the background
    (one segment over most of the photo), those the clean-up emptied, and those lying
    mostly inside a larger one kept or a mask in `taken` (the other masks of the run):
    parts (a shirt of a person), and the same segment twice once holes are filled."""
    width, height = size
    cleaned = []
    for mask, score in segments:
        mask = maskops.clean(mask, min_area, fill=config.fill_holes, grow=config.dilate)
        area = int(mask.sum())
        if min_area <= area <= AUTO_MAX_COVER * width * height:
            cleaned.append((area, score, mask))
    cleaned.sort(key=lambda c: -c[0])
    kept, others = [], [np.asarray(m).astype(bool) for m in taken]
    for area, score, mask in cleaned:
        if len(kept) == config.max_masks:
            break
        inside = mask.astype(bool)
        if any(np.count_nonzero(inside & other) >= AUTO_MAX_INSIDE * area for other in others):
            continue
        kept.append((score, mask))
        others.append(inside)
    return [MaskResult(f"segment {i}", "auto", score, mask) for i, (score, mask) in enumerate(kept, 1)]
