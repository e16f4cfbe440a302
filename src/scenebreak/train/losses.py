"""The three loss terms of Break-A-Scene, as pure tensor functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_diffusion_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over all elements of (m*pred - m*target)^2: pixels outside the mask
    contribute nothing (the paper's reduction, not divided by the mask area)."""
    return F.mse_loss(mask * pred.float(), mask * target.float(), reduction="mean")


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(pred.float(), target.float(), reduction="mean")


def attention_loss(token_maps: torch.Tensor, masks: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over handles of MSE(map / max(map), mask).

    token_maps: (k, s, s) cross-attention of each chosen handle, averaged over heads
    and layers; masks: (k, s, s) those handles' masks at the same size; weights: (k,)
    1 for a handle the step chose, 0 for a slot that only keeps the shapes the same
    from step to step (the trainer's: one slot per handle of the scene).
    """
    peak = token_maps.flatten(1).amax(dim=1).clamp_min(1e-12).view(-1, 1, 1)
    per_handle = ((token_maps / peak - masks.float()) ** 2).flatten(1).mean(dim=1)
    return per_handle.sum() if weights is None else (per_handle * weights).sum()


def downsample_masks(masks: torch.Tensor, size: int) -> torch.Tensor:
    """(N, H, W) binary masks -> (N, size, size), torch's nearest neighbour: each cell
    takes the top-left pixel of its block, half a cell off the centre. The paper's code
    downsamples its loss and attention masks exactly so, and training follows it
    (`blending.latent_mask`, for editing, samples the cell centres instead)."""
    return F.interpolate(masks[:, None].float(), size=(size, size), mode="nearest")[:, 0]
