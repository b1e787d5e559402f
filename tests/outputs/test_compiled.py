"""Compiled PyTorch deployment of the baked model outside timm (timm's own tests cover timm, in
tests/clients/test_timm_model_tests.py): the baked HF transformers and open_clip image towers run under
`torch.compile(fullgraph=True)` (no graph break: the register edit has no data-dependent Python control
flow) and `torch.export`, each equal to the eager baked model. Graph capture uses the "eager" backend: it
proves there is no graph break without paying for code generation in the default tier."""
from __future__ import annotations

import copy

import pytest
import torch

from surgery.backends import adapter_for
from surgery.core.bake import bake_registers
from surgery.core.modules import RegisterMlp
from surgery.core.recipe import Recipe
from surgery.organisms.eva import build_hf_siglip_organism
from surgery.organisms.families import build_hf_clip_organism, build_hf_dinov2_organism, build_open_clip_organism


class _HFTokens(torch.nn.Module):
    """An HF vision model as users call it: pixel_values -> last_hidden_state."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).last_hidden_state


BUILDERS = {
    "hf_clip": lambda: build_hf_clip_organism(0),
    "hf_dinov2": lambda: build_hf_dinov2_organism(0),
    "hf_siglip": lambda: build_hf_siglip_organism(0),
    "open_clip": lambda: (lambda clip, planting: (clip.visual, planting))(*build_open_clip_organism(0)),
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
@torch.no_grad()
def test_baked_tower_compiles_fullgraph_and_exports(name):
    model, planting = BUILDERS[name]()
    model.eval()
    fam = adapter_for(model)
    recipe = Recipe({int(k): v for k, v in planting.neurons.items()})
    baked = bake_registers(copy.deepcopy(model), recipe, adapter=fam).eval()
    assert any(isinstance(m, RegisterMlp) for m in baked.modules())
    runnable = baked if name == "open_clip" else _HFTokens(baked)  # open_clip: visual(x) is the embedding
    size = fam.input_size(model)[-1]
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    want = runnable(x)
    torch._dynamo.reset()
    compiled = torch.compile(runnable, fullgraph=True, backend="eager")  # fullgraph: a graph break is an error
    torch.testing.assert_close(compiled(x), want, rtol=1e-6, atol=1e-6)
    exported = torch.export.export(runnable, (x,))
    torch.testing.assert_close(exported.module()(x), want, rtol=1e-6, atol=1e-6)
