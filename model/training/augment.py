"""Augmentation of the SAM-2 side's training inputs: symmetries, scale crops and radiometric jitter.

Why: the SAM-2 side of a small model sees a few hundred real building tiles. Trained on them for many epochs,
it fits them far better than held-back tiles of the same cities (terrascope-mini's phase 3: train IoU 0.46,
GT-prompted validation IoU 0.28; docs/TRAINING.md). Each transform here makes a view that is as real as the
tile: a nadir tile turned or mirrored, the same scene at a coarser or finer ground sampling distance, or under
other sun, haze and sensor response. Masks move with their image, and a crop never drops more than half of a
mask, so every target stays the ground truth of its view. Only the SAM-2 input changes; the LLM side keeps the
untouched image its text was written for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["Sam2Augment", "dihedral", "photometric", "scale_crop"]

MIN_KEPT = 0.5  # a crop must keep at least this share of every mask's pixels of its frame


def dihedral(x: torch.Tensor, ks: torch.Tensor, dims: tuple[int, int]) -> torch.Tensor:
    """Item i turned by ``ks[i] % 4`` quarter turns, then mirrored when ``ks[i] >= 4`` (square images only)."""
    out = []
    for item, k in zip(x, ks.tolist()):
        d = (dims[0] - 1, dims[1] - 1)  # the item has lost the batch axis
        y = torch.rot90(item, k % 4, d)
        out.append(torch.flip(y, (d[1],)) if k >= 4 else y)
    return torch.stack(out) if out else x


def photometric(pixels: torch.Tensor, strength: float, gen: torch.Generator | None = None) -> torch.Tensor:
    """uint8 [F, H, W, 3] -> the same frames with brightness, contrast and saturation each scaled by a random
    factor in [1 - strength, 1 + strength] (one draw per frame and property)."""
    if strength <= 0 or pixels.shape[0] == 0:
        return pixels
    n = pixels.shape[0]
    dev = pixels.device
    factors = 1.0 + (torch.rand(3, n, 1, 1, 1, generator=gen, device="cpu").to(dev) * 2 - 1) * strength
    x = pixels.to(torch.float32) * factors[0]
    weights = torch.tensor([0.299, 0.587, 0.114], device=dev)
    gray = (x * weights).sum(-1, keepdim=True)
    mean = gray.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * factors[1] + mean
    gray = (x * weights).sum(-1, keepdim=True)
    x = gray + (x - gray) * factors[2]
    return x.round().clamp(0, 255).to(torch.uint8)


def scale_crop(pixels: torch.Tensor, target: torch.Tensor, seg_frame: torch.Tensor, min_side: float,
               gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A random square crop of each frame (side in [min_side, 1] of the frame), resized back to the frame's size,
    with the masks of that frame ([S, h, w] float in [0, 1], ``seg_frame[s]`` = frame of mask s) cropped at the
    same place. A frame whose crop would keep less than ``MIN_KEPT`` of any of its masks stays whole."""
    if min_side >= 1 or pixels.shape[0] == 0:
        return pixels, target
    if pixels.shape[1] % target.shape[-1]:
        raise ValueError(f"SAM-2 input {pixels.shape[1]}px is not a multiple of its {target.shape[-1]}px masks")
    n, size = pixels.shape[0], pixels.shape[1]
    tsize = target.shape[-1]
    frames = seg_frame.tolist()
    boxes = []  # per frame: (y0, x0, side) as shares of the frame
    for a, b, c in torch.rand(n, 3, generator=gen).tolist():
        side = min_side + (1 - min_side) * a
        boxes.append(((1 - side) * b, (1 - side) * c, side))

    def window(share: tuple[float, float, float], px: int) -> tuple[int, int, int]:
        """The crop on a px grid, placed on the mask grid first so that image and mask crops align exactly."""
        y, x, k = round(share[0] * tsize), round(share[1] * tsize), max(1, round(share[2] * tsize))
        scale = px // tsize
        return y * scale, x * scale, k * scale

    wins = [window(boxes[f], tsize) for f in frames]  # each mask's crop on the mask grid
    whole: set[int] = set()
    if frames:  # one host sync for every mask's total and in-crop pixel count
        inside = torch.stack([target[s, y:y + k, x:x + k].sum() for s, (y, x, k) in enumerate(wins)])
        totals, kept = torch.stack([target.sum((1, 2)), inside]).tolist()
        whole = {f for f, t, k in zip(frames, totals, kept) if t > 0 and k < MIN_KEPT * t}
    out_px, out_t = pixels.clone(), target.clone()
    for f in set(range(n)) - whole:
        y, x, k = window(boxes[f], size)
        crop = pixels[f, y:y + k, x:x + k].permute(2, 0, 1)[None].to(torch.float32)
        out_px[f] = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)[0] \
            .permute(1, 2, 0).round().clamp(0, 255).to(pixels.dtype)
    for s, (f, (y, x, k)) in enumerate(zip(frames, wins)):
        if f not in whole:
            out_t[s] = F.interpolate(target[s, y:y + k, x:x + k][None, None], size=(tsize, tsize), mode="bilinear",
                                     align_corners=False)[0, 0]
    return out_px, out_t


@dataclass(frozen=True)
class Sam2Augment:
    """One stage's SAM-2 input augmentation (``StageConfig.sam2_*``); the default changes nothing."""

    dihedral: bool = False
    photometric: float = 0.0
    crop_min_side: float = 1.0

    @property
    def active(self) -> bool:
        return self.dihedral or self.photometric > 0 or self.crop_min_side < 1

    def __call__(self, pixels: torch.Tensor, target: torch.Tensor, seg_frame: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 frames [F, H, W, 3] and their masks [S, h, w] -> one random view of both."""
        pixels, target = scale_crop(pixels, target, seg_frame, self.crop_min_side)
        if self.dihedral:
            ks = torch.randint(0, 8, (pixels.shape[0],), device=pixels.device)
            pixels, target = dihedral(pixels, ks, (1, 2)), dihedral(target, ks[seg_frame], (1, 2))
        return photometric(pixels, self.photometric), target
