"""CUDA graphs of the SAM-2 image encoder (Hiera + FPN + the decoder's conv_s0/s1), one per frame count.

Why: at the 8B shape the encoder's forward is a few thousand small kernels, so on an H100/H200 host it is
bound by their launches (about 60 ms for one 1024-px frame, most of it host time), and a batch that queues
the encode ahead of decoding stalled for as long on the host. A replayed graph issues the same kernels in
one call. Graphs are captured on first use for 1..``MAX_FRAMES`` frames (larger batches are long enough to
hide their launches and run eagerly), each with its own memory pool, since the early encode of a batch
(``fast_decode._SamEarly``) and a lazy one may replay on different streams.

CUDA only; ``TERRASCOPE_SAM2_GRAPH=0`` turns it off. A capture that fails is logged and the encoder stays
eager for the rest of the process: slower, never wrong.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger("terrascope.sam2_graph")
MAX_FRAMES = 4
ENV = "TERRASCOPE_SAM2_GRAPH"


@dataclass
class _Entry:
    graph: torch.cuda.CUDAGraph
    inputs: torch.Tensor  # static [n, 3, H, W] in the model dtype
    outputs: list[torch.Tensor]  # static feature maps, overwritten by every replay


class Sam2EncoderGraphs:
    """``encode(g)``: the feature maps of ``body(g)`` via a graph replay, or None where no graph applies."""

    def __init__(self, body: Callable[[torch.Tensor], list[torch.Tensor]]) -> None:
        self.body = body
        self.entries: dict[tuple, _Entry] = {}
        self.disabled_reason = ""

    @staticmethod
    def wanted(g: torch.Tensor) -> bool:
        return g.device.type == "cuda" and 1 <= g.shape[0] <= MAX_FRAMES and os.environ.get(ENV, "1") != "0"

    def encode(self, g: torch.Tensor) -> list[torch.Tensor] | None:
        if self.disabled_reason or not self.wanted(g):
            return None
        key = (tuple(g.shape), g.dtype, g.device)
        entry = self.entries.get(key)
        if entry is None:
            entry = self._capture(key, g)
            if entry is None:
                return None
        entry.inputs.copy_(g)
        entry.graph.replay()
        return [t.clone() for t in entry.outputs]  # the next replay overwrites the static outputs

    def _capture(self, key: tuple, g: torch.Tensor) -> _Entry | None:
        from .fast_decode import _CAPTURE_LOCK  # one capture at a time in the process

        try:
            with _CAPTURE_LOCK:
                inputs = g.clone()
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):  # warm-up: cuDNN/cuBLAS plans and workspaces, outside capture
                    for _ in range(2):
                        self.body(inputs)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    outputs = self.body(inputs)
        except Exception as exc:  # noqa: BLE001 - a graph is an optimisation: eager still gives the answer
            self.disabled_reason = f"{type(exc).__name__}: {exc}"
            log.warning("SAM-2 encoder graph capture failed (%s); the encoder runs eagerly",
                        self.disabled_reason.splitlines()[0])
            return None
        entry = _Entry(graph, inputs, list(outputs))
        self.entries[key] = entry
        return entry
