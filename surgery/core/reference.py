"""The hooked reference: the paper's test-time-register intervention as forward hooks.

Unlike the public reference code it treats every image of a batch (each gets its own signed max),
leaves the CLS/prefix rows alone and never copies activations to the host. It is the ground truth
that `check_parity` compares a baked model against.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from .adapter import Adapter
from .modules import register_edit
from .recipe import Recipe


@contextlib.contextmanager
def hooked_reference(model: nn.Module, recipe: Recipe, *, adapter: Adapter) -> Iterator[nn.Module]:
    """Within the context, `model` computes the test-time-register intervention given by `recipe`.

    R zero tokens are inserted after the prefix tokens at the pre-norm input; in each listed block
    the register-neuron activations (input of the MLP down projection) are edited by
    `register_edit`. The model's prefix-token count is raised by R inside the context so pooling and
    token slicing skip the registers, exactly as in the baked model.
    """
    fam = adapter
    p = fam.num_prefix_tokens(model)
    R = recipe.num_registers
    dim = fam.embed_dim(model)
    blocks = fam.blocks(model)
    handles = []

    def add_registers(_mod: nn.Module, args: tuple) -> tuple:
        x = args[0]
        reg = torch.zeros(x.shape[0], R, dim, dtype=x.dtype, device=x.device)
        return (torch.cat([x[:, :p], reg, x[:, p:]], dim=1),) + tuple(args[1:])

    def make_edit(units: torch.Tensor):
        def edit(_mod: nn.Module, args: tuple) -> tuple:
            h = args[0]
            edited = register_edit(h.index_select(-1, units.to(h.device)), p, R, recipe.scale,
                                   recipe.mode == "per_neuron")
            h = h.index_copy(-1, units.to(h.device), edited.to(h.dtype))
            return (h,) + tuple(args[1:])
        return edit

    parent, attr = fam.insertion_point(model)
    try:
        handles.append(getattr(parent, attr).register_forward_pre_hook(add_registers))
        for layer, units in recipe.neurons.items():
            down = fam.down_proj(fam.get_mlp(blocks[layer]))
            handles.append(down.register_forward_pre_hook(make_edit(torch.tensor(units, dtype=torch.long))))
        fam.set_num_prefix_tokens(model, p + R)
        yield model
    finally:
        for h in handles:
            h.remove()
        fam.set_num_prefix_tokens(model, p)
