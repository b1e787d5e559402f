"""Baking: rewrite a model in place so the test-time register is part of its weights and graph."""
from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch
from torch import nn

from .errors import ModelInputError
from .adapter import Adapter
from .modules import PrependRegisters, RegisterMlp
from .recipe import Recipe, validate_recipe_for_model


def recipe_of(model: nn.Module) -> Recipe | None:
    """The recipe a baked model carries, or None for an untouched model."""
    return getattr(model, "surgery_recipe", None)


@torch.no_grad()
def split_mlp(family: Adapter, block: nn.Module, units: list[int], num_prefix: int, recipe: Recipe) -> RegisterMlp:
    """Replace `block`'s MLP by a RegisterMlp whose branch holds `units`."""
    weights = family.mlp_weights(family.get_mlp(block))
    hidden = weights.hidden
    assert all(0 <= u < hidden for u in units), (units, hidden)
    new = RegisterMlp(weights, units, num_prefix, recipe.num_registers, recipe.scale, recipe.mode == "per_neuron")
    family.set_mlp(block, new)
    return new


@torch.no_grad()
def bake_registers(model: nn.Module, recipe: Recipe, *, adapter: Adapter) -> nn.Module:
    """Bake `recipe` into `model` in place and return it.

    The register tokens are inserted at the family's insertion point (a PrependRegisters buffer in
    front of the pre-norm), the listed blocks get a RegisterMlp, and the model's prefix-token count
    grows by R so downstream pooling and slicing skip the registers.
    """
    fam = adapter
    if recipe_of(model) is not None:
        raise ModelInputError("this model already carries baked test-time registers")
    blocks = fam.blocks(model)
    validate_recipe_for_model(recipe, len(blocks), [fam.mlp_width(b) for b in blocks])
    p = fam.num_prefix_tokens(model)
    for layer, units in recipe.neurons.items():
        split_mlp(fam, blocks[layer], list(units), p, recipe)
    parent, attr = fam.insertion_point(model)
    inner = getattr(parent, attr)
    ref = next(model.parameters())
    inserter = fam.inserter(inner, recipe.num_registers, fam.embed_dim(model), p).to(ref.device, ref.dtype)
    setattr(parent, attr, inserter)
    fam.set_num_prefix_tokens(model, p + recipe.num_registers)
    model.surgery_recipe = recipe
    return model


def baked_copy(model: nn.Module, recipe: Recipe, *, adapter: Adapter) -> nn.Module:
    """A baked deep copy of `model`; `model` itself is left as it is (convert bakes in place instead:
    `baked_in_place`, no copy)."""
    return bake_registers(copy.deepcopy(model), recipe, adapter=adapter)


def unbaked_copy(model: nn.Module, *, adapter: Adapter) -> nn.Module:
    """The source of a baked `model` as a deep copy with the registers taken out (exact: the split is a
    permutation of the original units); `model` stays baked."""
    source = copy.deepcopy(model)
    unbake(source, adapter=adapter)
    return source


def register_token_indices(model: nn.Module, *, adapter: Adapter) -> list[int]:
    """Sequence positions of the test-time registers in a baked model's token output."""
    recipe = recipe_of(model)
    if recipe is None:
        return []
    fam = adapter
    p = fam.num_prefix_tokens(model) - recipe.num_registers
    return list(range(p, p + recipe.num_registers))


@torch.no_grad()
def unbake(model: nn.Module, *, adapter: Adapter) -> Recipe:
    """Undo `bake_registers` in place (exactly: the split is a permutation of the original units).

    Returns the recipe that was baked. Lets `check` rebuild the source model from a baked checkpoint.
    """
    fam = adapter
    recipe = recipe_of(model)
    if recipe is None:
        raise ModelInputError("this model carries no baked test-time registers")
    for block in fam.blocks(model):
        mlp = fam.get_mlp(block)
        if isinstance(mlp, RegisterMlp):
            fam.set_mlp(block, fam.make_mlp(mlp.merged_weights()))
    parent, attr = fam.insertion_point(model)
    inserter = getattr(parent, attr)
    assert isinstance(inserter, PrependRegisters), type(inserter)
    setattr(parent, attr, inserter.inner)
    fam.set_num_prefix_tokens(model, fam.num_prefix_tokens(model) - recipe.num_registers)
    del model.surgery_recipe
    return recipe


@contextlib.contextmanager
def baked_in_place(model: nn.Module, recipe: Recipe, *, adapter: Adapter) -> Iterator[nn.Module]:
    """`model` baked within the context and exactly the original afterwards: the original MLP and
    insertion modules are kept aside and put back (not rebuilt), so convert needs no copy of the model.
    The split copies weights, so while baked the model costs its size plus the split MLPs."""
    fam = adapter
    blocks = list(fam.blocks(model))
    mlps = [fam.get_mlp(b) for b in blocks]
    parent, attr = fam.insertion_point(model)
    inner = getattr(parent, attr)
    p = fam.num_prefix_tokens(model)
    try:
        yield bake_registers(model, recipe, adapter=fam)
    finally:
        for block, mlp in zip(blocks, mlps):
            fam.set_mlp(block, mlp)
        setattr(parent, attr, inner)
        fam.set_num_prefix_tokens(model, p)
        if "surgery_recipe" in vars(model):
            del model.surgery_recipe
