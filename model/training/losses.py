"""Training losses (paper Eq. 6): L = L_LM + lambda * (Dice + BCE) over the masks of every [SEG]."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Next-token cross-entropy; ``labels`` are aligned with ``logits`` positions already shifted.

    ``labels[b, t]`` is the token that position t must predict, or IGNORE_INDEX (prompt, injected region
    tokens, measurement spans, padding). Returns the mean loss and the number of counted tokens.
    """
    n = int((labels != IGNORE_INDEX).sum())
    if n == 0:
        return logits.sum() * 0.0, 0
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss / n, n


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice over each mask (N,H,W), averaged over masks (LISA/Sa2VA style, smoothed by eps)."""
    p = logits.float().sigmoid().flatten(1)
    t = target.float().flatten(1)
    inter = (p * t).sum(1)
    return (1.0 - (2.0 * inter + eps) / (p.sum(1) + t.sum(1) + eps)).mean()


def bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())


def seg_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dice + BCE on mask logits vs binary targets of the same (N,H,W) shape."""
    if logits.shape != target.shape:
        raise ValueError(f"mask logits {tuple(logits.shape)} and targets {tuple(target.shape)} differ")
    if logits.numel() == 0:
        return logits.sum() * 0.0
    return dice_loss(logits, target) + bce_loss(logits, target)


def mask_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of (logits > 0) vs target per mask (a training-time monitor, not a loss)."""
    p = logits > 0
    t = target > 0.5
    inter = (p & t).flatten(1).sum(1).float()
    union = (p | t).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
