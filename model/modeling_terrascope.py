"""The TerraScope model: InternViT + pixel-shuffle MLP projector + Qwen2 + SAM-2 + [SEG] head.

Built from transformers modules (``InternVLVisionModel``, ``Qwen2ForCausalLM``, ``Sam2Model``); this file
only adds the glue the release defines: pixel shuffle v2, ``mlp1``, ``text_hidden_fcs`` and the way a
``[SEG]`` hidden state becomes a SAM-2 sparse prompt. Generation lives in ``generation.py``.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import InternVLVisionModel, Qwen2ForCausalLM, Sam2Model
from transformers.cache_utils import DynamicCache

from . import sam2_tta
from .configuration_terrascope import TerraScopeConfig
from .sam2_graph import Sam2EncoderGraphs

# transformers renamed ``past_key_values`` to ``cache`` (5.2x keeps the old name as a deprecated alias);
# pick whichever the installed version's Qwen2Model.forward declares so both 5.17 and 5.24 work.
_CACHE_KW = "cache" if "cache" in inspect.signature(
    __import__("transformers").Qwen2Model.forward).parameters else "past_key_values"


@dataclass
class Sam2Features:
    """SAM-2 image embeddings of one or more frames, computed once and reused by every [SEG].

    With test-time augmentation (``config.sam2_tta`` = k > 1) ``image_embeddings`` holds the 3 maps of each
    of the k dihedral views of the frames, view-major: [s0, s1, last] of view 0 (the plain image), then view
    1, ... Every map keeps frames on dim 0, so slicing frames (``frame``) or concatenating features of
    several images map by map (what generation and the fast path do) keeps the views with their frames.
    """

    image_embeddings: list[torch.Tensor]  # [s0 (conv_s0'd), s1 (conv_s1'd), last + no_mem_embed] x views, NCHW
    image_pe: torch.Tensor  # [1, C, 64, 64]

    LEVELS = 3  # maps per view: the mask decoder takes two high-resolution maps and the last one

    def frame(self, index: int) -> Sam2Features:
        return Sam2Features([e[index:index + 1] for e in self.image_embeddings], self.image_pe)

    @property
    def views(self) -> int:
        n = len(self.image_embeddings)
        if n == 0 or n % self.LEVELS:
            raise ValueError(f"Sam2Features holds {n} maps; expected {self.LEVELS} per dihedral view")
        return n // self.LEVELS

    def view(self, index: int) -> list[torch.Tensor]:
        """The [s0, s1, last] maps of dihedral view ``index`` (0 = the image as given)."""
        return self.image_embeddings[index * self.LEVELS:(index + 1) * self.LEVELS]


@dataclass
class MaskLogits:
    """Output of one SAM-2 decode: best-of-3 low-res logits with their scores."""

    low_res: torch.Tensor  # [B, 1, 256, 256] float32
    iou: torch.Tensor  # [B, 3] predicted IoU of the multimask outputs
    object_score: torch.Tensor  # [B, 1]
    best: torch.Tensor  # [B] index of the chosen mask


def pixel_shuffle_v2(x: torch.Tensor, scale: float = 0.5) -> torch.Tensor:
    """InternVL pixel shuffle, ps_version v2: [N, W, H, C] -> [N, W*s, H*s, C/s^2] (orientation kept)."""
    n, w, h, c = x.shape
    x = x.reshape(n, w, int(h * scale), int(c / scale))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.reshape(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
    return x.permute(0, 2, 1, 3).contiguous()


class TerraScopeModel(nn.Module):
    """Weights and single-step computations; no generation state lives here."""

    def __init__(self, config: TerraScopeConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        vit_hidden = config.vision.hidden_size
        llm_hidden = config.llm.hidden_size
        ps_dim = vit_hidden * int(1 / config.downsample_ratio) ** 2
        self.vision_model = InternVLVisionModel(config.vision_hf())
        self.mlp1 = nn.Sequential(
            nn.LayerNorm(ps_dim), nn.Linear(ps_dim, llm_hidden), nn.GELU(), nn.Linear(llm_hidden, llm_hidden)
        )
        self.language_model = Qwen2ForCausalLM(config.llm_hf())
        self.grounding_encoder = Sam2Model(config.sam2_hf())
        self.text_hidden_fcs = nn.Sequential(
            nn.Linear(llm_hidden, llm_hidden), nn.ReLU(), nn.Linear(llm_hidden, config.sam2.hidden_dim)
        )
        self.sam2_encode_calls = 0  # counted so tests can prove SAM-2 encodes once per image per answer

    # ---- vision -----------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.mlp1[1].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.mlp1[1].weight.dtype

    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[tiles, 3, 448, 448] -> projected visual tokens [tiles, 256, llm_hidden]."""
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        hidden = self.vision_model(pixel_values=pixel_values).last_hidden_state
        if self.config.select_layer != -1:
            raise ValueError("only select_layer=-1 (last ViT layer) is supported")
        hidden = hidden[:, 1:, :]  # drop CLS
        side = round(hidden.shape[1] ** 0.5)
        hidden = hidden.reshape(hidden.shape[0], side, side, -1)
        hidden = pixel_shuffle_v2(hidden, self.config.downsample_ratio)
        hidden = hidden.reshape(hidden.shape[0], -1, hidden.shape[-1])
        return self.mlp1(hidden)

    # ---- language model -----------------------------------------------------------------------------------
    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.get_input_embeddings()(ids.to(self.device))

    def new_cache(self) -> DynamicCache:
        return DynamicCache()

    def lm_forward(self, inputs_embeds: torch.Tensor, cache: DynamicCache | None, start: int,
                   all_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the decoder on ``inputs_embeds`` [1, L, H] at absolute positions start..start+L-1.

        Returns (last-layer hidden states after the final norm [1, L, H], logits [1, L or 1, V]). The cache
        is updated in place. This is the decode step the GPU fast path may swap out.
        """
        length = inputs_embeds.shape[1]
        position_ids = torch.arange(start, start + length, device=inputs_embeds.device)[None]
        out = self.language_model.model(
            inputs_embeds=inputs_embeds, position_ids=position_ids, use_cache=cache is not None,
            **{_CACHE_KW: cache},
        )
        hidden = out.last_hidden_state
        head_in = hidden if all_logits else hidden[:, -1:]
        return hidden, self.language_model.lm_head(head_in).float()

    # ---- SAM-2 ------------------------------------------------------------------------------------------
    def sam2_encode(self, g_pixel_values: torch.Tensor, views: int | None = None) -> Sam2Features:
        """[frames, 3, 1024, 1024] -> image embeddings (Hiera + FPN, conv_s0/s1, + no_mem_embed).

        ``views`` dihedral views per frame (default ``config.sam2_tta``; 1 = the image only) are encoded in
        the same forward as one batch of views x frames (see ``Sam2Features`` for the layout). Training
        code should pass ``views=1``: its losses read one view.
        """
        views = sam2_tta.check_views(self.config.sam2_tta if views is None else views)
        self.sam2_encode_calls += 1
        g = g_pixel_values.to(device=self.device, dtype=self.dtype)
        frames = g.shape[0]
        g = sam2_tta.stack_views(g, views)
        maps = None
        if Sam2EncoderGraphs.wanted(g):  # CUDA: a graph replay (model/sam2_graph.py); None -> eager
            graphs = self.__dict__.setdefault("_ts_sam2_graphs", Sam2EncoderGraphs(self._sam2_maps))
            maps = graphs.encode(g)
        if maps is None:
            maps = self._sam2_maps(g)
        if views > 1:
            maps = [m[v * frames:(v + 1) * frames] for v in range(views) for m in maps]
        return Sam2Features(maps, self.grounding_encoder.get_image_wide_positional_embeddings())

    def _sam2_maps(self, g: torch.Tensor) -> list[torch.Tensor]:
        """vision_encoder + the decoder's conv_s0/s1 + no_mem_embed, spelled out (get_image_features changed
        its return type across transformers 5.x releases); NCHW maps, high to low resolution."""
        sam = self.grounding_encoder
        maps = list(sam.vision_encoder(g).fpn_hidden_states)
        maps[0] = sam.mask_decoder.conv_s0(maps[0])
        maps[1] = sam.mask_decoder.conv_s1(maps[1])
        maps[-1] = maps[-1] + sam.no_memory_embedding.reshape(1, -1, 1, 1)
        return maps

    def sam2_decode(self, features: Sam2Features, prompt: torch.Tensor) -> MaskLogits:
        """Decode masks for ``prompt`` [B, C] (one text prompt per frame in ``features``).

        With several dihedral views in ``features`` the prompt is decoded against every view in one batch;
        each view's multimask logits are mapped back to the image frame and averaged channel by channel, as
        are the predicted IoUs and object scores, and best-of-3 is picked on the averaged IoUs.
        """
        batch = prompt.shape[0]
        device = prompt.device
        views = features.views
        if views == 1:
            low, iou, obj = self._sam2_multimask(features.image_embeddings, features.image_pe, prompt)
        else:
            maps = [torch.cat([features.view(v)[i] for v in range(views)]) for i in range(Sam2Features.LEVELS)]
            low, iou, obj = self._sam2_multimask(maps, features.image_pe, prompt.repeat(views, 1))
            low, iou, obj = sam2_tta.merge_views(low.unflatten(0, (views, batch)), iou.unflatten(0, (views, batch)),
                                                 obj.unflatten(0, (views, batch)))
        best = iou.argmax(dim=-1)
        chosen = low[torch.arange(batch, device=device), best][:, None]
        return MaskLogits(chosen, iou, obj, best)

    def _sam2_multimask(self, maps: list[torch.Tensor], image_pe: torch.Tensor, prompt: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One mask-decoder call: (logits [B, 3, 256, 256], IoU [B, 3], object score [B, 1]), float32."""
        sam = self.grounding_encoder
        batch = prompt.shape[0]
        device = prompt.device
        points = torch.zeros(batch, 1, 1, 2, device=device, dtype=prompt.dtype)
        labels = -torch.ones(batch, 1, 1, dtype=torch.int32, device=device)
        sparse, dense = sam.prompt_encoder(input_points=points, input_labels=labels, input_boxes=None,
                                           input_masks=None)
        # official Sa2VA: the language embedding is appended after the (dummy point, pad) sparse tokens
        sparse = torch.cat([sparse, prompt[:, None, None, :].to(sparse.dtype)], dim=2)
        low, iou, _, obj = sam.mask_decoder(
            image_embeddings=maps[-1],
            image_positional_embeddings=image_pe.repeat(batch, 1, 1, 1),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=True,
            high_resolution_features=maps[:-1],
        )
        return low[:, 0].float(), iou[:, 0].float(), obj[:, 0].float()

    def seg_prompt(self, seg_hidden: torch.Tensor) -> torch.Tensor:
        """[SEG] last-layer hidden state [B, H] -> SAM-2 language prompt [B, C]."""
        return self.text_hidden_fcs(seg_hidden.to(self.dtype))


