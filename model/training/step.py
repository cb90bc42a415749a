"""One training forward: the whole TerraScope graph with ground-truth masks, returning the losses.

``TrainingForward`` is an ``nn.Module`` around the model so DistributedDataParallel sees every parameter
the step uses. Images live in device-resident uint8 banks built once (the dataset is small; decoding and
resizing images every step would starve the GPU), and a batch is a set of indices into them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.modeling_terrascope import Sam2Features, TerraScopeModel, pixel_shuffle_v2, text_relevance
from model.preprocess import IMAGENET_MEAN, IMAGENET_STD, SAM2_MEAN, SAM2_STD
from model.transfer import normalize_pixels

from .augment import Sam2Augment
from .data import Example, ExampleBuilder
from .losses import IGNORE_INDEX, dice_bce_per_mask, dice_loss, mask_iou


# ---- device-resident image banks ---------------------------------------------------------------------------
class Banks:
    """Every distinct image's ViT tiles and SAM-2 input, and every [SEG] target, as device tensors."""

    def __init__(self, examples: list[Example], device: torch.device):
        tiles, sams, targets = [], [], []
        self.tile_start: dict[int, int] = {}  # id(PreparedImages) -> first tile row
        self.sam_start: dict[int, int] = {}  # id(PreparedImages) -> first SAM row
        n_tiles = n_sam = 0
        for ex in examples:
            key = id(ex.images)
            if key in self.tile_start:
                continue
            self.tile_start[key] = n_tiles
            self.sam_start[key] = n_sam
            tiles.append(ex.images.tiles)
            sams.extend(ex.images.sam)
            n_tiles += ex.images.tiles.shape[0]
            n_sam += len(ex.images.sam)
        self.seg_start: dict[str, int] = {}
        n_seg = 0
        for ex in examples:
            self.seg_start[ex.id] = n_seg
            targets.extend(s.target for s in ex.segs)
            n_seg += ex.n_seg
        self.tiles = torch.from_numpy(np.concatenate(tiles)).to(device)  # [T, 448, 448, 3] uint8
        self.sam = torch.from_numpy(np.stack(sams)).to(device)  # [I, S, S, 3] uint8
        lowres = examples[0].segs[0].target.shape[0] if n_seg else 1
        self.targets = (torch.from_numpy(np.stack(targets)).to(device) if targets
                        else torch.zeros(0, lowres, lowres, dtype=torch.uint8, device=device))
        self.device = device

        self.vit_cache: torch.Tensor | None = None  # [T, tokens, 4*C] ViT output after pixel shuffle
        self.sam_cache: list[torch.Tensor] | None = None  # per level [I, C, h, w]
        self.sam_pe: torch.Tensor | None = None

    def nbytes(self) -> int:
        extra = [self.vit_cache] if self.vit_cache is not None else []
        extra += list(self.sam_cache or [])
        return sum(t.numel() * t.element_size() for t in (self.tiles, self.sam, self.targets, *extra))

    @torch.no_grad()
    def build_caches(self, model: TerraScopeModel, vit: bool, sam: bool, dtype: torch.dtype,
                     autocast=None, chunk: int = 64) -> None:
        """Run the frozen encoders once over every image (a stage that does not train them).

        ``vit`` caches the ViT output before the projector (so ``mlp1`` can still train); ``sam`` caches
        SAM-2's image embeddings. Steps then cost the LLM and the mask decoder only.
        """
        import contextlib

        ctx = autocast or contextlib.nullcontext()
        self.vit_cache = self.sam_cache = self.sam_pe = None
        if vit:
            parts = []
            for i in range(0, self.tiles.shape[0], chunk):
                with ctx:
                    pv = normalize_pixels(self.tiles[i:i + chunk], IMAGENET_MEAN, IMAGENET_STD)
                    parts.append(vit_features(model, pv).to(dtype))
            self.vit_cache = torch.cat(parts)
        if sam:
            levels: list[list[torch.Tensor]] = []
            for i in range(0, self.sam.shape[0], chunk):
                with ctx:
                    feats = model.sam2_encode(normalize_pixels(self.sam[i:i + chunk], SAM2_MEAN, SAM2_STD), views=1)
                levels.append([e.to(dtype) for e in feats.image_embeddings])
                self.sam_pe = feats.image_pe.to(dtype)
            self.sam_cache = [torch.cat([lv[k] for lv in levels]) for k in range(len(levels[0]))]

    def drop_caches(self) -> None:
        self.vit_cache = self.sam_cache = self.sam_pe = None


