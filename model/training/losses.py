"""Training losses (paper Eq. 6): L = L_LM + lambda * (Dice + BCE) over the masks of every [SEG]."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def dice_bce_per_mask(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """[N, K, h, w] candidate logits vs [N, h, w] soft targets -> [N, K] soft Dice + mean pixel BCE.

    Per candidate, so the caller can train the best of SAM-2's multimask outputs (as SAM does).
    """
    if logits.shape[0] != target.shape[0] or logits.shape[-2:] != target.shape[-2:]:
        raise ValueError(f"mask logits {tuple(logits.shape)} and targets {tuple(target.shape)} differ")
    logits = logits.float()
    tgt = target.float()[:, None].expand_as(logits)
    bce = F.binary_cross_entropy_with_logits(logits, tgt, reduction="none").flatten(2).mean(-1)
    p = logits.sigmoid().flatten(2)
    tf = tgt.flatten(2)
    dice = 1.0 - (2.0 * (p * tf).sum(-1) + eps) / (p.sum(-1) + tf.sum(-1) + eps)
    return dice + bce


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice over each mask (N,H,W), averaged over masks (a monitor of the chosen mask)."""
    p = logits.float().sigmoid().flatten(1)
    t = target.float().flatten(1)
    return (1.0 - (2.0 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)).mean()


def mask_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of (logits > 0) vs (target > 0.5) per mask (a training-time monitor, not a loss)."""
    p = logits > 0
    t = target > 0.5
    inter = (p & t).flatten(1).sum(1).float()
    union = (p | t).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
