"""`scenebreak evaluate`: the paper's two automatic metrics for a learned scene.

A fixed, seeded set of prompts (each object handle alone and each pair of them in the
paper's kind of templates, or the user's own prompts) is sampled like `generate` does,
and every image is scored:

- prompt similarity (CLIP): does the image show what the prompt asks for? The handles
  are replaced by plain class words (--words) first, as CLIP does not know them;
- identity similarity (DINO): does each object look like itself in the source photo?
  The object is found in the generated image by its class word (detector + SAM, as in
  `scenebreak mask`) and compared with its mask in the photo; plus a masked score that
  compares object patches with object patches only (metrics.py says how). Objects
  that share a class word are told apart by DINO: the pairing of their boxes with
  them that is most like the source objects.

An object that is not found in an image is counted as missing and left out of the
identity means (which are over found objects only). The numbers only mean something
relative to each other: the same photo with other settings, never absolute values or
scenes of different photos (docs/evaluation.md).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..arguments import config_argument, text_arguments
from ..config import EvaluateConfig, default_model
from .. import kept
from ..device import Device, choose_device
from ..errors import InvalidInput, fixable_failures
from ..events import Message, Progress, Reporter, silent

# The paper's kind of prompts: one object in a new context...
SINGLE_TEMPLATES = (
    "a photo of {} at the beach",
    "a photo of {} in the jungle",
    "a photo of {} in the snow",
    "a photo of {} on top of a wooden floor",
    "a photo of {} in the street",
    "a photo of {} with a city in the background",
    "a photo of {} with a mountain in the background",
    "a photo of {} floating on top of water",
    "a photo of {} on top of a purple rug in a forest",
    "a photo of {} on the moon",
)
# ... and two of them together.
PAIR_TEMPLATES = (
    "a photo of {} and {} at the beach",
    "a photo of {} and {} in the jungle",
    "a photo of {} and {} in the snow",
    "a photo of {} and {} on top of a wooden floor",
    "a photo of {} and {} in the street",
)


def default_prompts(handles: list[str]) -> list[str]:
    """Every single template for each handle, then every pair template for each pair."""
    prompts = [t.format(h) for h in handles for t in SINGLE_TEMPLATES]
    prompts += [t.format(a, b) for a, b in itertools.combinations(handles, 2) for t in PAIR_TEMPLATES]
    return prompts


def plain_prompt(prompt: str, words: dict[str, str]) -> str:
    """The prompt with each handle replaced by its class word, for CLIP."""
    for token, word in words.items():
        prompt = prompt.replace(token, word)
    return prompt


@dataclass
class ObjectScore:
    handle: str
    word: str
    found: bool
    detection: float  # the detector's best score for the word (found: above --threshold)
    identity: float | None = None
    masked_identity: float | None = None
    missing_reason: str | None = None  # not found: "not detected", or "outline empty" (detected, SAM's mask empty)

    def to_dict(self) -> dict:
        return {"handle": self.handle, "word": self.word, "found": self.found, "detection": _round(self.detection),
                "identity": _round(self.identity), "masked_identity": _round(self.masked_identity),
                "missing_reason": self.missing_reason}


@dataclass
class ImageScore:
    path: Path
    prompt: str
    seed: int
    clip_prompt: str
    prompt_similarity: float
    objects: list[ObjectScore] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"path": str(self.path), "prompt": self.prompt, "seed": self.seed, "clip_prompt": self.clip_prompt,
                "prompt_similarity": _round(self.prompt_similarity), "objects": [o.to_dict() for o in self.objects]}


@dataclass
class Summary:
    """Means over the images of one handle (or all of them: `handle` "overall")."""

    handle: str
    word: str
    images: int  # images whose prompt uses the handle
    found: int  # objects found in them (overall: over every handle of every image)
    objects: int  # objects looked for
    prompt_similarity: float | None
    identity: float | None  # over found objects only
    masked_identity: float | None

    @property
    def missing(self) -> int:
        return self.objects - self.found

    def to_dict(self) -> dict:
        return {"handle": self.handle, "word": self.word, "images": self.images, "found": self.found,
                "missing": self.missing, "prompt_similarity": _round(self.prompt_similarity),
                "identity": _round(self.identity), "masked_identity": _round(self.masked_identity)}


@dataclass
class EvaluateResult:
    scene: str
    seed: int
    config: EvaluateConfig
    models: dict
    images: list[ImageScore]
    handles: list[Summary]
    overall: Summary
    out_dir: Path
    plot: Path | None = None
    report: Path | None = None
    seconds: float = 0.0
    scene_path: Path | None = None  # the scene's file, where it has one (`scene` is its own name)

    @property
    def paths(self) -> list[Path]:
        """The files written: the images, then the plot and the report."""
        return [i.path for i in self.images] + [p for p in (self.plot, self.report) if p]

    def to_dict(self) -> dict:
        return {"scene": self.scene, "scene_path": str(self.scene_path) if self.scene_path else None, "seed": self.seed,
                "settings": dataclasses.asdict(self.config), "models": self.models,
                "handles": [h.to_dict() for h in self.handles], "overall": self.overall.to_dict(),
                "images": [i.to_dict() for i in self.images], "out_dir": str(self.out_dir),
                "plot": str(self.plot) if self.plot else None, "report": str(self.report) if self.report else None,
                "seconds": round(self.seconds, 2), "paths": [str(p) for p in self.paths]}


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 4)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


# -- the whole command -----------------------------------------------------------------------------

@fixable_failures()
def evaluate(scene, prompts: list[str] | None = None, config: EvaluateConfig = EvaluateConfig(), *,
             out_dir: str | os.PathLike | None = None, device: str | Device | None = None, base_model: str | None = None,
             report: Reporter = silent) -> EvaluateResult:
    """Sample `prompts` (default: `default_prompts` of the scene's object handles), score
    every image, and write the images, a scatter plot and a JSON report to `out_dir`
    (default: ./SCENE-eval). Everything is checked, and every scoring model found,
    before the sampling starts."""
    from ..scenes.bundle import open_scene
    from .metrics import check_models
    from ..hub import downloads_reported, quiet_libraries
    from ..sample.sampling import check_prompts, open_run, plan_sampling, sample_to_files, warn_cpu_time
    from ..handles import handles_in

    started = time.perf_counter()
    scene = open_scene(scene)
    objects = scene.object_tokens
    if not objects:
        raise InvalidInput(f"scene {scene.name!r} has no object handle to evaluate")
    empty = [h.token for h in scene.handles if not h.background and not scene.masks[h.mask_index].any()]
    if empty:  # identity compares the object under its mask: there is nothing to compare
        raise InvalidInput(f"scene {scene.name!r} holds an empty mask for {', '.join(empty)}: its identity cannot be "
                           "measured")
    config = config_argument(config, EvaluateConfig).validate(len(objects))
    words = dict(zip(objects, config.object_words(len(objects))))
    if scene.background_token:
        words[scene.background_token] = "background"
    if prompts is None:
        prompts = default_prompts(objects)
    else:
        prompts = [p.strip() for p in text_arguments(prompts, "prompts") if p.strip()]
        if not prompts:
            raise InvalidInput("no prompt to evaluate: the prompts (file) hold none (or leave them out for the built-in "
                               "prompts)")
    check_prompts(scene, prompts)
    for prompt in prompts:
        if not any(h in objects for h in handles_in(prompt)):
            raise InvalidInput(f"prompt {prompt!r} uses none of the scene's object handles ({', '.join(objects)}): "
                               "evaluate measures how the handles come out")

    refs = {"clip": config.clip_model or default_model("clip"), "dino": config.dino_model or default_model("dino"),
            "detector": config.detector or default_model("detector"),
            "segmenter": config.segmenter or default_model("segmenter")}
    device = device if isinstance(device, Device) else choose_device(device)
    out_dir = Path(out_dir) if out_dir is not None else Path(f"{scene.name}-eval")
    # What needs no weights is checked before the scoring models are fetched: a typo in
    # --scheduler or --negative is not worth gigabytes of downloads.
    plan = plan_sampling(scene, prompts, config, device=device, base_model=base_model, out_dir=out_dir,
                         warn_unused=False, report=report)
    quiet_libraries()
    with downloads_reported(report):
        check_models(refs, [words[token] for token in objects])

    run = open_run(plan, report)
    warn_cpu_time(run, len(prompts) * config.num_images * run.config.steps, scene.resolution**2, report)
    generated = sample_to_files(run, prompts, run.config, run.seed, out_dir, scene.name, report)
    _release(run)

    scores, threshold = score_images(scene, generated, words, config, refs, device, report)
    handles = [summarise(scores, token, words[token]) for token in objects]
    overall = summarise(scores, None, "")
    # The settings as applied: the detector's own threshold where none was given (runs
    # compare only at the same one).
    settings = dataclasses.replace(run.config, threshold=threshold)
    result = EvaluateResult(scene.name, run.seed, settings, refs, scores, handles, overall, out_dir,
                            scene_path=scene.path)
    # One name free for both: the plot and the report of a run go together, and neither
    # replaces an earlier run's (a plot deleted by hand left its report to be overwritten).
    stem, n = f"{scene.name}-evaluation", 1
    while (out_dir / f"{stem}.png").exists() or (out_dir / f"{stem}.json").exists():
        stem, n = f"{scene.name}-evaluation-{n}", n + 1
    result.plot = write_plot(result, out_dir / f"{stem}.png")
    result.report = result.plot.with_suffix(".json")
    result.seconds = time.perf_counter() - started
    from ..paths import write_atomically, write_new_file

    def write(tmp) -> None:
        Path(tmp).write_text(json.dumps(result.to_dict(), indent=2), encoding="utf-8")

    # (Never over another run's report, even one racing this one into the same folder;
    # then the file this run got says its own name.)
    written = write_new_file(result.report, write)
    if written != result.report:
        result.report = written
        write_atomically(written, write)
    return result


def _release(run) -> None:
    """Free the diffusion models before the scoring models load (a GPU holds both badly)."""
    run.pipe = None
    kept.free_memory()


def score_images(scene, generated, words: dict[str, str], config: EvaluateConfig, refs: dict, device: Device,
                 report: Reporter = silent) -> tuple[list[ImageScore], float]:
    """Prompt similarity of every generated image, and identity of every object handle
    in its prompt (missing when the detector does not find its word); and the detection
    threshold applied (the detector's own where `config` gives none)."""
    from PIL import Image

    from .metrics import ClipScorer, DinoScorer, ObjectFinder, identity_scores
    from ..handles import handles_in

    report(Message(f"loading CLIP {refs['clip']}, DINO {refs['dino']}, detector {refs['detector']} and "
                   f"segmenter {refs['segmenter']} on {device.name}"))
    clip = ClipScorer(refs["clip"], device)
    dino = DinoScorer(refs["dino"], device)
    finder = ObjectFinder(refs["detector"], refs["segmenter"], device, config.threshold)
    photo = Image.fromarray(scene.image)
    # The objects in the source photo: embedded once, each under its own mask.
    handle_masks = {h.token: scene.masks[h.mask_index] for h in scene.handles if not h.background}
    sources = {token: dino.features(photo, mask) for token, mask in handle_masks.items()}

    scores = []
    report(Progress("scoring", 0, len(generated)))
    for n, item in enumerate(generated, 1):
        image = Image.open(item.path).convert("RGB")
        clip_prompt = plain_prompt(item.prompt, words)
        score = ImageScore(item.path, item.prompt, item.seed, clip_prompt, clip.similarity(image, clip_prompt))
        tokens = [t for t in dict.fromkeys(handles_in(item.prompt)) if t in sources]
        for token, found in zip(tokens, finder.find(image, [(words[t], sources[t]) for t in tokens], dino)):
            if found.mask is None:
                reason = "outline empty" if found.outline_empty else "not detected"
                score.objects.append(ObjectScore(token, words[token], False, found.detection, missing_reason=reason))
            else:
                identity, masked = identity_scores(sources[token], found.features)
                score.objects.append(ObjectScore(token, words[token], True, found.detection, identity, masked))
        scores.append(score)
        report(Progress("scoring", n, len(generated)))
    reasons = [o.missing_reason for s in scores for o in s.objects if not o.found]
    if undetected := reasons.count("not detected"):
        report(Message(f"{undetected} object(s) not found in the generated images (counted as missing, left out of "
                       "the identity means): try other --words or a lower --threshold if the images do show them",
                       "warning"))
    if unoutlined := reasons.count("outline empty"):
        report(Message(f"{unoutlined} object(s) detected in the generated images but outlined as nothing by the "
                       "segmenter (an empty mask in its box): counted as missing, left out of the identity means; "
                       "a lower --threshold does not help these", "warning"))
    return scores, finder.threshold


def summarise(scores: list[ImageScore], handle: str | None, word: str) -> Summary:
    """The means of one handle's images (`handle` None: of all images and objects)."""
    images = [s for s in scores if handle is None or any(o.handle == handle for o in s.objects)]
    objects = [o for s in images for o in s.objects if handle is None or o.handle == handle]
    found = [o for o in objects if o.found]
    return Summary(handle or "overall", word, len(images), len(found), len(objects),
                   _mean([s.prompt_similarity for s in images]), _mean([o.identity for o in found]),
                   _mean([o.masked_identity for o in found]))


def write_plot(result: EvaluateResult, path: Path) -> Path:
    """Identity against prompt similarity, one point per handle; handles never found
    are named in a note, as they have no identity to place."""
    from .plots import scatter
    from ..sample.sampling import save_png

    points = [(h.handle, h.prompt_similarity, h.identity) for h in result.handles if h.identity is not None]
    unused = [h.handle for h in result.handles if h.identity is None and not h.images]
    unfound = [h.handle for h in result.handles if h.identity is None and h.images]
    notes = ([f"never found: {' '.join(unfound)}"] if unfound else []) + (
        [f"in no prompt: {' '.join(unused)}"] if unused else [])
    image = scatter(points, f"scene {result.scene} (seed {result.seed})", "prompt similarity (CLIP)",
                    "identity similarity (DINO)", notes)
    return save_png(image, path)


def format_table(result: EvaluateResult) -> str:
    """The per-handle and overall means as an aligned text table."""
    header = ("handle", "word", "images", "found", "prompt", "identity", "masked")
    rows = [header]
    for s in [*result.handles, result.overall]:
        rows.append((s.handle, s.word or "", str(s.images), f"{s.found}/{s.objects}",
                     *("-" if v is None else f"{v:.4f}" for v in (s.prompt_similarity, s.identity, s.masked_identity))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
             for row in rows]
    return "\n".join(lines)