def vit_features(model: TerraScopeModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """``extract_feature`` without the projector: ViT, CLS dropped, pixel shuffle (tests keep them equal)."""
    hidden = model.vision_model(pixel_values=pixel_values.to(model.device)).last_hidden_state[:, 1:, :]
    side = round(hidden.shape[1] ** 0.5)
    hidden = pixel_shuffle_v2(hidden.reshape(hidden.shape[0], side, side, -1), model.config.downsample_ratio)
    return hidden.reshape(hidden.shape[0], -1, hidden.shape[-1])


# ---- batches -------------------------------------------------------------------------------------------------
@dataclass
class Batch:
    ids: torch.Tensor  # [B, L]
    labels: torch.Tensor  # [B, L] (shifted; IGNORE_INDEX where nothing is predicted)
    tile_rows: torch.Tensor  # rows of banks.tiles, in prompt order per sample
    img_b: torch.Tensor
    img_pos: torch.Tensor
    img_src: torch.Tensor  # row in the batch's flat visual tokens
    reg_b: torch.Tensor
    reg_pos: torch.Tensor
    reg_src: torch.Tensor  # flat row (optical row for a pair)
    reg_alt: torch.Tensor  # flat row of the SAR alternative, -1 when not a pair
    reg_pair: torch.Tensor  # index into ``pairs`` for pair tokens, -1 otherwise
    pairs: list[tuple[int, int, list[int]]]  # (flat start of optical block, tokens per block, question ids)
    seg_b: torch.Tensor
    seg_pos: torch.Tensor
    sam_rows: torch.Tensor  # rows of banks.sam encoded this step
    seg_frame: torch.Tensor  # per [SEG]: index into sam_rows
    seg_target: torch.Tensor  # per [SEG]: row of banks.targets
    seg_present: torch.Tensor  # per [SEG]: bool
    n_samples: int
    # indices computed on the host so the step never waits on the GPU (no boolean-mask indexing)
    tgt_b: torch.Tensor | None = None  # positions with a target: sample
    tgt_pos: torch.Tensor | None = None  # ... and position
    tgt_ids: torch.Tensor | None = None  # ... and the token to predict
    present_idx: torch.Tensor | None = None  # [SEG]s whose GT mask is not empty
    n_present: int = 0


def collate(examples: list[Example], banks: Banks, builder: ExampleBuilder, ground: list[bool],
            jitter: float, rng: np.random.Generator, pad_id: int,
            redraw: tuple[float, float, bool] = (0.0, 0.0, False)) -> Batch:
    """Assemble a batch (right padding: with causal attention no real token ever sees a pad).

    ``redraw``: (probability, span jitter, above/below marks) of option redraw for numeric multiple-choice
    records.
    """
    dev = banks.device
    seqs = [builder.sequence(ex, g, jitter, rng, *redraw) for ex, g in zip(examples, ground)]
    length = max(len(s["ids"]) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), length), IGNORE_INDEX, dtype=torch.long)
    tile_rows: list[int] = []
    img_b, img_pos, img_src = [], [], []
    reg_b, reg_pos, reg_src, reg_alt, reg_pair = [], [], [], [], []
    pairs: list[tuple[int, int, list[int]]] = []
    seg_b, seg_pos, seg_frame, seg_target, seg_present = [], [], [], [], []
    sam_rows: list[int] = []
    sam_index: dict[int, int] = {}
    flat_base = 0
    per_tile = builder.cfg.tokens_per_tile
    for b, (ex, s) in enumerate(zip(examples, seqs)):
        n = len(s["ids"])
        ids[b, :n] = torch.tensor(s["ids"])
        labels[b, :n] = torch.tensor(s["labels"])
        t0 = banks.tile_start[id(ex.images)]
        n_tiles = ex.images.tiles.shape[0]
        tile_rows.extend(range(t0, t0 + n_tiles))
        if len(s["img_pos"]) != n_tiles * per_tile:
            raise ValueError(f"{ex.id}: {len(s['img_pos'])} image tokens for {n_tiles} tiles")
        img_b += [b] * len(s["img_pos"])
        img_pos += s["img_pos"]
        img_src += range(flat_base, flat_base + len(s["img_pos"]))
        pair_idx = -1
        if ex.images.kind == "pair":
            pairs.append((flat_base, ex.images.token_counts[0], ex.question_ids))
            pair_idx = len(pairs) - 1
        for p, (image, j) in zip(s["region_pos"], s["region_src"]):
            reg_b.append(b)
            reg_pos.append(p)
            if pair_idx >= 0:
                reg_src.append(flat_base + j)
                reg_alt.append(flat_base + ex.images.token_counts[0] + j)
            else:
                reg_src.append(flat_base + ex.images.offsets[image] + j)
                reg_alt.append(-1)
            reg_pair.append(pair_idx)
        s0 = banks.sam_start[id(ex.images)]
        t_start = banks.seg_start[ex.id]
        for k, (p, seg) in enumerate(zip(s["seg_pos"], ex.segs)):
            row = s0 + seg.image
            if row not in sam_index:
                sam_index[row] = len(sam_rows)
                sam_rows.append(row)
            seg_b.append(b)
            seg_pos.append(p)
            seg_frame.append(sam_index[row])
            seg_target.append(t_start + k)
            seg_present.append(seg.present)
        flat_base += len(s["img_pos"])

    def t(x: list, dtype: torch.dtype = torch.long) -> torch.Tensor:
        return torch.tensor(x, dtype=dtype, device=dev)

    tgt = (labels != IGNORE_INDEX).nonzero()
    present_idx = [i for i, p in enumerate(seg_present) if p]
    return Batch(ids.to(dev), labels.to(dev), t(tile_rows), t(img_b), t(img_pos), t(img_src), t(reg_b), t(reg_pos),
                 t(reg_src), t(reg_alt), t(reg_pair), pairs, t(seg_b), t(seg_pos), t(sam_rows), t(seg_frame),
                 t(seg_target), t(seg_present, torch.bool), len(examples),
                 tgt[:, 0].to(dev), tgt[:, 1].to(dev), labels[tgt[:, 0], tgt[:, 1]].to(dev), t(present_idx),
                 len(present_idx))


