"""Segment Anything (SAM): masks for an image from boxes, from clicks, or automatically
from a grid of clicks (the largest distinct segments)."""

from __future__ import annotations

import numpy as np

from ..config import DEFAULT_SEGMENTER
from ..errors import InvalidInput
from ..families.versions import in_fp32
from ..hub import loading_model, transformers_model_of_kind
from ..kept import one_builder_at_a_time

# Automatic segmentation, after SAM's automatic mask generator (with a coarser grid).
AUTO_MIN_IOU = 0.88  # SAM's own estimate of the mask's quality
AUTO_MIN_STABILITY = 0.9  # IoU of the mask cut at logit +1 and at logit -1
AUTO_NMS_IOU = 0.7  # two candidates this similar are one segment
AUTO_MAX_COVER = 0.9  # a segment over 90% of the photo is the background
KINDS = ("sam",)  # model_type of Segment Anything (SAM 2/3 are not supported yet)
WANTED = (f"scenebreak needs a Segment Anything (SAM) checkpoint such as {DEFAULT_SEGMENTER} "
          "(SAM 2/3 are not supported yet)")


class Segmenter:
    """Segment Anything: the image is embedded once, then any number of prompts."""

    @one_builder_at_a_time
    def __init__(self, ref: str, device):
        from transformers import SamModel, SamProcessor

        folder, _ = transformers_model_of_kind(ref, "segmenter", "--segmenter", KINDS, WANTED)
        with loading_model("segmenter", ref, folder, "--segmenter"):
            self.processor = SamProcessor.from_pretrained(folder)
            self.model = SamModel.from_pretrained(folder, **in_fp32()).to(device.torch).eval()
        self.device = device

    def set_image(self, image) -> None:
        import torch

        longest = (getattr(self.processor.image_processor, "size", None) or {}).get("longest_edge")
        if longest and min(image.size) * longest < max(image.size) / 2:  # its short side would round to no pixel
            raise InvalidInput(f"the photo ({image.size[0]}x{image.size[1]}) is too thin for Segment Anything, which "
                               f"sees it {longest} pixels long: crop it to a less extreme shape")
        self.image = image
        inputs = self.processor(images=image, return_tensors="pt")
        with torch.inference_mode():
            self.embeddings = self.model.get_image_embeddings(inputs["pixel_values"].to(self.device.torch))
        self.pad = inputs["pixel_values"].shape[-2:]
        # The photo's size and the size it was scaled to: what maps prompts in and masks out.
        self.sizes = {key: inputs[key] for key in ("original_sizes", "reshaped_input_sizes")}

    def forget_image(self) -> None:
        """Let the photo and its embedding go (a kept segmenter waits for the next photo)."""
        self.image = self.embeddings = self.sizes = self.pad = None

    def prompt_tensors(self, input_points=None, input_labels=None, input_boxes=None) -> dict:
        """Prompts as SAM's processor makes them: coordinates scaled from the photo to the
        frame its embedding saw (x by new width / width, y by new height / height, in
        float64, boxes from float32, as it does). The processor would preprocess the
        whole photo again for each click (at 50 megapixels a 150 MB array and a resize)
        only to read those sizes."""
        import torch

        (height, width), (new_height, new_width) = (tuple(int(v) for v in self.sizes[key][0])
                                                    for key in ("original_sizes", "reshaped_input_sizes"))
        scale = np.array([new_width / width, new_height / height])
        prompts = {}
        if input_points is not None:
            prompts["input_points"] = torch.from_numpy(np.asarray(input_points, dtype=float) * scale)
        if input_labels is not None:
            prompts["input_labels"] = torch.tensor(input_labels, dtype=torch.int64)
        if input_boxes is not None:  # (the processor rounds boxes to float32 first)
            boxes = np.asarray(input_boxes, dtype=np.float32).astype(float)
            prompts["input_boxes"] = torch.from_numpy((boxes.reshape(-1, 2, 2) * scale).reshape(boxes.shape))
        return prompts

    def _on_device(self, tensor):
        """A prompt tensor on the model's device. SAM's processor gives coordinates in
        float64, which Apple's GPU (MPS) cannot hold: they go over as float32."""
        import torch

        if tensor.is_floating_point():
            return tensor.to(self.device.torch, torch.float32)
        return tensor.to(self.device.torch)

    def _run(self, multimask: bool, **prompts):
        """Low-resolution logits (objects, masks, h, w) and IoU estimates (the photo's
        sizes, which map them back to it, are `self.sizes`)."""
        import torch

        extra = {k: self._on_device(v) for k, v in self.prompt_tensors(**prompts).items()}
        with torch.inference_mode():
            out = self.model(image_embeddings=self.embeddings, multimask_output=multimask, **extra)
        return out.pred_masks[0].float().cpu(), out.iou_scores[0].float().cpu()

    def _full_size(self, logits) -> np.ndarray:
        """(objects, h, w) low-resolution logits -> (objects, H, W) uint8 masks, one at a
        time: the processor scales them up in float32, 200 MB a mask at 50 megapixels,
        which for --auto's dozens of candidates at once was gigabytes."""
        sizes = self.sizes
        height, width = (int(v) for v in sizes["original_sizes"][0])
        masks = np.empty((len(logits), height, width), np.uint8)
        for i in range(len(logits)):
            up = self.processor.post_process_masks(logits[None, i:i + 1, None], sizes["original_sizes"],
                                                   sizes["reshaped_input_sizes"])
            masks[i] = up[0][0, 0].numpy()
        return masks

    def from_boxes(self, boxes) -> list[tuple[np.ndarray, float]]:
        logits, iou = self._run(False, input_boxes=[[list(map(float, b)) for b in boxes]])
        masks = self._full_size(logits[:, 0])
        return [(masks[i], float(iou[i, 0])) for i in range(len(boxes))]

    def from_points(self, points, together: bool) -> list[tuple[np.ndarray, float]]:
        """One mask for all points (together) or one per point. A single click is
        ambiguous (a part or the whole?), so SAM proposes three and the best is taken."""
        if together:
            logits, iou = self._run(len(points) == 1, input_points=[[[list(p) for p in points]]],
                                    input_labels=[[[1] * len(points)]])
        else:
            logits, iou = self._run(True, input_points=[[[list(p)] for p in points]], input_labels=[[[1]] * len(points)])
        best = iou.argmax(dim=1)
        picked = logits[range(len(best)), best]
        masks = self._full_size(picked)
        return [(masks[i], float(iou[i, best[i]])) for i in range(len(best))]

    def from_clicks(self, points, labels, box=None) -> tuple[np.ndarray, float]:
        """One object's mask from clicks on it (label 1) and beside it (0), and perhaps
        a box around it. Clicks on it alone are `from_points(..., together=True)` and a
        box alone is `from_boxes`, so each gives what `mask --point`/`--box` gives."""
        if box is None and all(label == 1 for label in labels):
            return self.from_points(points, together=True)[0]
        if not points:
            return self.from_boxes([box])[0]
        prompts = {"input_points": [[[list(map(float, p)) for p in points]]], "input_labels": [[[int(v) for v in labels]]]}
        if box is not None:
            prompts["input_boxes"] = [[list(map(float, box))]]
        multimask = len(points) == 1 and box is None  # one click (a negative one) is as ambiguous as ever
        logits, iou = self._run(multimask, **prompts)
        best = int(iou[0].argmax())
        return self._full_size(logits[:1, best])[0], float(iou[0, best])

    def automatic(self, grid: int, limit: int, batch: int = 64) -> list[tuple[np.ndarray, float]]:
        """Up to `limit` distinct segments from a grid x grid of clicks, largest first.
        Each click gives three candidates; the confident and stable ones are kept,
        near-duplicates dropped (greedy non-maximum suppression by mask IoU, best
        first), and so is the background (a segment over most of the photo). All of
        this runs on SAM's low-resolution masks; only the survivors are upscaled."""
        import torch

        width, height = self.image.size
        xs, ys = (np.arange(grid) + 0.5) * width / grid, (np.arange(grid) + 0.5) * height / grid
        clicks = [[[float(x), float(y)]] for y in ys for x in xs]
        inputs = self.prompt_tensors(input_points=[clicks], input_labels=[[[1]] * len(clicks)])
        rh, rw = (int(v) for v in self.sizes["reshaped_input_sizes"][0])
        scores, logits_kept, small_kept = [], [], []
        for start in range(0, len(clicks), batch):
            with torch.inference_mode():
                out = self.model(image_embeddings=self.embeddings, multimask_output=True,
                                 input_points=self._on_device(inputs["input_points"][:, start:start + batch]),
                                 input_labels=self._on_device(inputs["input_labels"][:, start:start + batch]))
            logits = out.pred_masks[0].float().cpu().flatten(0, 1)
            iou = out.iou_scores[0].float().cpu().flatten()
            low = logits.shape[-1] / self.pad[-1]  # low-res pixels per input pixel
            valid = logits[:, :max(1, round(rh * low)), :max(1, round(rw * low))]  # the image, not the padding
            inner = (valid > 1.0).flatten(1).sum(1)
            stable = inner / (valid > -1.0).flatten(1).sum(1).clamp(min=1)
            keep = (iou >= AUTO_MIN_IOU) & (stable >= AUTO_MIN_STABILITY) & (inner > 0)
            step = max(1, max(valid.shape[-2:]) // 64)  # comparing masks at <= 64 px is enough
            scores.append(iou[keep])
            logits_kept.append(logits[keep].half())
            small_kept.append((valid[keep] > 0)[:, ::step, ::step].flatten(1))
        scores = torch.cat(scores)
        if not len(scores):
            return []
        small = torch.cat(small_kept).float()
        areas = small.sum(1)
        inter = small @ small.T
        similar = inter / (areas[:, None] + areas[None, :] - inter).clamp(min=1) > AUTO_NMS_IOU
        kept: list[int] = []
        for i in torch.argsort(scores, descending=True).tolist():
            if areas[i] <= AUTO_MAX_COVER * small.shape[1] and not similar[i, kept].any():
                kept.append(i)
        kept = sorted(kept, key=lambda i: -float(areas[i]))[:limit]
        if not kept:
            return []
        masks = self._full_size(torch.cat(logits_kept)[kept].float())
        return [(masks[n], float(scores[i])) for n, i in enumerate(kept)]
