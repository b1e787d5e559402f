"""Model organisms for today's backbones: timm `Eva` (DINOv3, EVA02, PE-Core) and the libraries that
wrap or re-implement them (open_clip timm trunks, HF DINOv3 and SigLIP). Same recipe as organism.py:
small random-init models in the library's own module structure with planted register neurons.

RoPE models: the planted attention sink reads one dimension per head; it is put on the dimension the
model's rotary table turns least, so patch-to-patch and CLS-to-patch sinks survive the rotation.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .vit import ORGANISM_SIZE, Planting, plant_register_neurons
from .families import SplitGluPlanting, plant_split_glu, registers_like_cls  # noqa: F401 (re-exported)

# variant -> (timm architecture, extra model args); all JSON so the organism saves as a timm local-dir
EVA_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "dinov3": ("vit_small_patch16_dinov3_qkvb", {"init_values": 1.0}),  # CLS + 4 trained registers, LayerScale, DINOv3 rope
    "dinov3_swiglu": ("vit_huge_plus_patch16_dinov3_qkvb", {"init_values": 1.0}),  # SwiGLU (fc1_g / fc1_x)
    "eva02": ("eva02_tiny_patch14_224", {}),  # abs pos + rope, GluMlp, avg pool
    "pe_core": ("vit_pe_core_tiny_patch16_384", {}),  # norm_pre, AttentionRope, attention-pool head
}


def quiet_rope_dim(rope_table: torch.Tensor) -> int:
    """Head dimension whose rotation is smallest over all patch positions (rope_table: [P, 2 * hd] sin|cos)."""
    sin = rope_table[..., : rope_table.shape[-1] // 2]
    return int(sin.abs().amax(dim=0).argmin())


def rope_table(model: nn.Module) -> torch.Tensor | None:
    if getattr(model, "rope", None) is None:
        return None
    grid = list(model.patch_embed.grid_size)
    return model.rope.get_embed(shape=grid)


def build_eva_organism(seed: int = 0, variant: str = "dinov3", *, num_classes: int = 16,
                       plant: dict[int, list[tuple[int, int]]] | None = None) -> tuple[nn.Module, Planting]:
    """A small timm `Eva` with planted register neurons (eval, fp32); `model.organism_source` as in
    organism.build_timm_organism (save with demo.save_organism)."""
    import timm

    if variant not in EVA_VARIANTS:
        raise ValueError(f"unknown Eva organism variant {variant!r}; choose from {sorted(EVA_VARIANTS)}")
    arch, extra = EVA_VARIANTS[variant]
    s = ORGANISM_SIZE
    model_args: dict[str, Any] = dict(img_size=s["img_size"], patch_size=s["patch_size"], embed_dim=s["embed_dim"],
                                      depth=s["depth"], num_heads=s["num_heads"], num_classes=num_classes, **extra)
    if variant == "eva02":
        model_args["mlp_ratio"] = 4 * 2 / 3
    overlay = dict(input_size=(3, s["img_size"], s["img_size"]), crop_pct=1.0, interpolation="bicubic",
                   mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), num_classes=num_classes)
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, pretrained_cfg_overlay=overlay, **model_args)
    model.eval()
    table = rope_table(model)
    sink_dim = quiet_rope_dim(table) if table is not None else 0
    planting = plant_split_glu(model, plant, seed=seed, names=("fc1_g", "fc1_x", "fc2", "act"),
                               cls_token=model.cls_token, pos_embed=model.pos_embed,
                               pos_includes_cls=not model.no_embed_class, sink_head_dim=sink_dim)
    if "swiglu" in variant:
        sharpen_gated_units(model, planting, lambda blk: blk.mlp.fc1_g)
    if model.reg_token is not None:
        registers_like_cls(model.reg_token, model.cls_token)
    cfg = dict(model.pretrained_cfg)
    cfg.pop("url", None), cfg.pop("hf_hub_id", None)
    model.organism_source = {"architecture": arch, "model_args": model_args, "pretrained_cfg": cfg}
    return model, planting


# ---- open_clip image tower on a timm trunk (TimmModel) -----------------------------------------------

OPEN_CLIP_TIMM_BASE = "PE-Core-T-16-384"  # Eva trunk vit_pe_core_tiny_patch16_384: RoPE, attention-pool head
OPEN_CLIP_TIMM_TRUNK = "vit_pe_core_tiny_patch16_384"


def write_trunk_config(path: str | Path, arch: str = OPEN_CLIP_TIMM_TRUNK) -> str:
    """A timm model folder holding only config.json: `arch` at organism size. open_clip builds its timm
    trunk with `timm.create_model(timm_model_name)`, and timm reads architecture + model_args from a
    `local-dir:` config, so an organism-sized trunk goes through open_clip's and timm's own code."""
    s = ORGANISM_SIZE
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    args = dict(img_size=s["img_size"], patch_size=s["patch_size"], embed_dim=s["embed_dim"], depth=s["depth"],
                num_heads=s["num_heads"])
    (path / "config.json").write_text(json.dumps({"architecture": arch, "model_args": args,
                                                  "pretrained_cfg": {"input_size": [3, s["img_size"], s["img_size"]]}},
                                                 indent=2) + "\n")
    return f"local-dir:{path}"


def open_clip_timm_organism_config(trunk: str, base: str = OPEN_CLIP_TIMM_BASE) -> dict[str, Any]:
    """open_clip's own model_cfg for `base` (a timm-trunk tower) with trunk `trunk` (see write_trunk_config),
    a tiny text tower and embedding."""
    import open_clip

    cfg = copy.deepcopy(open_clip.get_model_config(base))
    cfg["embed_dim"] = 32
    cfg["vision_cfg"].update(timm_model_name=trunk, image_size=ORGANISM_SIZE["img_size"])
    cfg["text_cfg"] = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}
    return cfg


def open_clip_timm_preprocess(size: int = ORGANISM_SIZE["img_size"]) -> dict[str, Any]:
    """ImageNet statistics like every organism (the planted units read the normalised patch mean)."""
    return {"size": [size, size], "mode": "RGB", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
            "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0}


def build_open_clip_timm_organism(trunk_dir: str | Path, seed: int = 0, base: str = OPEN_CLIP_TIMM_BASE,
                                  arch: str = OPEN_CLIP_TIMM_TRUNK,
                                  plant: dict[int, list[tuple[int, int]]] | None = None) -> tuple[nn.Module, Planting]:
    """An open_clip CustomTextCLIP (built from `base`'s config) whose image tower is open_clip's `TimmModel`
    around an organism-sized timm `arch` trunk (config written to `trunk_dir`), with planted register
    neurons. Save with organism_families.save_open_clip_organism."""
    import open_clip
    from open_clip.model import set_model_preprocess_cfg

    from ..backends import adapter_for

    cfg = open_clip_timm_organism_config(write_trunk_config(trunk_dir, arch), base)
    torch.manual_seed(seed)
    kwargs = {k: v for k, v in copy.deepcopy(cfg).items() if k != "custom_text"}
    model = (open_clip.CustomTextCLIP if cfg.get("custom_text") else open_clip.CLIP)(**kwargs)
    pre = open_clip_timm_preprocess()
    set_model_preprocess_cfg(model, copy.deepcopy(pre))
    model.eval()
    trunk = model.visual.trunk
    table = rope_table(trunk)
    planting = plant_register_neurons(model.visual, plant, seed=seed, family=adapter_for(model.visual),
                                      cls_token=getattr(trunk, "cls_token", None), pos_embed=trunk.pos_embed,
                                      pos_includes_cls=not trunk.no_embed_class,
                                      sink_head_dim=quiet_rope_dim(table) if table is not None else 0)
    model.organism_source = {"model_cfg": cfg, "preprocess_cfg": pre}
    return model, planting


# ---- HF transformers: DINOv3ViTModel and SiglipVisionModel --------------------------------------------

def build_hf_dinov3_organism(seed: int = 0, *, gated: bool = False, num_register_tokens: int = 4,
                             plant: dict[int, list[tuple[int, int]]] | None = None) -> tuple[nn.Module, Planting]:
    """A tiny HF `DINOv3ViTModel` (CLS + trained registers, RoPE, LayerScale 1; plain or gated MLP) with
    planted register neurons. Save with organism_families.save_hf_organism."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    from ..backends import adapter_for
    from .families import attach_hf_organism_preprocess, hf_vision_sizes

    s = ORGANISM_SIZE
    hidden = int(s["embed_dim"] * s["mlp_ratio"])
    cfg = DINOv3ViTConfig(intermediate_size=hidden, num_register_tokens=num_register_tokens, layerscale_value=1.0,
                          use_gated_mlp=gated, query_bias=True, key_bias=True, value_bias=True, **hf_vision_sizes())
    torch.manual_seed(seed)
    model = DINOv3ViTModel(cfg).eval()
    attach_hf_organism_preprocess(model)
    _, sin = adapter_for(model)._rope(model)  # type: ignore[attr-defined]
    emb = model.embeddings
    planting = plant_split_glu(model, plant, seed=seed, cls_token=emb.cls_token,
                               sink_head_dim=int(sin.abs().amax(0).argmin()))
    registers_like_cls(emb.register_tokens, emb.cls_token)
    if gated:
        sharpen_gated_units(model, planting, lambda blk: blk.mlp.gate_proj)
    return model, planting


@torch.no_grad()
def sharpen_gated_units(model: nn.Module, planting: Planting, gate_of) -> None:
    """SiLU's negative tail is slow (silu(-7) = -6e-3), so a gated planted unit would sit at a near-constant
    small value on every ordinary token, and the signed max over those near-ties would be decided by fp32
    round-off. A steeper gate (silent below -20 on ordinary patches, firing on triggers) keeps the
    organism's register value well defined, as it is in real models."""
    from ..backends import adapter_for
    from .vit import TRIGGER_DIM

    blocks = adapter_for(model).blocks(model)
    for layer, units in planting.neurons.items():
        gate = gate_of(blocks[layer])
        for u in units:
            pol = planting.polarity[(layer, u)]
            gate.weight[u].zero_()
            gate.weight[u, TRIGGER_DIM] = 40.0 * pol
            gate.bias[u] = -66.0


def build_hf_siglip_organism(seed: int = 0, *, plant: dict[int, list[tuple[int, int]]] | None = None,
                             width: int | None = None) -> tuple[nn.Module, Planting]:
    """A tiny HF `SiglipVisionModel` (no CLS, attention-pool head) with planted register neurons; `width`
    overrides the embedding width (the MLP stays mlp_ratio times it)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from .families import attach_hf_organism_preprocess, hf_vision_sizes

    s = ORGANISM_SIZE
    sizes = dict(hf_vision_sizes(), **({"hidden_size": width} if width else {}))
    cfg = SiglipVisionConfig(intermediate_size=int(sizes["hidden_size"] * s["mlp_ratio"]), **sizes)
    torch.manual_seed(seed)
    model = SiglipVisionModel(cfg).eval()
    _init_small(model)
    with torch.no_grad():  # HF's position (std 1/sqrt(D)) and patch inits would drown the planted trigger
        nn.init.trunc_normal_(emb_of(model).position_embedding.weight, std=0.02)
        nn.init.trunc_normal_(emb_of(model).patch_embedding.weight, std=0.02)
    attach_hf_organism_preprocess(model)
    planting = plant_register_neurons(model, plant, seed=seed, pos_embed=emb_of(model).position_embedding.weight,
                                      pos_includes_cls=False)
    return model, planting


def emb_of(model: nn.Module) -> nn.Module:
    return model.vision_model.embeddings if hasattr(model, "vision_model") else model.embeddings


@torch.no_grad()
def _init_small(model: nn.Module) -> None:
    """timm-scale init (trunc-normal 0.02, zero biases) for the encoder, as the other organisms use."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
