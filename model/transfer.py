"""Moving images and masks between the host and the model's device, and the host threads that prepare them.

Why a module of its own: on CUDA the GPU idles whenever the host copies or resizes on the generation path
(a batch of 32 spent ~80 ms that way, docs/PERFORMANCE.md run 12), so these helpers stage, upload and
normalise off that path; on a CPU they are plain copies. ``generation`` and training both use them.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .modeling_terrascope import TerraScopeModel
from .preprocess import sam2_resize

_HOST_POOL: ThreadPoolExecutor | None = None
_HOST_POOL_LOCK = threading.Lock()


def host_copy(t: torch.Tensor) -> np.ndarray:
    """``t.cpu().numpy()``, through pinned memory on CUDA: a batch's masks (32 x 896 x 896) took 5 ms a copy
    through pageable memory. The array views the pinned block, which returns to torch's cache when freed."""
    if t.device.type != "cuda":
        return t.cpu().numpy()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    torch.cuda.current_stream().synchronize()
    return host.numpy()


def normalize_pixels(x: torch.Tensor, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] tensor -> float32 [N, 3, H, W] on its device: /255, then (x - mean) / std.

    The same float32 operations as ``preprocess.normalize_tiles`` / ``sam2_pixels``, each correctly rounded,
    so bit-identical to them on any device. Inference (``normalized_on``) and training both call this.
    """
    dev = x.device
    # the divisors are device tensors: CUDA turns a division by a host scalar into a multiplication by its
    # reciprocal, which rounds differently
    full = torch.full((1, 1, 1, 1), 255.0, dtype=torch.float32, device=dev)
    x = x.permute(0, 3, 1, 2).to(torch.float32) / full
    m = torch.from_numpy(mean).to(dev).view(1, 3, 1, 1)
    s = torch.from_numpy(std).to(dev).view(1, 3, 1, 1)
    return ((x - m) / s).contiguous()


def normalized_on(model: TerraScopeModel, pixels: np.ndarray | Sequence[np.ndarray], mean: np.ndarray,
                  std: np.ndarray) -> torch.Tensor:
    """``normalize_pixels`` of host uint8 pixels [N, H, W, 3] (or parts of them, concatenated on N), on the
    model's device.

    On the device because the host spent more time on this arithmetic (and on copying 4x the bytes) than on
    tiling (about 27 ms for a 4-tile + thumbnail image on 2 cores).
    """
    parts = [pixels] if isinstance(pixels, np.ndarray) else list(pixels)
    dev = model.device
    if dev.type == "cuda":
        return normalize_pixels(_STAGE.upload(parts, dev), mean, std)
    whole = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return normalize_pixels(torch.from_numpy(np.require(whole, np.uint8, ["C", "W"])), mean, std)


class _PinnedStage:
    """One reusable pinned host buffer for uploading uint8 pixels: ``pin_memory()`` on a fresh 12 MB array
    spent ~8 ms in ``cudaHostAlloc`` per batch with the GPU idle. The next upload waits for the last copy
    out of the buffer (an event; long done in practice) before overwriting it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.buf: torch.Tensor | None = None
        self.done: torch.cuda.Event | None = None

    def upload(self, parts: Sequence[np.ndarray], device: torch.device) -> torch.Tensor:
        """``parts`` concatenated on their first axis, copied once into the pinned buffer, then to ``device``."""
        shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
        if any(tuple(p.shape[1:]) != shape[1:] for p in parts):
            raise ValueError(f"pixel parts differ in shape: {[tuple(p.shape) for p in parts]}")
        with self.lock:
            if self.done is not None:
                self.done.synchronize()
            n = math.prod(shape)
            if self.buf is None or self.buf.numel() < n:
                self.buf = torch.empty(n, dtype=torch.uint8, pin_memory=True)
            host = self.buf[:n].view(shape).numpy()
            start = 0
            for p in parts:
                np.copyto(host[start:start + p.shape[0]], p, casting="unsafe")
                start += p.shape[0]
            with torch.cuda.device(device):  # the event must follow the copy's stream, on its device
                out = self.buf[:n].view(shape).to(device, non_blocking=True)
                self.done = torch.cuda.Event()
                self.done.record()
            return out


_STAGE = _PinnedStage()


def host_pool() -> ThreadPoolExecutor:
    """Threads for host image work (tiling, SAM-2 resizes, big-mask selection): PIL and numpy release the GIL."""
    global _HOST_POOL
    with _HOST_POOL_LOCK:  # requests on several threads may ask first at once: one pool
        if _HOST_POOL is None:
            _HOST_POOL = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="ts-host")
        return _HOST_POOL


_UPLOAD_STREAMS: dict[torch.device, torch.cuda.Stream] = {}
_UPLOAD_LOCK = threading.Lock()


def sam_frame_on(device: torch.device, pixels: np.ndarray, size: int) -> torch.Tensor:
    """An image's SAM-2 input resize, uploaded as uint8 to ``device`` from a host-pool thread on a side stream
    (the copy is finished when this returns). At the first [SEG] the upload through the main thread's
    staging buffer kept the GPU idle for ~5 ms."""
    frame = np.require(sam2_resize(pixels, size), np.uint8, ["C", "W"])  # PIL arrays are read-only
    with _UPLOAD_LOCK:
        stream = _UPLOAD_STREAMS.get(device)
        if stream is None:
            stream = _UPLOAD_STREAMS[device] = torch.cuda.Stream(device)
    with torch.cuda.device(device), torch.cuda.stream(stream):
        return torch.from_numpy(frame).to(device)