# ---- SAM-2 decode (training variant) ----------------------------------------------------------------------------
def decode_all(model: TerraScopeModel, feats: Sam2Features, prompt: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Like ``TerraScopeModel.sam2_decode`` but keeps all three multimask outputs for the loss.

    Returns (low-res logits [N, 3, h, w], predicted IoU [N, 3], object score [N, 1]); one frame per prompt.
    """
    sam = model.grounding_encoder
    n = prompt.shape[0]
    points = torch.zeros(n, 1, 1, 2, device=prompt.device, dtype=torch.float32)  # weights are fp32 in training
    labels = -torch.ones(n, 1, 1, dtype=torch.int32, device=prompt.device)
    sparse, dense = sam.prompt_encoder(input_points=points, input_labels=labels, input_boxes=None,
                                       input_masks=None)
    sparse = torch.cat([sparse, prompt[:, None, None, :].to(sparse.dtype)], dim=2)
    low, iou, _, obj = sam.mask_decoder(
        image_embeddings=feats.image_embeddings[-1],
        image_positional_embeddings=feats.image_pe.repeat(n, 1, 1, 1),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=True,
        high_resolution_features=feats.image_embeddings[:-1],
    )
    return low[:, 0].float(), iou[:, 0].float(), obj[:, 0].float()


# ---- the forward -------------------------------------------------------------------------------------------------
class TrainingForward(nn.Module):
    """Computes L = L_LM + w_seg * (Dice + BCE) [+ w_aux * (IoU-head MSE + object-score BCE)]."""

    def __init__(self, model: TerraScopeModel, banks: Banks):
        super().__init__()
        self.model = model
        self.banks = banks  # not a module: tensors only
        self.seg_weight = 0.5
        self.aux_weight = 0.5
        self.sam2_augment = Sam2Augment()  # StageConfig.sam2_augment, set per stage by the loop

    def encode(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat visual tokens [N, H], last-layer hidden states [B, L, H]) for a batch."""
        m = self.model
        lm_model = m.language_model
        # 1. visual tokens of every tile of every sample (ViT + pixel shuffle + mlp1)
        if self.banks.vit_cache is not None:  # frozen ViT: cached features, the projector still trains
            vit = m.mlp1(self.banks.vit_cache[batch.tile_rows])
        else:
            pv = normalize_pixels(self.banks.tiles[batch.tile_rows], IMAGENET_MEAN, IMAGENET_STD)
            vit = m.extract_feature(pv)  # [tiles, tokens per tile, H]
        flat = vit.reshape(-1, vit.shape[-1])
        # 2. text embeddings with image tokens and GT-mask region tokens injected
        emb = lm_model.get_input_embeddings()(batch.ids)
        emb = emb.index_put((batch.img_b, batch.img_pos), flat[batch.img_src].to(emb.dtype))
        if batch.reg_b.numel():
            src = self._pair_sources(flat, batch) if batch.pairs else batch.reg_src
            emb = emb.index_put((batch.reg_b, batch.reg_pos), flat[src].to(emb.dtype))
        # 3. the decoder over the whole teacher-forced sequence (right padding: no mask needed)
        pos = torch.arange(batch.ids.shape[1], device=emb.device)[None].expand(batch.ids.shape[0], -1)
        hidden = lm_model.model(inputs_embeds=emb, position_ids=pos, use_cache=False).last_hidden_state
        return flat, hidden

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        m = self.model
        lm_model = m.language_model
        flat, hidden = self.encode(batch)
        # logits only where there is a target (saves a [B, L, V] tensor)
        logits = lm_model.lm_head(hidden[batch.tgt_b, batch.tgt_pos])
        n_tok = int(batch.tgt_ids.numel())
        lm = F.cross_entropy(logits.float(), batch.tgt_ids) if n_tok else logits.sum() * 0.0
        out = {"lm_loss": lm, "n_tokens": torch.tensor(float(n_tok), device=hidden.device)}
        # 4. masks from each [SEG] hidden state
        if batch.seg_b.numel():
            seg_h = hidden[batch.seg_b, batch.seg_pos]
            prompt = m.text_hidden_fcs(seg_h)
            target = self.banks.targets[batch.seg_target].float() / 255.0
            if self.banks.sam_cache is not None:  # frozen SAM-2 image encoder
                feats = Sam2Features([e[batch.sam_rows] for e in self.banks.sam_cache], self.banks.sam_pe)
            else:
                pixels = self.banks.sam[batch.sam_rows]
                if self.training and self.sam2_augment.active:
                    pixels, target = self.sam2_augment(pixels, target, batch.seg_frame)
                feats = m.sam2_encode(normalize_pixels(pixels, SAM2_MEAN, SAM2_STD), views=1)
            per_seg = Sam2Features([e[batch.seg_frame] for e in feats.image_embeddings], feats.image_pe)
            low, iou_pred, obj = decode_all(m, per_seg, prompt)
            if target.shape[-1] != low.shape[-1]:
                raise ValueError(f"mask targets are {target.shape[-1]}px but SAM-2 predicts {low.shape[-1]}px; "
                                 "rebuild the examples for this model config")
            present = batch.seg_present
            obj_loss = F.binary_cross_entropy_with_logits(obj[:, 0], present.float())
            if batch.n_present:
                pi = batch.present_idx
                lp, tp = low[pi], target[pi]
                cand = dice_bce_per_mask(lp, tp)  # [P, 3]
                best = cand.argmin(dim=1)
                mask_l = cand.gather(1, best[:, None]).mean()
                with torch.no_grad():
                    actual = torch.stack([mask_iou(lp[:, k], tp) for k in range(lp.shape[1])], dim=1)
                    chosen = lp[torch.arange(lp.shape[0], device=lp.device), iou_pred[pi].argmax(1)]
                    iou_mon = mask_iou(chosen, tp).mean()
                    dice_mon = dice_loss(chosen, tp)
                iou_l = F.mse_loss(iou_pred[pi], actual)  # the IoU head ends in a sigmoid
            else:
                mask_l = iou_l = low.sum() * 0.0
                iou_mon = dice_mon = torch.tensor(float("nan"), device=low.device)
            seg = mask_l
            aux = iou_l + obj_loss
            out.update(seg_loss=seg, aux_loss=aux, mask_iou=iou_mon, dice=dice_mon)
        else:
            zero = flat.sum() * 0.0
            out.update(seg_loss=zero, aux_loss=zero, mask_iou=torch.tensor(float("nan"), device=flat.device),
                       dice=torch.tensor(float("nan"), device=flat.device))
        out["loss"] = out["lm_loss"] + self.seg_weight * out["seg_loss"] + self.aux_weight * out["aux_loss"]
        return out

    @torch.no_grad()
    def _pair_sources(self, flat: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Optical or SAR row per region token by text relevance (paper Eq. 4-5), as the runtime picks."""
        src = batch.reg_src.clone()
        emb = self.model.language_model.get_input_embeddings()
        for p, (start, n, q_ids) in enumerate(batch.pairs):
            q = emb(torch.tensor(q_ids, device=flat.device))
            b_opt = text_relevance(flat[start:start + n], q)
            b_sar = text_relevance(flat[start + n:start + 2 * n], q)
            sel = batch.reg_pair == p
            local = batch.reg_src[sel] - start
            use_sar = ~(b_opt[local] > b_sar[local])
            src[sel] = torch.where(use_sar, batch.reg_alt[sel], batch.reg_src[sel])
        return src
