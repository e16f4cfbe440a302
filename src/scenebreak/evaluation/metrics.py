"""The models behind `evaluate`'s numbers, after the Break-A-Scene paper (section 5.1):

- prompt similarity: cosine of CLIP's image and text embeddings (ViT-L/14 by default),
  the prompt's handles replaced by plain class words;
- identity similarity: cosine of DINO's image embeddings (the [CLS] token of ViT-S/16 by
  default) of the object masked out of the source photo and of a generated image: the
  rest of each image is black, as in the paper;
- masked identity: the same object compared on its own patches only. Each object is cut
  to its bounding box (padded square), and DINO's patch tokens that lie inside the mask
  are averaged. The paper's score lets a large black background make any two small
  objects look alike; this one does not.

Each scorer loads its model once; the functions below take PIL images and (H, W) masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import DEFAULT_CLIP_MODEL, DEFAULT_DINO_MODEL, default_model
from ..families.versions import in_fp32
from ..hub import loading_model, model_load_failure, transformers_model_of_kind
from ..kept import one_builder_at_a_time

CLIP_KINDS = ("clip",)
CLIP_WANTED = f"use a CLIP checkpoint such as {DEFAULT_CLIP_MODEL}"
DINO_KINDS = ("vit", "dinov2")  # DINO ViT-S/16 and friends, DINOv2
DINO_WANTED = f"use a DINO ViT checkpoint such as {DEFAULT_DINO_MODEL} (or DINOv2)"
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")  # (the second: transformers 5's whole processor)
PATCH_INSIDE = 0.5  # a patch belongs to the object when at least half of it is inside the mask


def _cosine(a, b) -> float:
    import torch

    return float(torch.nn.functional.cosine_similarity(a.float().flatten()[None], b.float().flatten()[None]).item())


class ClipScorer:
    """CLIP image-text cosine similarity (prompt similarity)."""

    @one_builder_at_a_time
    def __init__(self, ref: str | None, device):
        from transformers import AutoProcessor, CLIPModel

        ref = ref or default_model("clip")
        folder, _ = transformers_model_of_kind(ref, "CLIP model", "--clip-model", CLIP_KINDS, CLIP_WANTED,
                                               tokenizer=True)
        with loading_model("CLIP model", ref, folder, "--clip-model"):
            self.processor = AutoProcessor.from_pretrained(folder)
            self.model = CLIPModel.from_pretrained(folder, **in_fp32()).to(device.torch).eval()
        self.device, self.ref = device, ref

    @staticmethod
    def _embedding(output):
        # transformers 5 returns a model output whose pooler_output is the projected embedding.
        return getattr(output, "pooler_output", output)

    def image_embedding(self, image):
        import torch

        inputs = self.processor(images=image.convert("RGB"), return_tensors="pt")
        with torch.inference_mode():
            return self._embedding(self.model.get_image_features(pixel_values=inputs["pixel_values"].to(self.device.torch)))[0]

    def text_embedding(self, text: str):
        import torch

        inputs = self.processor(text=[text], return_tensors="pt", padding=True, truncation=True)
        inputs = {k: v.to(self.device.torch) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        with torch.inference_mode():
            return self._embedding(self.model.get_text_features(**inputs))[0]

    def similarity(self, image, text: str) -> float:
        """Cosine of the image's and the text's CLIP embeddings."""
        return _cosine(self.image_embedding(image), self.text_embedding(text))


def masked_image(image, mask: np.ndarray):
    """The image with everything outside `mask` black (the paper's masked version)."""
    from PIL import Image

    pixels = np.asarray(image.convert("RGB")).copy()
    pixels[~np.asarray(mask).astype(bool)] = 0
    return Image.fromarray(pixels)


def object_crop(image, mask: np.ndarray):
    """The object alone: its bounding box, outside the mask black, padded (black) to a
    square so the model's square resize does not stretch it; and the mask the same way."""
    from PIL import Image

    from ..masks.ops import bounding_box

    mask = np.asarray(mask).astype(bool)
    x0, y0, x1, y1 = bounding_box(mask)  # exclusive ends
    pixels = np.asarray(masked_image(image, mask))[y0:y1, x0:x1]
    inside = mask[y0:y1, x0:x1]
    side = max(pixels.shape[:2])
    top, left = (side - pixels.shape[0]) // 2, (side - pixels.shape[1]) // 2
    square = np.zeros((side, side, 3), np.uint8)
    square[top:top + pixels.shape[0], left:left + pixels.shape[1]] = pixels
    square_mask = np.zeros((side, side), bool)
    square_mask[top:top + inside.shape[0], left:left + inside.shape[1]] = inside
    return Image.fromarray(square), square_mask


def patch_weights(mask: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """(rows * cols,) 0/1 weights of the patches that are mostly inside `mask` (resized
    to the patch grid by area); the most covered patch when none is (a tiny object)."""
    from PIL import Image

    cover = np.asarray(Image.fromarray(np.asarray(mask, np.uint8) * 255).resize((cols, rows), Image.BOX), np.float32) / 255
    cover = cover.flatten()
    inside = cover >= PATCH_INSIDE
    if not inside.any():
        inside = cover == cover.max()
    return inside.astype(np.float32)


def whole_image(processor) -> dict:
    """The processor's settings that keep the whole image: DINOv2's resizes to 256 and
    crops the middle 224, which would cut an object crop's edges and shift the patch
    grid off the mask it is pooled under; straight to the crop's size instead (the
    ViT DINO's own processor does just that already)."""
    if not getattr(processor, "do_center_crop", False):
        return {}
    crop = processor.crop_size
    return {"do_center_crop": False, "size": {"height": crop["height"], "width": crop["width"]}}


class DinoScorer:
    """DINO image features: the [CLS] embedding, and patch tokens pooled inside a mask."""

    @one_builder_at_a_time
    def __init__(self, ref: str | None, device):
        from transformers import AutoImageProcessor, AutoModel, ViTModel

        ref = ref or default_model("dino")
        folder, kind = transformers_model_of_kind(ref, "DINO model", "--dino-model", DINO_KINDS, DINO_WANTED)
        with loading_model("DINO model", ref, folder, "--dino-model"):
            self.processor = AutoImageProcessor.from_pretrained(folder)
            # DINO checkpoints have no pooler: leave it out rather than initialise it randomly.
            model = (ViTModel.from_pretrained(folder, add_pooling_layer=False, **in_fp32()) if kind == "vit"
                     else AutoModel.from_pretrained(folder, **in_fp32()))
            self.model = model.to(device.torch).eval()
        self.patch = int(self.model.config.patch_size)
        self.device, self.ref = device, ref

    def _tokens(self, image):
        """(tokens, D) last hidden states and the patch grid (rows, cols)."""
        import torch

        pixels = self.processor(images=image.convert("RGB"), return_tensors="pt", **whole_image(self.processor))
        pixels = pixels["pixel_values"].to(self.device.torch)
        with torch.inference_mode():
            hidden = self.model(pixel_values=pixels).last_hidden_state[0].float()
        return hidden, (pixels.shape[-2] // self.patch, pixels.shape[-1] // self.patch)

    def features(self, image, mask: np.ndarray) -> "ObjectFeatures":
        """What identity is measured on, for the object under `mask` in `image`."""
        import torch

        whole, _ = self._tokens(masked_image(image, mask))
        crop, crop_mask = object_crop(image, mask)
        hidden, (rows, cols) = self._tokens(crop)
        patches = hidden[-rows * cols:]  # after [CLS] (and any register tokens)
        weights = torch.from_numpy(patch_weights(crop_mask, rows, cols)).to(patches.device)
        return ObjectFeatures(whole=whole[0], parts=(patches * weights[:, None]).sum(0) / weights.sum())


@dataclass
class ObjectFeatures:
    whole: object  # (D,) DINO [CLS] of the image with everything outside the object black
    parts: object  # (D,) mean of the object's own patch tokens (cut to its box)


def identity_scores(source: ObjectFeatures, generated: ObjectFeatures) -> tuple[float, float]:
    """(identity, masked identity): cosines in [-1, 1], 1 for the same object pixels."""
    return _cosine(source.whole, generated.whole), _cosine(source.parts, generated.parts)


def check_models(refs: dict[str, str], words: list[str] = ()) -> None:
    """Before anything slow: every scoring model is here (or downloads), and each is of
    a kind that can do its job, with its processor's settings and whole weights files;
    the detector reads each of the class `words` (--words) whole. `refs` has the keys clip,
    dino, detector, segmenter."""
    from ..masks import detector
    from ..masks import segmenter
    from ..hub import check_models_available

    roles = {"clip": ("CLIP model", "--clip-model", CLIP_KINDS, CLIP_WANTED),
             "dino": ("DINO model", "--dino-model", DINO_KINDS, DINO_WANTED),
             "detector": ("detector", "--detector", detector.KINDS, detector.WANTED),
             "segmenter": ("segmenter", "--segmenter", segmenter.KINDS, segmenter.WANTED)}
    check_models_available([(refs[key], what, option) for key, (what, option, _, _) in roles.items()])
    for key, (what, option, kinds, wanted) in roles.items():
        folder, kind = transformers_model_of_kind(refs[key], what, option, kinds, wanted,
                                                  tokenizer=key in ("clip", "detector"))  # (those two read text)
        if not any((folder / name).is_file() for name in PROCESSOR_FILES):
            # (a folder saved with the model's save_pretrained alone)
            raise model_load_failure(what, refs[key], folder, option, ValueError(
                "it holds no image processor settings (preprocessor_config.json): save the processor there too"))
        _check_weights(folder, what, refs[key], option)
        if key == "detector":
            detector.check_texts(folder, kind, list(dict.fromkeys(words)), "--words")
            detector.check_runs(kind, refs[key])


def _check_weights(folder, what: str, ref: str, option: str) -> None:
    """A weights file is there, and every safetensors file's header is readable and
    covers the file: a garbled or cut-short download is told before the sampling (in
    milliseconds: no weight is read), not when the model loads after it."""
    from safetensors import SafetensorError, safe_open

    files = sorted(folder.glob("*.safetensors"))
    pickled = sorted(folder.glob("*.bin"))
    if not files and not pickled:
        raise model_load_failure(what, ref, folder, option, ValueError("it holds no weights file (*.safetensors)"))
    for path in pickled:  # (DINO ViT-S/16 ships only pytorch_model.bin)
        if not _whole_torch_file(path):
            raise model_load_failure(what, ref, folder, option, ValueError(f"{path.name} is damaged (cut short?)"))
    stored = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                stored.update((key, tuple(f.get_slice(key).get_shape())) for key in f.keys())
        except (OSError, SafetensorError) as exc:
            raise model_load_failure(what, ref, folder, option, ValueError(f"{path.name} is damaged ({exc})")) from exc
    wrong = _misfit_tensors(folder, stored)
    if wrong:
        raise model_load_failure(what, ref, folder, option, ValueError(
            f"its weights do not fit its config.json ({len(wrong)} tensors of other sizes, e.g. {wrong[0]}: a config "
            "from another model?)"))


def _whole_torch_file(path) -> bool:
    """Whether a torch.save file reads as one: a zip whose directory (at its end) opens,
    which a cut-short or garbled download's does not; or torch's pickle format from
    before 1.6, which cannot be checked without reading it all."""
    import zipfile

    try:
        with open(path, "rb") as f:
            if f.read(2) == b"\x80\x02":  # (the legacy format opens with a protocol-2 pickle)
                return True
        with zipfile.ZipFile(path):
            return True
    except (OSError, zipfile.BadZipFile):
        return False


def _misfit_tensors(folder, stored: dict[str, tuple]) -> list[str]:
    """The stored tensors whose shape is not the one the folder's config.json gives them
    (the model built from it on the meta device: no memory, no weight read). A stored
    name may carry the task model's prefix ("model.") that the bare model lacks. Empty
    where the config cannot be built from: loading it will say what is wrong."""
    import torch
    from transformers import AutoConfig, AutoModel

    try:
        with torch.device("meta"):
            model = AutoModel.from_config(AutoConfig.from_pretrained(folder))
    except Exception:  # a config transformers cannot build: the loader's own error says it
        return []
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    wrong = []
    for key, shape in stored.items():
        name = key if key in shapes else key.split(".", 1)[-1]
        if name in shapes and shapes[name] != shape:
            wrong.append(f"{key} {list(shape)} where the config makes {list(shapes[name])}")
    return wrong


def box_iou(a, b) -> float:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


SAME_OBJECT_IOU = 0.5  # two boxes of one word this similar are one object (as non-maximum suppression has it)
# A box of another word must be nearly the same box to be the same detection: objects of
# different words overlap for real (the paper's creature in a bowl: IoU 0.5 and more).
SAME_BOX_IOU = 0.9


def best_assignment(similarity: list[list[float]]) -> list[int | None]:
    """The one-to-one pairing of rows with columns that pairs as many as it can
    (min(rows, cols)) with the highest total similarity: each row's column, or None.
    The Hungarian algorithm (Kuhn-Munkres with potentials), O(rows^2 * cols)."""
    rows = len(similarity)
    cols = len(similarity[0]) if rows else 0
    if not rows or not cols:
        return [None] * rows
    if rows > cols:  # pair the columns with rows instead
        by_column = best_assignment([[similarity[i][j] for i in range(rows)] for j in range(cols)])
        pairs = [None] * rows
        for j, i in enumerate(by_column):
            pairs[i] = j
        return pairs
    cost = [[0.0] * (cols + 1)] + [[0.0] + [-x for x in row] for row in similarity]  # 1-based, minimised
    u, v = [0.0] * (rows + 1), [0.0] * (cols + 1)
    owner, way = [0] * (cols + 1), [0] * (cols + 1)  # owner[j]: the row paired with column j (0: none)
    for i in range(1, rows + 1):
        owner[0], j0 = i, 0
        least, used = [float("inf")] * (cols + 1), [False] * (cols + 1)
        while True:  # grow a path of tight edges from row i to a free column
            used[j0] = True
            i0, delta, j1 = owner[j0], float("inf"), 0
            for j in range(1, cols + 1):
                if not used[j]:
                    reduced = cost[i0][j] - u[i0] - v[j]
                    if reduced < least[j]:
                        least[j], way[j] = reduced, j0
                    if least[j] < delta:
                        delta, j1 = least[j], j
            for j in range(cols + 1):
                if used[j]:
                    u[owner[j]] += delta
                    v[j] -= delta
                else:
                    least[j] -= delta
            j0 = j1
            if owner[j0] == 0:
                break
        while j0:  # flip the path
            owner[j0] = owner[way[j0]]
            j0 = way[j0]
    pairs: list[int | None] = [None] * rows
    for j in range(1, cols + 1):
        if owner[j]:
            pairs[owner[j] - 1] = j - 1
    return pairs


@dataclass
class FoundObject:
    mask: np.ndarray | None  # None: not found
    detection: float  # its box's detection score; not found: the best score left for its word
    features: ObjectFeatures | None = None  # DINO's, for identity_scores
    outline_empty: bool = False  # not found although detected: SAM's mask in its box was empty


class ObjectFinder:
    """Finds objects by class word in a generated image the way `scenebreak mask -p WORD`
    does: the detector's best box above the threshold, outlined by SAM, cleaned up."""

    def __init__(self, detector_ref: str | None, segmenter_ref: str | None, device, threshold: float | None):
        from ..config import default_model
        from ..masks.detector import Detector
        from ..masks.segmenter import Segmenter

        self.detector = Detector(detector_ref or default_model("detector"), device)
        self.segmenter = Segmenter(segmenter_ref or default_model("segmenter"), device)
        self.threshold = self.detector.threshold(threshold)  # (None: the detector kind's default)

    def find(self, image, objects: list[tuple[str, ObjectFeatures]], dino: DinoScorer) -> list[FoundObject]:
        """Each object, given as its class word and its features in the source photo, in
        the generated `image`. Objects that share a word (e.g. "object") get that many
        different boxes, the word's best (a box never serves two objects), and which
        object gets which box is the pairing most like the sources (identity plus
        masked identity in total, best_assignment): the detector's order says nothing
        about which is which."""
        from ..masks.ops import clean, default_min_area

        self.segmenter.set_image(image)
        min_area = default_min_area(image.size)  # as `mask` does
        taken: list = []  # (box, word) of the boxes given to objects so far
        found: list[FoundObject | None] = [None] * len(objects)
        for word in dict.fromkeys(w for w, _ in objects):
            group = [i for i, (w, _) in enumerate(objects) if w == word]
            boxes, scores = self.detector.detect(image, word)
            picked, left = [], 0.0  # the boxes for the group; the best score after them
            for box, score in zip(boxes, map(float, scores)):  # best first
                if any(box_iou(box, t) >= (SAME_OBJECT_IOU if w == word else SAME_BOX_IOU) for t, w in taken):
                    continue
                if score <= self.threshold or len(picked) == len(group):
                    left = score
                    break
                picked.append((box, score))
                taken.append((box, word))
            outlined = self.segmenter.from_boxes([b for b, _ in picked]) if picked else []
            masks = [clean(m, min_area) for m, _ in outlined]
            usable = [(m, score) for m, (_, score) in zip(masks, picked) if m.any()]
            left = max([left] + [score for m, (_, score) in zip(masks, picked) if not m.any()])
            features = [dino.features(image, m) for m, _ in usable]
            pairs = best_assignment([[sum(identity_scores(objects[i][1], f)) for f in features] for i in group])
            # Objects left without a box: as many as there were empty outlines were detected
            # (the advice differs: a lower --threshold does not help those).
            empty_outlines = len(picked) - len(usable)
            for i, j in zip(group, pairs):
                if j is not None:
                    found[i] = FoundObject(usable[j][0], usable[j][1], features[j])
                else:
                    found[i] = FoundObject(None, left, outline_empty=empty_outlines > 0)
                    empty_outlines -= 1
        return found
