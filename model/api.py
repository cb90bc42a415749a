"""Public API used by the worker: ``TerraScope.load(...)`` once, then ``answer(...)`` per question.

    ts = TerraScope.load("tests/fixtures/terrascope-official-tiny/checkpoint")   # or "terrascope-mini"
    res = ts.answer([ImageInput(pixels)], "How much of the image is water?", ["10%", "25%", "40%", "60%"],
                    on_token=print, on_mask=lambda step: ...)

Images are HxWx3 uint8 arrays with roles "optical", "sar" (a pair), or "t0", "t1", ... (a series).
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import fast_decode
from .configuration_terrascope import PRESETS, preset_config, preset_weights_dir
from .generation import GenerationTrace, Generator, VisualContext, prepare_images
from .loading import CheckpointError, load_model, random_model
from .modeling_terrascope import TerraScopeModel
from .prompting import TokenizerWrapper
from .types import (
    AnswerResult,
    GenerationSettings,
    GroundingFn,
    ImageInput,
    MaskCallback,
    StopFn,
    TokenCallback,
)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


def _resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


class TerraScope:
    """A loaded model + tokenizer, ready to answer questions about images."""

    def __init__(self, model: TerraScopeModel, tokenizer: TokenizerWrapper, source: str,
                 preset: str | None = None, load_info: dict[str, Any] | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.source = source
        self.preset = preset
        self.load_info = load_info or {}
        self.generator = Generator(model, tokenizer)

    # ---- construction ------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path_or_preset: str, device: str = "auto", dtype: str | None = None,
             compat: str | None = None, *, sam2_arch: dict[str, Any] | None = None) -> TerraScope:
        """Load an official release folder, a native folder, or a preset name (whose weights must exist).

        ``compat`` overrides the checkpoint's mode ("official" or "native"); ``sam2_arch`` overrides SAM-2
        fields the official layout cannot encode in tensor shapes (e.g. global attention blocks).
        """
        dev = _resolve_device(device)
        dt = _resolve_dtype(dtype, dev)
        preset = None
        folder = Path(path_or_preset)
        if path_or_preset in PRESETS:
            preset = path_or_preset
            found = preset_weights_dir(path_or_preset)
            if found is None:
                raise CheckpointError(
                    f"preset {path_or_preset!r} has no weights in this checkout; train or download them "
                    "first (use model.loading.random_model(preset_config(name)) for a random-weight model)")
            folder = found
        model, info = load_model(folder, dev, dt, sam2_override=sam2_arch)
        if compat is not None:
            model.config.compat = compat
            model.config.validate()
        tokenizer = TokenizerWrapper(folder)
        if len(tokenizer) > model.config.llm.vocab_size:
            raise CheckpointError(f"{folder}: tokenizer has {len(tokenizer)} tokens but the LLM only "
                                  f"{model.config.llm.vocab_size}")
        return cls(model, tokenizer, str(folder), preset, info)

    @classmethod
    def random(cls, preset_or_config: Any, tokenizer_dir: str | Path, device: str = "auto",
               dtype: str | None = None, seed: int = 0) -> TerraScope:
        """A random-weight model of a preset's (or config's) shape, for benches and tests."""
        dev = _resolve_device(device)
        cfg = preset_config(preset_or_config) if isinstance(preset_or_config, str) else preset_or_config
        model = random_model(cfg, dev, _resolve_dtype(dtype, dev), seed)
        return cls(model, TokenizerWrapper(tokenizer_dir), "random", cfg.name)

    # ---- questions ------------------------------------------------------------------------------------------
    def prepare(self, images: list[ImageInput]) -> VisualContext:
        """Encode images once (ViT); pass the result to ``answer`` / ``answer_batch`` to reuse it."""
        return prepare_images(self.model, images)

    def answer(self, images: list[ImageInput] | VisualContext, question: str, options: list[str] | None = None,
               *, settings: GenerationSettings | None = None, on_token: TokenCallback | None = None,
               on_mask: MaskCallback | None = None, grounding: GroundingFn | None = None,
               should_stop: StopFn | None = None, forced_prefix: str | None = None,
               trace: GenerationTrace | None = None) -> AnswerResult:
        """Answer one question. ``forced_prefix`` teacher-forces the start of the reply (tests, demos)."""
        ctx = images if isinstance(images, VisualContext) else self.prepare(list(images))
        forced = self.tokenizer.encode(forced_prefix) if forced_prefix else None
        return self.generator.run(ctx, question, options, settings, on_token, on_mask, grounding, should_stop,
                                  forced_ids=forced, trace=trace)

    def answer_batch(self, images: list[ImageInput] | VisualContext, questions: list[str],
                     options: list[list[str] | None] | list[str] | None = None,
                     settings: GenerationSettings | None = None) -> list[AnswerResult]:
        """Several questions about the same images: the ViT tokens and SAM-2 embeddings are computed once.

        ``options`` is one list per question, or one list shared by all questions.
        """
        if not questions:
            return []
        if options is None or (options and all(isinstance(o, str) for o in options)):
            per_q = [options] * len(questions)
        else:
            per_q = list(options)
            if len(per_q) != len(questions):
                raise ValueError(f"{len(questions)} questions but {len(per_q)} option lists")
        ctx = images if isinstance(images, VisualContext) else self.prepare(list(images))
        # ---- GPU fast path (model/fast_decode.py, GPU engineer): one static-cache batch, prefix prefilled once
        if fast_decode.enabled(self.model, settings):
            return fast_decode.answer_many(self.generator, [fast_decode.Question(ctx, q, o)
                                                            for q, o in zip(questions, per_q)], settings)
        return [self.generator.run(ctx, q, o, settings) for q, o in zip(questions, per_q)]

    def warm_up(self) -> float:
        """One short forced question on a blank tile, so no user's first answer pays the one-time costs.

        On CUDA the fast path compiles its elementwise kernels and the decode-attention kernel, captures the
        decode and injection CUDA graphs of the first length buckets, and initialises cuBLAS/cuDNN; that is
        seconds to tens of seconds, once per process. Elsewhere nothing is paid later, so nothing runs.
        Returns the seconds spent.
        """
        if self.model.device.type != "cuda":
            return 0.0
        t0 = time.perf_counter()
        tile = np.full((448, 448, 3), 128, np.uint8)
        settings = GenerationSettings(max_new_tokens=24, max_seg=1)
        ctx = self.prepare([ImageInput(tile)])
        self.answer(ctx, "Please segment the buildings.", settings=settings, forced_prefix="<think>[SEG]")
        # a question too long for the prompt graph runs eagerly through shape-generic compiled kernels:
        # compile those now too (one question, as the worker asks them)
        long_question = " ".join(["Which share of the fields along the river is flooded?"] * 12)
        self.answer(ctx, long_question, settings=GenerationSettings(max_new_tokens=4, max_seg=0))
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    # ---- description -----------------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        import transformers

        cfg = self.model.config
        return {
            "name": cfg.name,
            "preset": self.preset,
            "source": self.source,
            "format": cfg.format,
            "device": str(self.model.device),
            "dtype": str(self.model.dtype).replace("torch.", ""),
            "params": int(sum(p.numel() for p in self.model.parameters())),
            "max_tokens_per_seg": cfg.max_tokens_per_seg,
            "template": cfg.template,
            "compat": cfg.compat,
            "vocab": len(self.tokenizer),
            "skipped_tensors": len(self.load_info.get("skipped", [])),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "numpy": np.__version__, "python": platform.python_version()},
        }
