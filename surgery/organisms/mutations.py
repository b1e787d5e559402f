"""Wrong bakes the judge must refuse, and real-size planted ViTs to make them on.

Each mutation takes a correct baked model (or, for `wrong_unit`, the source and the recipe) and returns
a model that differs from the test-time-register rule in one way a real bug would:

- `branch_scale`: the register branch's output projection scaled by 1.05 (a wrong register value);
- `wrong_unit`: one register neuron replaced by its neighbour unit (a wrong neurons file);
- `register_position`: the register token inserted one slot later than recorded (after the first
  patch), edits following it (the layout the model's metadata no longer describes);
- `prefix_count`: the MLP branches count the register as a prefix token (`num_prefix + 1`), so the
  register row keeps its own value and the first patch gets the signed max.

The real-size builders plant register neurons into a randomly initialised timm CLIP ViT (ViT-B/16 or
ViT-L/14 shape), as a user's own checkpoint of that size would carry them.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from ..core.modules import PrependRegisters, RegisterMlp
from ..core.recipe import Recipe

# Planted units (unit, polarity) in blocks 5 and 6: the register neurons of a ViT-B/16 CLIP sit in its
# middle blocks (REFERENCE.md: layers <= 5).
REAL_SIZE_PLANT = {5: [(17, -1), (101, -1), (500, -1)], 6: [(42, +1), (900, -1)]}
REAL_SIZE_ARCHS = {"vit_b16": "vit_base_patch16_clip_224", "vit_l14": "vit_large_patch14_clip_224"}
# Trigger gain per shape, so that the planted units fire on exactly the trigger patches and their tokens
# end up tens of times the median token norm, as real register neurons make them (REFERENCE.md). ViT-L/14
# needs 4x: its transform maps black to -1 (mean = std = 0.5) where ViT-B/16's OpenAI statistics give
# -1.8, and its five random blocks before the planted ones blur the trigger dimension across tokens. With
# 3.0 no ViT-L unit fired (outliers 1.1x the median, the register branch ~4e-4 of the register token);
# with 12.0, on 4 organism images at 224 px: 39x the median after block 6, and no ordinary patch fires.
REAL_SIZE_TRIGGER_GAIN = {"vit_b16": 3.0, "vit_l14": 12.0}


def build_real_size_vit(shape: str = "vit_b16", seed: int = 0) -> tuple[nn.Module, Recipe]:
    """A timm CLIP ViT of real size (random init, eval mode, float32) with REAL_SIZE_PLANT planted at
    the shape's REAL_SIZE_TRIGGER_GAIN; returns it and the recipe of the planted units."""
    import timm

    from .vit import plant_register_neurons

    torch.manual_seed(seed)
    model = timm.create_model(REAL_SIZE_ARCHS[shape], pretrained=False,
                              pretrained_cfg_overlay=dict(crop_pct=1.0)).eval()
    planting = plant_register_neurons(model, REAL_SIZE_PLANT, seed=seed, cls_token=model.cls_token,
                                      pos_embed=model.pos_embed, pos_includes_cls=not model.no_embed_class,
                                      trigger_gain=REAL_SIZE_TRIGGER_GAIN[shape])
    return model, Recipe(planting.neurons)


def _modules(model: nn.Module, kind: type) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, kind)]


def branch_scale(baked: nn.Module, factor: float = 1.05) -> nn.Module:
    out = copy.deepcopy(baked)
    with torch.no_grad():
        _modules(out, RegisterMlp)[0].reg_fc2.weight.mul_(factor)
    return out


def register_position(baked: nn.Module) -> nn.Module:
    out = copy.deepcopy(baked)
    for m in _modules(out, PrependRegisters) + _modules(out, RegisterMlp):
        m.num_prefix += 1
    return out


def prefix_count(baked: nn.Module) -> nn.Module:
    out = copy.deepcopy(baked)
    for m in _modules(out, RegisterMlp):
        m.num_prefix += 1
    return out


def wrong_unit_recipe(recipe: Recipe) -> Recipe:
    """The recipe with its first block's first unit replaced by the next unit not already listed."""
    neurons = {b: list(u) for b, u in recipe.neurons.items()}
    first = sorted(neurons)[0]
    taken = set(neurons[first])
    unit = neurons[first][0] + 1
    while unit in taken:
        unit += 1
    neurons[first][0] = unit
    return Recipe(neurons, num_registers=recipe.num_registers, scale=recipe.scale, mode=recipe.mode)


# name -> fn(source, baked, recipe, bake) -> the mutated baked model; `bake(model, recipe)` bakes a copy
Mutation = Callable[[nn.Module, nn.Module, Recipe, Callable[[nn.Module, Recipe], nn.Module]], nn.Module]
MUTATIONS: dict[str, Mutation] = {
    "branch x1.05": lambda src, baked, recipe, bake: branch_scale(baked),
    "wrong unit": lambda src, baked, recipe, bake: bake(src, wrong_unit_recipe(recipe)),
    "register position": lambda src, baked, recipe, bake: register_position(baked),
    "prefix count": lambda src, baked, recipe, bake: prefix_count(baked),
}
