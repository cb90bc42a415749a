"""Dataset records -> training sequences built exactly as ``model.generation`` builds them at inference.

Every choice that must match the runtime goes through the runtime's own functions: the prompt
(``prompting.build_prompt``), the image tiling (``preprocess``), the region-token selection from a mask
(``selection``: >50% cell coverage then λ sampling) and the tokenisation of each piece (the trace is cut at
each ``[SEG]`` and the grounding span is encoded on its own, as the generator feeds it). The only
difference is where masks come from: ground truth here, SAM-2 at inference (paper §3.2).

A training sequence for a trace with one [SEG] looks like::

    prompt (image tokens)  <think>... [SEG] <REGION>xK [area ...]  ...</think><answer>B</answer><|im_end|>
    labels: ---- ignored ----|---- target ----|- ignored -|- ignored -|---------- target ----------------

Region and grounding positions are inputs, never targets (the LM loss excludes injected visual tokens).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from model import prompting, selection
from model.configuration_terrascope import TerraScopeConfig
from model.data import numbers
from model.preprocess import resize_to, sam2_resize, tile_images

from .losses import IGNORE_INDEX
from .options import OptionPlan, nearest_letter, plan_for, redraw, rewrite

SEG = "[SEG]"
_LETTER = re.compile(r"^\s*[A-H][.)]\s*")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


class DataError(ValueError):
    """A dataset record that cannot be turned into a training sample; the message names it."""


# ---- files ------------------------------------------------------------------------------------------------
def read_image(path: Path) -> np.ndarray:
    """HxWx3 uint8 from a PNG/JPEG/TIFF image or a .npy/.npz array."""
    if path.suffix in (".npy", ".npz"):
        arr = np.load(path)
        if isinstance(arr, np.lib.npyio.NpzFile):
            arr = arr[arr.files[0]]
    else:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise DataError(f"{path}: expected an HxWx3 uint8 image, got {arr.shape} {arr.dtype}")
    return np.ascontiguousarray(arr)


def read_mask(path: Path) -> np.ndarray:
    """Bool HxW from a PNG (non-zero = in), a .npy array, or a .npz with ``packed`` + ``shape`` (np.packbits)."""
    if path.suffix == ".npz":
        with np.load(path) as z:
            if "packed" in z.files:
                shape = tuple(int(s) for s in z["shape"])
                return np.unpackbits(z["packed"], count=shape[0] * shape[1]).reshape(shape).astype(bool)
            return np.asarray(z[z.files[0]]).astype(bool)
    if path.suffix == ".npy":
        return np.load(path).astype(bool)
    with Image.open(path) as im:
        arr = np.asarray(im)
    if arr.ndim == 3:
        arr = arr[..., 0]
    return arr != 0


def read_text(path: Path) -> str:
    """A UTF-8 text file, gunzipped when it ends in .gz (packs compress their records)."""
    if path.suffix == ".gz":
        import gzip

        return gzip.decompress(path.read_bytes()).decode("utf-8")
    return path.read_text(encoding="utf-8")


def load_records(data_dir: str | Path, splits: Sequence[str] = ("train",), kinds: Sequence[str] | None = None
                 ) -> list[dict]:
    """All records of the dataset folder (every ``*.jsonl`` in it), filtered by split and kind."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"dataset folder not found: {data_dir} (build it with python -m model.data.build)")
    files = sorted([*data_dir.glob("*.jsonl"), *data_dir.glob("*.jsonl.gz")])
    if not files:
        raise DataError(f"{data_dir}: no *.jsonl (or *.jsonl.gz) record files")
    out = []
    for f in files:
        for n, line in enumerate(read_text(f).splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{f}:{n}: invalid JSON ({exc.msg})") from None
            if rec.get("split", "train") not in splits:
                continue
            if kinds is not None and rec.get("kind") not in kinds:
                continue
            rec["_base"] = str(f.parent)
            out.append(rec)
    seen: dict[str, int] = {}
    for rec in out:  # ids key the device banks: make them unique even if a file repeats one
        rid = str(rec.get("id", "?"))
        seen[rid] = seen.get(rid, 0) + 1
        rec["id"] = rid if seen[rid] == 1 else f"{rid}#{seen[rid]}"
    return out


# ---- images as the runtime sees them -----------------------------------------------------------------------
def image_kind(roles: list[str]) -> str:
    """single | pair | series, with the runtime's validation (same rules as ``generation._roles``)."""
    if len(roles) == 1:
        return "single"
    if sorted(roles) == ["optical", "sar"]:
        return "pair"
    if roles == [f"t{i}" for i in range(len(roles))]:
        return "series"
    raise DataError(f"image roles {roles} are not one image, an optical+sar pair, or t0..tn")


@dataclass
class PreparedImages:
    """ViT tiles (uint8), SAM-2 inputs (uint8) and the prompt's token blocks for one record's images."""

    kind: str
    roles: list[str]
    tiles: np.ndarray  # [T, 448, 448, 3] uint8, every image's tiles in prompt order
    sam: list[np.ndarray]  # per image [S, S, 3] uint8
    layouts: list  # preprocess.TileLayout per image
    token_counts: list[int]
    offsets: list[int]
    order: list[int]  # record image index -> position in the runtime's image order


def prepare_images(cfg: TerraScopeConfig, pixels: list[np.ndarray], roles: list[str]) -> PreparedImages:
    """``generation.prepare_images`` without the ViT: the same tiling (``preprocess.tile_images``)."""
    kind = image_kind(roles)
    order = list(range(len(pixels)))
    if kind == "pair":
        o, s = roles.index("optical"), roles.index("sar")
        pixels = [pixels[o], resize_to(pixels[s], pixels[o].shape[:2])]
        roles = ["optical", "sar"]
        order = [0, 1] if o == 0 else [1, 0]
    tiles, layouts = tile_images(cfg, pixels, kind)
    counts = [lay.n_tiles * cfg.tokens_per_tile for lay in layouts]
    offsets = [int(x) for x in np.cumsum([0] + counts[:-1])]
    sam = [sam2_resize(p, cfg.sam2.image_size) for p in pixels]
    return PreparedImages(kind, roles, np.concatenate(tiles), sam, layouts, counts, offsets, order)


def region_indices(cfg: TerraScopeConfig, mask: np.ndarray, layout, kind: str = "single",
                   lam: int | None = None) -> list[int]:
    """Local token indices a mask injects (native rule: >50% coverage, then λ sampling)."""
    if cfg.compat != "native":
        # official checkpoints select with the release's rule (PIL NEAREST, λ=8)
        lam = lam or cfg.max_tokens_per_seg
        if kind == "single":
            return selection.official_tiled(mask, layout, cfg.tokens_per_side, lam)
        return selection.official_single_tile(mask, layout.tile, cfg.tokens_per_side, lam)
    side = cfg.tokens_per_side
    cov = selection.cell_coverage(mask, side * layout.rows, side * layout.cols)
    local = selection._tile_order(cov > 0.5, side, layout.cols, layout.rows)
    return selection.uniform_sample(local, side, layout.cols, lam or cfg.max_tokens_per_seg)


def lowres_target(mask: np.ndarray, size: int) -> np.ndarray:
    """GT mask -> soft target on the SAM-2 low-res grid (area average), uint8 0..255."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    if mask.shape[0] >= size and mask.shape[1] >= size:
        t = F.adaptive_avg_pool2d(t, (size, size))
    else:
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    return (t[0, 0].numpy() * 255).round().astype(np.uint8)


# ---- one record ------------------------------------------------------------------------------------------------
@dataclass
class SegItem:
    image: int  # index in the runtime's image order
    local: list[int]  # region token indices inside the image's block
    target: np.ndarray  # uint8 soft mask on the low-res grid
    present: bool
    grounding: str | None


@dataclass(frozen=True)
class Restatement:
    """Where a trace restates the measured value of one [SEG]'s span ("... gives 34.0%. The option ...").

    Why: with span jitter, the span says 36.1% while the text still says the true 34.0%, so the model learns
    to write the answer's value whatever the span says, and at inference ignores the span it is given. The
    restated value is rewritten from the jittered span, so copying the span is what the target teaches; the
    option it then names is still the nearest one (jitter < half the 15 % gap between options).
    """

    piece: int  # index of the text piece holding the value (the one after the [SEG])
    text: str  # that piece's text
    value_text: str  # the value as written there ("34.0%", "273 ha", "20")
    op: str  # "area" | "coverage" | "count"
    unit: str | None  # area unit of the answer ("ha", "m²")


_SPAN_FIELDS = {
    "area": re.compile(r"area (\d+(?:\.\d+)?) (ha|m²|km²)"),
    "coverage": re.compile(r"(\d+(?:\.\d+)?)% of valid area"),
    "count": re.compile(r"(\d+) objects?\b"),
}


def restated_value(span: str, op: str, unit: str | None) -> str | None:
    """The value a trace writes for ``op``, read from a measurement span; None if the span lacks it."""
    m = _SPAN_FIELDS[op].search(span)
    if m is None:
        return None
    if op == "area":
        return numbers.fmt_area(float(m.group(1)) * numbers.AREA_M2[m.group(2)], unit)
    if op == "coverage":
        return numbers.fmt_pct(float(m.group(1)))
    return numbers.fmt_count(int(m.group(1)))


def find_restatement(rec: dict, texts: list[str], exact: bool = True) -> Restatement | None:
    """The restated value of a one-mask area/coverage/count record, if its trace writes it after the [SEG].

    ``exact=False`` also accepts a span rounder than the written value: option redraw names the option
    nearest whatever the span says, so a coarse span cannot contradict the letter there.
    """
    check = rec.get("check") or {}
    op, segs, value = check.get("op"), check.get("segs") or [], check.get("value_text")
    if op not in _SPAN_FIELDS or len(segs) != 1 or not isinstance(value, str) or len(texts) < segs[0] + 2:
        return None
    piece = segs[0] + 1
    metas = rec.get("seg_masks") or []
    span = metas[segs[0]].get("grounding") if segs[0] < len(metas) else None
    if value not in texts[piece] or not isinstance(span, str):
        return None
    restated = restated_value(span, op, check.get("unit"))
    # exact: only where the unjittered span gives back the written value, since a span rounder than the options
    # (0.01 ha for 0.0113 ha) would teach copying a value that points at the wrong option
    if restated is None or (exact and restated != value):
        return None
    return Restatement(piece, texts[piece], value, op, check.get("unit"))


@dataclass
class Example:
    """A record tokenised and prepared once; ``sequence()`` assembles the ids (span jitter per draw)."""

    id: str
    kind: str
    task: str
    images: PreparedImages
    prompt_ids: list[int]
    pieces: list[list[int]]  # text pieces around the [SEG]s (len = n_seg + 1), eos appended to the last
    segs: list[SegItem]
    question_ids: list[int]
    image_keys: list[str] = field(default_factory=list)
    restate: Restatement | None = None
    options: OptionPlan | None = None  # options drawn again per draw (model/training/options.py)

    @property
    def n_seg(self) -> int:
        return len(self.segs)


def strip_letter(choice: str) -> str:
    """"B. 12.3 ha" -> "12.3 ha" (``build_prompt`` adds the letters itself)."""
    return _LETTER.sub("", choice, count=1)


def jitter_span(span: str, rel: float, rng: np.random.Generator) -> str:
    """Scale the numbers of a grounding span by one random factor in [1-rel, 1+rel] (counts rounded).

    At inference the span is measured on the PREDICTED mask, so its numbers are near, not equal to, the
    true answer; training on perturbed spans teaches the model to choose the nearest option.
    """
    if rel <= 0:
        return span
    f = 1.0 + rng.uniform(-rel, rel)

    def repl(m: re.Match) -> str:
        s = m.group(0)
        if "." in s:
            dec = len(s.split(".")[1])
            return f"{float(s) * f:.{dec}f}"
        return str(max(0, round(int(s) * (1.0 + rng.uniform(-rel, rel)))))

    return _NUMBER.sub(repl, span)


class ExampleBuilder:
    """Turns records into ``Example``s for one model config and tokenizer (images cached by path)."""

    def __init__(self, cfg: TerraScopeConfig, tokenizer: prompting.TokenizerWrapper, max_seq_len: int = 2048):
        self.cfg = cfg
        self.tok = tokenizer
        self.max_seq_len = max_seq_len
        sp = tokenizer.special_ids()
        self.seg_id, self.region_id, self.eos_id = sp["seg"], sp["region"], sp["eos"]
        self.img_id = sp["img_context"]
        self.lowres = cfg.sam2.image_size // 4
        self._image_cache: dict[tuple[str, ...], PreparedImages] = {}
        self._mask_cache: dict[tuple, tuple[list[int], np.ndarray, bool]] = {}
        self._prompt_cache: dict[str, list[int]] = {}

    def _images(self, rec: dict) -> tuple[PreparedImages, list[str]]:
        base = Path(rec["_base"])
        ims = rec.get("images") or []
        if not ims:
            raise DataError(f"record {rec.get('id')}: no images")
        keys = tuple(str(base / im["path"]) + "|" + im.get("role", "optical") for im in ims)
        if keys not in self._image_cache:
            pixels = [read_image(base / im["path"]) for im in ims]
            roles = [im.get("role", "optical") for im in ims]
            self._image_cache[keys] = prepare_images(self.cfg, pixels, roles)
        return self._image_cache[keys], list(keys)

    def build(self, rec: dict) -> Example:
        rid = rec.get("id", "?")
        for key in ("question", "target"):
            if not isinstance(rec.get(key), str):
                raise DataError(f"record {rid}: missing '{key}'")
        imgs, keys = self._images(rec)
        options = [strip_letter(c) for c in rec["choices"]] if rec.get("choices") else None
        prompt = prompting.build_prompt(self.cfg.template, rec["question"], options, imgs.token_counts,
                                        imgs.roles)
        prompt_ids = self._encode_prompt(prompt)
        texts = rec["target"].split(SEG)
        seg_meta = rec.get("seg_masks") or []
        if len(seg_meta) != len(texts) - 1:
            raise DataError(f"record {rid}: {len(texts) - 1} [SEG] but {len(seg_meta)} seg_masks")
        base = Path(rec["_base"])
        segs = []
        for k, meta in enumerate(seg_meta):
            src_image = int(meta.get("image", 0))
            if not 0 <= src_image < len(imgs.order):
                raise DataError(f"record {rid}: seg_masks[{k}].image={src_image} out of range")
            image = imgs.order[src_image]
            local, target, present = self._mask(base / meta["path"], imgs, image)
            span = meta.get("grounding")
            segs.append(SegItem(image, local, target, present, span if isinstance(span, str) and span else None))
        pieces = [self.tok.encode(t) for t in texts]
        pieces[-1] = pieces[-1] + [self.eos_id]
        q_ids = self.tok.encode(rec["question"])
        restate = find_restatement(rec, texts)
        loose = restate or find_restatement(rec, texts, exact=False)
        plan = plan_for(rec, loose, len(texts) - 1) if loose is not None else None
        ex = Example(rid, rec.get("kind", "?"), rec.get("task", "?"), imgs, prompt_ids, pieces, segs, q_ids, keys,
                     restate, plan)
        if self.max_len(ex) > self.max_seq_len:
            raise DataError(f"record {rid}: {self.max_len(ex)} tokens > max_seq_len {self.max_seq_len}")
        return ex

    def _mask(self, path: Path, imgs: PreparedImages, image: int) -> tuple[list[int], np.ndarray, bool]:
        """(region tokens, low-res target, present) of a mask file on one image; cached (masks repeat)."""
        lay = imgs.layouts[image]
        key = (str(path), lay.orig_hw, lay.cols, lay.rows, imgs.kind)
        hit = self._mask_cache.get(key)
        if hit is not None:
            return hit
        mask = read_mask(path)
        hw = lay.orig_hw  # a pair's SAR image is already on the optical grid
        if mask.shape != tuple(hw):
            mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((hw[1], hw[0]),
                                                                                 Image.NEAREST)) > 127
        present = bool(mask.any())
        local = region_indices(self.cfg, mask, lay, imgs.kind) if present else []
        out = (local, lowres_target(mask, self.lowres), present)
        self._mask_cache[key] = out
        return out

    def _encode_prompt(self, prompt: str) -> list[int]:
        """Token ids of a prompt; the part up to the last ``</img>`` is cached.

        The tokenizer splits special tokens out before anything else, so the text after ``</img>`` is
        tokenised the same with or without what precedes it (tests compare with the runtime's ids).
        """
        cut = prompt.rfind("</img>")
        if cut < 0:
            return self.tok.encode(prompt)
        cut += len("</img>")
        head = prompt[:cut]
        ids = self._prompt_cache.get(head)
        if ids is None:
            ids = self._prompt_cache[head] = self.tok.encode(head)
        return ids + self.tok.encode(prompt[cut:])

    def max_len(self, ex: Example) -> int:
        spans = sum(len(self.tok.encode(s.grounding)) + 8 for s in ex.segs if s.grounding)
        spans += 4 if ex.restate is not None else 0  # a restated value read from a jittered span
        spans += 24 if ex.options is not None else 0  # redrawn options may write longer numbers
        return len(ex.prompt_ids) + sum(map(len, ex.pieces)) + sum(1 + len(s.local) for s in ex.segs) + spans

    def build_all(self, records: list[dict], workers: int = 1) -> tuple[list[Example], list[str]]:
        """Every record that builds, plus one error line per record that does not (never silently)."""
        def one(rec: dict) -> Example | str:
            try:
                return self.build(rec)
            except (DataError, OSError, ValueError) as exc:
                return f"{rec.get('id', '?')}: {exc}"

        if workers > 1:
            with ThreadPoolExecutor(workers) as pool:
                results = list(pool.map(one, records))
        else:
            results = [one(r) for r in records]
        good = [r for r in results if isinstance(r, Example)]
        bad = [r for r in results if isinstance(r, str)]
        return good, bad

    # ---- per draw --------------------------------------------------------------------------------------------
    def sequence(self, ex: Example, ground: bool | Sequence[bool], jitter: float, rng: np.random.Generator,
                 redraw_prob: float = 0.0, redraw_jitter: float = 0.0, redraw_marks: bool = False) -> dict:
        """ids, labels (already shifted: labels[t] is what position t must predict), and positions.

        ``ground``: inject each [SEG]'s measurement span (one flag for all, or one per [SEG]).
        ``redraw_prob``: chance that a numeric multiple-choice record gets fresh options, its span a jitter of
        up to ``redraw_jitter`` and the letter of the option nearest the span (model/training/options.py);
        ``redraw_marks`` tags each listed option above/below the value.
        """
        flags = [ground] * ex.n_seg if isinstance(ground, bool) else list(ground)
        plan, draw = ex.options, None
        rewritten: dict[int, list[int]] = {}  # piece index -> ids with the restated value read from the span
        if plan is not None and redraw_prob > 0 and rng.random() < redraw_prob:
            draw = redraw(plan, rng)
        if plan is not None and draw is not None:
            prompt_ids = self._encode_prompt(prompting.build_prompt(
                self.cfg.template, plan.question, draw.options, ex.images.token_counts, ex.images.roles))
            rewritten[plan.piece] = self.tok.encode(rewrite(plan, draw, None, draw.letter, redraw_marks)) + [
                self.eos_id]
        else:
            prompt_ids = ex.prompt_ids
        ids: list[int] = list(prompt_ids)
        target = [False] * len(ids)
        region_pos: list[int] = []
        region_src: list[tuple[int, int]] = []  # (image, local index)
        seg_pos: list[int] = []
        for k, piece in enumerate(ex.pieces):
            piece = rewritten.get(k, piece)
            ids += piece
            target += [True] * len(piece)
            if k == ex.n_seg:
                break
            seg = ex.segs[k]
            seg_pos.append(len(ids))
            ids.append(self.seg_id)
            target.append(True)
            for j in seg.local:
                region_pos.append(len(ids))
                region_src.append((seg.image, j))
                ids.append(self.region_id)
                target.append(False)
            if flags[k] and seg.grounding:
                if draw is None:
                    span = jitter_span(seg.grounding, jitter, rng)
                else:  # redrawn options: the letter is named from the jittered value, not from the record's note
                    span = jitter_span(prompting.strip_measured_answer(seg.grounding), redraw_jitter, rng)
                g = self.tok.encode(span)
                ids += g
                target += [False] * len(g)
                r = ex.restate
                if plan is not None and draw is not None and plan.piece == k + 1:
                    value = restated_value(span, plan.op, plan.unit)
                    letter = (nearest_letter(plan, draw.options, value) if value else None) or draw.letter
                    rewritten[k + 1] = self.tok.encode(rewrite(plan, draw, value, letter, redraw_marks)) + [
                        self.eos_id]
                elif jitter > 0 and r is not None and r.piece == k + 1:
                    value = restated_value(span, r.op, r.unit)
                    if value is not None:
                        new = self.tok.encode(r.text.replace(r.value_text, value, 1))
                        rewritten[k + 1] = new + [self.eos_id] if r.piece == ex.n_seg else new
        labels = [ids[t + 1] if target[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]
        img_pos = [i for i, t in enumerate(prompt_ids) if t == self.img_id]
        return {"ids": ids, "labels": labels, "region_pos": region_pos, "region_src": region_src,
                "seg_pos": seg_pos, "img_pos": img_pos}