def mask_probabilities(low_res: torch.Tensor, out_hw: tuple[int, int], image_size: int = 1024) -> torch.Tensor:
    """Low-res logits [B,1,256,256] -> probabilities [B,H,W]: bilinear to 1024, bilinear to (H,W), sigmoid.

    Two steps (not one) because that is what the official pipeline does and bilinear resizes do not
    compose exactly.
    """
    high = F.interpolate(low_res.float(), size=(image_size, image_size), mode="bilinear", align_corners=False)
    out = F.interpolate(high, size=tuple(out_hw), mode="bilinear", align_corners=False)
    return out[:, 0].sigmoid()


def text_relevance(visual: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
    """Paper Eq. 4: beta_j = mean over text tokens l of softmax_j(v_j . q_l / sqrt(D)).

    ``visual`` [N, D] (projected tokens of one modality), ``question`` [L, D] (question token embeddings).
    The softmax runs over the visual tokens of this modality, so each text token distributes one unit of
    attention over the image and beta sums to 1 per modality.
    """
    if question.shape[0] == 0:
        raise ValueError("text relevance needs at least one question token")
    v = visual.float()
    q = question.float()
    scores = v @ q.T / math.sqrt(v.shape[-1])  # [N, L]
    return scores.softmax(dim=0).mean(dim=1)
