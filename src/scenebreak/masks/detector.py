"""Open-vocabulary detection: boxes with scores for a free-text prompt, from Grounding
DINO, OWL-ViT or OWLv2."""

from __future__ import annotations

import numpy as np

from ..config import DEFAULT_DETECTOR
from ..errors import InvalidInput, ModelNotAvailable
from ..families.versions import in_fp32
from ..hub import loading_model, transformers_model_of_kind
from ..kept import one_builder_at_a_time

# model_type values of the detectors that work here (MM-Grounding-DINO: Grounding DINO's
# architecture retrained, read by the same processor)
KINDS = ("grounding-dino", "mm-grounding-dino", "owlv2", "owlvit")
GROUNDING_DINO = ("grounding-dino", "mm-grounding-dino")
# The score a match must pass unless --threshold says otherwise. OWL's scores run lower
# than Grounding DINO's: transformers' own default for OWL post-processing, and its
# demos, use 0.1; at 0.3 objects OWL found well were "nothing matches".
DEFAULT_THRESHOLDS = {"grounding-dino": 0.3, "mm-grounding-dino": 0.3, "owlv2": 0.1, "owlvit": 0.1}
WANTED = f"use a Grounding DINO (e.g. {DEFAULT_DETECTOR}), MM-Grounding-DINO or OWL-ViT/OWLv2 checkpoint"


class Detector:
    """An open-vocabulary detector: boxes with scores for a free-text prompt."""

    @one_builder_at_a_time
    def __init__(self, ref: str, device):
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        folder, self.kind = transformers_model_of_kind(ref, "detector", "--detector", KINDS, WANTED, tokenizer=True)
        check_runs(self.kind, ref)
        try:
            with loading_model("detector", ref, folder, "--detector"):
                self.processor = AutoProcessor.from_pretrained(folder)
                model = AutoModelForZeroShotObjectDetection.from_pretrained(folder, **in_fp32())
                self.model = model.to(device.torch).eval()
        except ImportError as exc:
            raise ModelNotAvailable(_needs_extra(f"the detector {ref}", exc)) from exc
        self.device, self.ref = device, ref

    def threshold(self, asked: float | None) -> float:
        """The score a match must pass: `asked` (--threshold), else this kind's default."""
        return DEFAULT_THRESHOLDS[self.kind] if asked is None else asked

    def check(self, prompt: str, option: str) -> None:
        """The detector reads `prompt` whole (check_text); `option` names where it came from."""
        check_text(self.kind, self.processor.tokenizer, self.model.config, prompt, option)

    def detect(self, image, prompt: str) -> tuple[np.ndarray, np.ndarray]:
        """Boxes (n, 4; x0, y0, x1, y1 in image pixels) and scores (n,), best first."""
        import torch

        size = [(image.size[1], image.size[0])]
        self.check(prompt, "-p")
        try:
            if self.kind in GROUNDING_DINO:
                inputs = self.processor(images=image, text=grounding_text(prompt), return_tensors="pt")
                inputs = inputs.to(self.device.torch)
                with torch.inference_mode():
                    try:
                        outputs = self.model(**inputs)
                    except RuntimeError as exc:
                        if "out of range" not in str(exc):
                            raise
                        # It keeps its best num_queries of the encoder's tokens, and a
                        # long thin strip scaled to its input size has fewer.
                        raise InvalidInput(f"the photo is {image.size[0]}x{image.size[1]}: too long and thin for the "
                                           "detector; crop it, or mark the object with --box or --point") from None
                found = self.processor.post_process_grounded_object_detection(
                    outputs, inputs["input_ids"], threshold=0.0, text_threshold=0.0, target_sizes=size)[0]
            else:
                inputs = self.processor(images=image, text=[[prompt]], return_tensors="pt").to(self.device.torch)
                with torch.inference_mode():
                    outputs = self.model(**inputs)
                found = self.processor.post_process_grounded_object_detection(outputs=outputs, threshold=0.0, target_sizes=size)[0]
        except ImportError as exc:
            raise ModelNotAvailable(_needs_extra(f"the detector {self.ref}", exc)) from exc
        scores = found["scores"].float().cpu().numpy()
        boxes = found["boxes"].float().cpu().numpy().reshape(-1, 4)
        order = np.argsort(-scores, kind="stable")
        return boxes[order], scores[order]


def grounding_text(prompt: str) -> str:
    """Grounding DINO reads lowercase phrases that end with a period."""
    return prompt.strip().lower().rstrip(".") + "."


def check_text(kind: str, tokenizer, config, text: str, option: str) -> None:
    """The detector reads a fixed number of tokens: OWL's text tower 16, which its
    processor pads to without cutting; Grounding DINO its max_text_len (256). A longer
    text failed inside the model with a shape error. `option` names where the text came
    from (-p, --words)."""
    if kind in GROUNDING_DINO:
        most, name, text_read = int(config.max_text_len), "Grounding DINO", grounding_text(text)
    else:
        most, name, text_read = int(config.text_config.max_position_embeddings), "OWL", text
    tokens = len(tokenizer(text_read)["input_ids"])
    if tokens > most:
        raise InvalidInput(f"{option} {text!r} is {tokens} tokens long; this {name} detector reads at most {most}: "
                           "describe the object in fewer words")


def check_texts(folder, kind: str, texts: list[str], option: str) -> None:
    """check_text for each of `texts`, from the detector's folder (its tokenizer and
    config only: no weights load), before any work."""
    if not texts:
        return
    from transformers import AutoConfig, AutoTokenizer

    try:
        tokenizer, config = AutoTokenizer.from_pretrained(folder), AutoConfig.from_pretrained(folder)
    except Exception:  # noqa: BLE001 - a kind this transformers cannot read (MM-Grounding-DINO on an older
        return  # one), or a damaged folder: the detector's loading says which, with the fix
    for text in texts:
        check_text(kind, tokenizer, config, text, option)


def check_runs(kind: str, ref: str) -> None:
    """This detector kind runs here. MM-Grounding-DINO came in a later transformers than
    the lowest scenebreak allows: an older one failed on its processor's file names,
    which says nothing useful. OWLv2's post-processing imports scipy: said before any
    work, not after the segmenter's on the photo (or evaluate's sampling)."""
    import transformers

    if kind == "owlv2":
        try:
            import scipy  # noqa: F401
        except ImportError as exc:
            raise ModelNotAvailable(_needs_extra(f"the detector {ref}", exc)) from exc

    if kind == "mm-grounding-dino" and not hasattr(transformers, "MMGroundingDinoForObjectDetection"):
        raise ModelNotAvailable(f"the detector {ref} is an MM-Grounding-DINO, which transformers "
                                f"{transformers.__version__} cannot run: upgrade it (pipx runpip scenebreak install -U "
                                f"transformers) or use --detector {DEFAULT_DETECTOR}")


def _needs_extra(what: str, exc: ImportError) -> str:
    missing = getattr(exc, "name", None) or next(
        (m for m in ("scipy", "torchvision", "timm") if m in str(exc)), "a missing package")
    return (f"{what} needs {missing}, which is not installed: `pipx inject scenebreak {missing}` "
            f"(or pip install {missing}), or use the default detector {DEFAULT_DETECTOR}")
