"""Model organisms: small random-init ViTs with planted register neurons, and images that trigger them.

A planted organism behaves like the large pretrained ViTs the method targets: a few units in one
middle block fire on dark (or bright) patches and write a large vector into those tokens; later
blocks' attention keys make high-norm tokens attention sinks. Planting is written against the
family adapter, so the same organism exists in every supported library's module structure.

Everything is deterministic in `seed`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..core.adapter import Adapter
from ..backends import adapter_for

# Where the trigger feature lives in the residual stream, and the direction outliers are written to.
TRIGGER_DIM = 0
SINK_DIM = 1


@dataclass
class Planting:
    """What was planted: block -> units, and whether each unit fires on dark (-1) or bright (+1) patches."""

    neurons: dict[int, list[int]]
    polarity: dict[tuple[int, int], int] = field(default_factory=dict)
    sink_blocks: list[int] = field(default_factory=list)


DEFAULT_PLANT = {2: [(17, -1), (101, -1)], 3: [(42, +1)]}


def _norm_vector(dim: int, gen: torch.Generator, exclude: tuple[int, ...]) -> torch.Tensor:
    """A fixed ±1 pattern with zero mean over the free dims (so LayerNorm keeps it stable)."""
    v = torch.where(torch.rand(dim, generator=gen) < 0.5, -1.0, 1.0)
    v[list(exclude)] = 0.0
    return v - v.sum() / (dim - len(exclude)) * (v != 0)


@torch.no_grad()
def plant_register_neurons(
    model: nn.Module,
    plant: dict[int, list[tuple[int, int]]] | None = None,
    *,
    seed: int = 0,
    family: Adapter | None = None,
    cls_token: torch.Tensor | None = None,
    pos_embed: torch.Tensor | None = None,
    pos_includes_cls: bool = True,
    trigger_gain: float = 3.0,
    outlier_norm: float = 12.0,
    sink_strength: float = 4.0,
    sink_head_dim: int = 0,
) -> Planting:
    """Plant register neurons into a freshly initialised ViT (in place).

    - patch embedding: residual dim TRIGGER_DIM carries the patch's mean pixel value (scaled), the
      other dims carry a fixed ±3 pattern (stable LayerNorm statistics);
    - each planted unit u in block L reads TRIGGER_DIM after the MLP's norm and fires only on very dark
      (polarity -1) or very bright (+1) patches; its fc2 column writes `outlier_norm ×` the typical
      token norm along SINK_DIM;
    - every block after the first planted one adds a key/query component that reads SINK_DIM, so
      high-norm tokens become attention sinks.
    `cls_token` is the parameter holding the CLS embedding (set to the stable pattern so CLS never fires);
    `pos_embed` carries the pattern when the patch embedding has no bias (CLIP). `sink_head_dim` is the
    dimension within each head that carries the sink (RoPE models: one their rotary table barely turns).
    """
    fam = family or adapter_for(model)
    plant = plant or DEFAULT_PLANT
    gen = torch.Generator().manual_seed(seed)
    pattern = 3.0 * _norm_vector(fam.embed_dim(model), gen, (TRIGGER_DIM, SINK_DIM))
    _plant_trigger(fam, model, pattern, trigger_gain, cls_token, pos_embed, pos_includes_cls)
    blocks = fam.blocks(model)
    planting = Planting(neurons={})
    for layer, units in sorted(plant.items()):
        _plant_units(fam, blocks[layer], layer, units, outlier_norm * float(pattern.norm()) / 3.0, planting)
    for layer in range(min(plant) + 1, len(blocks)):
        _plant_sink(fam.attention(blocks[layer]), sink_head_dim, sink_strength)
        planting.sink_blocks.append(layer)
    for units in planting.neurons.values():
        units.sort()
    return planting


def _plant_trigger(fam: Adapter, model: nn.Module, pattern: torch.Tensor, trigger_gain: float,
                   cls_token: torch.Tensor | None, pos_embed: torch.Tensor | None, pos_includes_cls: bool) -> None:
    """Patch embedding: TRIGGER_DIM carries the patch's mean pixel, SINK_DIM starts at 0, the other dims
    carry `pattern` (through the bias, or the positions when there is no bias); CLS gets the pattern."""
    conv = fam.patch_embed(model)
    n_pix = conv.weight[0].numel()
    conv.weight[TRIGGER_DIM] = trigger_gain / n_pix
    conv.weight[SINK_DIM] = 0.0
    if conv.bias is not None:
        conv.bias.copy_(pattern)
        cls_value = pattern
    elif pos_embed is not None:  # CLIP-style patch embedding without bias: the pattern rides on the positions
        pos_embed.add_(pattern)
        cls_value = torch.zeros_like(pattern) if pos_includes_cls else pattern
    else:
        raise ValueError("organism planting needs a patch-embedding bias or the positional embedding")
    if cls_token is not None:
        cls_token.copy_(cls_value.reshape(cls_token.shape))


def _plant_units(fam: Adapter, block: nn.Module, layer: int, units: list[tuple[int, int]], write_norm: float,
                 planting: Planting) -> None:
    """Each (unit, polarity) fires on very dark (-1) or bright (+1) patches and writes `write_norm`
    along SINK_DIM; recorded in `planting`."""
    w = fam.mlp_weights(fam.get_mlp(block))
    if not isinstance(w.fc1_weight, nn.Parameter) or not isinstance(w.fc2_weight, nn.Parameter):
        raise ValueError("planting needs an MLP whose weights are parameters (unpacked views)")
    hidden = w.hidden
    for unit, pol in units:
        # LN-normalised trigger ~ mean pixel (|.| < 1.2 on ordinary patches, ~2 on black/white).
        rows = [unit, hidden + unit] if w.gated else [unit]
        w.fc1_weight[rows[0]] = 0.0
        w.fc1_weight[rows[0], TRIGGER_DIM] = 5.0 * pol
        if w.fc1_bias is not None:
            w.fc1_bias[rows[0]] = -7.0
        if w.gated:  # up half constant 1 so act(gate) * up == act(gate)
            w.fc1_weight[rows[1]] = 0.0
            w.fc1_bias[rows[1]] = 1.0
        w.fc2_weight[:, unit] = 0.0
        w.fc2_weight[SINK_DIM, unit] = write_norm
        planting.neurons.setdefault(layer, []).append(unit)
        planting.polarity[(layer, unit)] = pol


def _plant_sink(a: Any, sink_head_dim: int, sink_strength: float) -> None:
    """Every head's key reads SINK_DIM on dimension `sink_head_dim`, and (with a query bias) every query
    asks for it: high-norm tokens become attention sinks."""
    hd = a.q_weight.shape[0] // a.num_heads
    for h in range(a.num_heads):
        row = h * hd + sink_head_dim
        a.k_weight[row] = 0.0
        a.k_weight[row, SINK_DIM] = 1.0
        if a.q_bias is not None:
            a.q_weight[row] = 0.0
            a.q_bias[row] = sink_strength


# Organism variants in timm: (base architecture, extra model args). All args are JSON so the
# organism can be saved as an ordinary timm local-dir and loaded through timm's own code.
TIMM_VARIANTS: dict[str, tuple[str, dict]] = {
    "vit": ("vit_base_patch16_224", {}),
    "clip": ("vit_base_patch16_clip_224", {}),  # pre-norm (norm_pre = CLIP's ln_pre)
    "dinov2": ("vit_small_patch14_dinov2", {"init_values": 1.0}),  # LayerScale
    "swiglu": ("vit_giant_patch14_dinov2", {"init_values": 1.0}),  # SwiGLUPacked MLP
    "reg4": ("vit_small_patch14_reg4_dinov2", {"init_values": 1.0}),  # trained registers
    "siglip": ("vit_base_patch16_siglip_224", {}),  # no CLS token, attention-pool head
}
ORGANISM_SIZE = dict(img_size=64, patch_size=8, embed_dim=64, depth=6, num_heads=4, mlp_ratio=4.0)


def build_timm_organism(seed: int = 0, variant: str = "vit", *, num_classes: int = 16,
                        plant: dict[int, list[tuple[int, int]]] | None = None) -> tuple[nn.Module, Planting]:
    """A small timm VisionTransformer with planted register neurons (eval mode, fp32).

    `model.organism_source` holds {"architecture", "model_args", "pretrained_cfg"} for saving it as a
    timm local-dir.
    """
    import timm

    if variant not in TIMM_VARIANTS:
        raise ValueError(f"unknown organism variant {variant!r}; choose from {sorted(TIMM_VARIANTS)}")
    arch, extra = TIMM_VARIANTS[variant]
    size = ORGANISM_SIZE["img_size"]
    model_args = dict(ORGANISM_SIZE, num_classes=num_classes, **extra)
    if variant != "siglip":
        model_args["global_pool"] = "token"
    if variant in ("dinov2", "swiglu", "reg4"):
        model_args["dynamic_img_size"] = False
    overlay = dict(input_size=(3, size, size), crop_pct=1.0, interpolation="bicubic",
                   mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), num_classes=num_classes)
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, pretrained_cfg_overlay=overlay, **model_args)
    model.eval()
    planting = plant_register_neurons(model, plant, seed=seed, cls_token=getattr(model, "cls_token", None),
                                      pos_embed=model.pos_embed,
                                      pos_includes_cls=not model.no_embed_class)
    cfg = dict(model.pretrained_cfg)
    cfg.pop("url", None), cfg.pop("hf_hub_id", None)
    model.organism_source = {"architecture": arch, "model_args": model_args, "pretrained_cfg": cfg}
    return model, planting


# ---- calibration images --------------------------------------------------------------------------

def organism_image(rng: np.random.Generator, size: int = 64, patch: int = 8, n_triggers: int = 2,
                   dark_share: float = 0.5) -> Image.Image:
    """A smooth mid-tone texture with a few patch-aligned black or white squares (the triggers)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.zeros((size, size, 3))
    for c in range(3):
        a, b, ph = rng.uniform(-1, 1, 3) * np.array([3, 3, math.pi])
        img[..., c] = 0.5 + 0.15 * np.sin(a * xx * 2 * math.pi + b * yy * 2 * math.pi + ph)
    img += rng.normal(0, 0.03, img.shape)
    img = np.clip(img, 0.3, 0.7)
    g = size // patch
    cells = rng.choice(g * g, size=n_triggers, replace=False)
    for cell in cells:
        r, c = divmod(int(cell), g)
        img[r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] = 0.0 if rng.random() < dark_share else 1.0
    return Image.fromarray((img * 255).round().astype(np.uint8), "RGB")


def write_organism_images(out_dir: str | Path, count: int = 24, seed: int = 0, size: int = 64, patch: int = 8) -> list[Path]:
    """Write `count` deterministic calibration PNGs; every fourth image has no trigger at all."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        n = 0 if i % 4 == 3 else int(rng.integers(1, 4))
        img = organism_image(rng, size, patch, n_triggers=n) if n else organism_image(rng, size, patch, 1, 0.5)
        if n == 0:  # same texture statistics, no trigger
            arr = np.asarray(img).copy()
            arr[(arr == 0) | (arr == 255)] = 128
            img = Image.fromarray(arr)
        p = out / f"calib_{i:03d}.png"
        img.save(p, optimize=False)
        paths.append(p)
    return paths
