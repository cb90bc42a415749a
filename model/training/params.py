"""Parameter groups, freezing and LoRA: which weights a stage trains is config data, not code."""

from __future__ import annotations

from torch import nn

from model.modeling_terrascope import TerraScopeModel

from .config import GROUPS, LoraConfig


def group_modules(model: TerraScopeModel) -> dict[str, list[nn.Module]]:
    """Group name -> modules. ``llm`` excludes the token embeddings (``llm_embed``) unless they are tied."""
    lm = model.language_model
    sam = model.grounding_encoder
    llm_parts = [m for name, m in lm.model.named_children() if name != "embed_tokens"]
    if not lm.config.tie_word_embeddings:
        llm_parts.append(lm.lm_head)
    groups = {
        "vision": [model.vision_model],
        "projector": [model.mlp1],
        "llm": llm_parts,
        "llm_embed": [lm.model.embed_tokens],
        "sam2_image_encoder": [sam.vision_encoder],
        "sam2_prompt_encoder": [sam.prompt_encoder],
        "sam2_mask_decoder": [sam.mask_decoder],
        "seg_projector": [model.text_hidden_fcs],
    }
    assert set(groups) == set(GROUPS)
    return groups


def group_of(model: TerraScopeModel) -> dict[int, str]:
    """id(parameter) -> group name (first group wins, so tied weights count once)."""
    out: dict[int, str] = {}
    for name, mods in group_modules(model).items():
        for mod in mods:
            for p in mod.parameters():
                out.setdefault(id(p), name)
    # SAM-2's loose parameters (no_memory_embedding) belong with its image encoder
    for p in model.grounding_encoder.parameters(recurse=False):
        out.setdefault(id(p), "sam2_image_encoder")
    return out


def set_trainable(model: TerraScopeModel, groups: list[str]) -> None:
    """Freeze everything, then unfreeze the named groups (LoRA adapters are handled by ``add_lora``)."""
    model.requires_grad_(False)
    mods = group_modules(model)
    for g in groups:
        for mod in mods[g]:
            mod.requires_grad_(True)
    if "sam2_image_encoder" in groups:
        model.grounding_encoder.no_memory_embedding.requires_grad_(True)


def add_lora(model: TerraScopeModel, lora: LoraConfig) -> nn.Module:
    """Wrap the LLM's linear layers with LoRA adapters in place (peft); returns the peft wrapper.

    ``model.language_model`` stays the same ``Qwen2ForCausalLM`` object (peft swaps its Linear layers in
    place), so the training forward and the runtime code paths are unchanged; ``merge_lora`` folds the
    adapters back so the saved checkpoint is a plain model.
    """
    from peft import LoraConfig as PeftLora
    from peft import get_peft_model

    cfg = PeftLora(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                   target_modules=list(lora.target_modules), bias="none")
    peft_model = get_peft_model(model.language_model, cfg)
    return peft_model


def merge_lora(model: TerraScopeModel, peft_model: nn.Module) -> None:
    """Fold LoRA adapters into the base weights and restore plain Linear layers."""
    base = peft_model.merge_and_unload()
    model.language_model = base
    model.language_model.requires_grad_(False)


def trainable_summary(model: TerraScopeModel) -> dict[str, int]:
    gid = group_of(model)
    out: dict[str, int] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = "lora" if "lora_" in name else gid.get(id(p), "other")
            out[key] = out.get(key, 0) + p.numel()
    return out
