"""One photo's masks made one object at a time, for a front end that shows each mask as
soon as it is asked for (`scenebreak ui`): Segment Anything embeds the photo once, then
every object's clicks, box or words decode against that embedding in a fraction of the
time. Each mask is made and cleaned by the same calls as `make_masks` (masking.py), so
a click gives what `scenebreak mask --point X,Y` gives, and saving writes the same
files."""

from __future__ import annotations

import threading
from pathlib import Path

from .. import kept
from ..config import MaskConfig, default_model
from ..errors import InvalidInput
from ..events import Message, Progress, Reporter, silent
from . import ops as maskops
from .files import MaskResult, check_outputs, output_paths
from .masking import (MaskModels, MaskRun, check_count, check_inside, check_one_object, check_writable, cleaned_result,
                      find_object, parse_box, write_run)

MAX_CLICKS = 64  # clicks on one object; SAM takes a handful
# SAM ViT-B (facebook/sam-vit-base's shape) on one core of a 2-core Xeon, torch 2.13:
# the embedding took 19.7 s, each click's decode 0.14 s. On a GPU the embedding is a fraction
# of a second (SAM's paper: ~0.15 s for its largest encoder, ViT-H, on an A100).
CPU_NOTE = ("embedding the photo once (SAM ViT-B: about 20 s on one CPU core, less with more cores); "
            "each click after that decodes in a fraction of a second")


class SessionClosed(InvalidInput):
    """A prompt or a save reached a session closed meanwhile (another photo opened)."""


class MaskSession:
    """A photo with Segment Anything's embedding of it, ready for any number of prompts.
    Safe to share between threads: one prompt decodes at a time."""

    def __init__(self, image_path, config: MaskConfig | None = None, report: Reporter = silent):
        from ..device import choose_device
        from ..hub import check_models_available, downloads_reported, quiet_libraries
        from ..images import load_image
        from .segmenter import Segmenter

        self.config = config or MaskConfig()
        self.config.validate()
        self.image_path = Path(image_path)
        self.image = load_image(self.image_path)
        self.min_area = (self.config.min_area if self.config.min_area is not None
                         else maskops.default_min_area(self.image.size))
        quiet_libraries()
        self.device = choose_device(self.config.device)
        self.segmenter_ref = self.config.segmenter or default_model("segmenter")
        with downloads_reported(report):
            check_models_available([(self.segmenter_ref, "segmenter", "--segmenter")])
        # The last photo's models, if it closed (`close`) with the same segmenter on the same
        # device: a page opening photo after photo loads SAM once (kept.py).
        self.key = ("mask models", self.segmenter_ref, self.device.name)
        self.models = kept.take(self.key) or MaskModels()
        if self.models.segmenter is None:
            report(Message(f"loading segmenter {self.segmenter_ref} on {self.device.name}"))
            self.models.segmenter = Segmenter(self.segmenter_ref, self.device)
        self.segmenter = self.models.segmenter
        ref = self.config.detector or default_model("detector")
        self.detector = self.models.detector if self.models.detector and self.models.detector.ref == ref else None
        self.lock = threading.Lock()
        if self.device.type == "cpu":
            report(Message(CPU_NOTE))
        report(Progress("embedding the photo", 0, 1))
        self.segmenter.set_image(self.image)
        report(Progress("embedding the photo", 1, 1))

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size

    def mask(self, label: str = "object", points=(), labels=None, box=None, words: str | None = None,
             report: Reporter = silent) -> MaskResult:
        """One object's cleaned mask from clicks on it (label 1) and beside it (0) with
        perhaps a box around it, or from words the detector finds. Clicks are `mask
        --point X,Y` (several: with `--group`; beside it: `--exclude X,Y`), a box alone
        `mask --box`, words `mask -p TEXT`; a box with clicks has no counterpart there."""
        points = [tuple(map(float, p)) for p in points]
        labels = [1] * len(points) if labels is None else [int(v) for v in labels]
        if len(labels) != len(points) or any(v not in (0, 1) for v in labels):
            raise InvalidInput("give one label per click: 1 on the object, 0 beside it")
        if len(points) > MAX_CLICKS:
            raise InvalidInput(f"{len(points)} clicks on one object: at most {MAX_CLICKS}")
        if box is not None:
            box = parse_box(",".join(map(str, box)))
        words = (words or "").strip() or None
        if words:
            check_one_object(words)
        if words and (points or box is not None):
            raise InvalidInput("describe the object in words, or click on it (or draw a box): not both")
        if not (words or box is not None or 1 in labels):
            raise InvalidInput("nothing to segment: click on the object, draw a box around it, or describe it in words")
        check_inside(points, [box] if box is not None else [], self.size)
        with self.lock:
            self._check_open()
            if words:
                self._detector(report).check(words, "the words")  # (said in the page's terms, not mask's -p)
                score, raw, found = find_object(self._detector(report), self.segmenter, self.image, words, self.config)
                return cleaned_result(label, "prompt", score, raw, self.min_area, self.config, found)
            raw, score = self.segmenter.from_clicks(points, labels, box)
        source = "point" if box is None else "box"
        on = [p for p, v in zip(points, labels) if v == 1]
        return cleaned_result(label, source, score, raw, self.min_area, self.config, clicks=on)

    def _detector(self, report: Reporter):
        """The text detector, loaded the first time words are given."""
        if self.detector is None:
            from ..hub import check_models_available, downloads_reported
            from .detector import Detector

            ref = self.config.detector or default_model("detector")
            with downloads_reported(report):
                check_models_available([(ref, "detector", "--detector")])
            report(Message(f"loading detector {ref} on {self.device.name}"))
            self.models.detector = None  # (another detector's memory first)
            self.detector = self.models.detector = Detector(ref, self.device)
        return self.detector

    def close(self) -> None:
        """Let the photo's embedding go and keep its models for the next photo's session
        (kept.py: whatever else was kept goes). Waits for a prompt decoding now; the
        session answers no prompt after."""
        with self.lock:
            if self.segmenter is None:
                return
            self.segmenter.forget_image()
            models, self.models, self.segmenter, self.detector = self.models, None, None, None
        kept.keep(self.key, models)

    def _check_open(self) -> None:
        if self.segmenter is None:
            raise SessionClosed(f"{self.image_path.name} was closed: another photo was opened")

    def save(self, results: list[MaskResult], out_dir=None, report: Reporter = silent) -> MaskRun:
        """Write the masks and their preview as `mask` does: STEM.mask1.png ... in order,
        beside the photo unless `out_dir` is given; checked before anything is written."""
        if not results:
            raise InvalidInput("no mask to save: make a mask for at least one object first")
        check_count(len(results), False, 0)
        out_dir = Path(out_dir) if out_dir is not None else self.image_path.parent
        check_writable(out_dir)
        check_outputs(output_paths(self.image_path, out_dir, len(results)))
        with self.lock:
            self._check_open()
            prompted = any(r.source == "prompt" for r in results) and self.detector is not None
            detector = (self.config.detector or default_model("detector")) if prompted else None
            threshold = self.detector.threshold(self.config.threshold) if prompted else None
        return write_run(self.image_path, self.image, results, out_dir, report, detector, self.segmenter_ref,
                         threshold=threshold)
