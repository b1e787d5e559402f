"""Checkpoints of vit-surgery 0.1.0 stored each RegisterMlp split: the register units' fc1 rows in a
`reg_fc1` of its own and zero in fc1 (README of 0.1.0: "The register units' weights move to the branch
(`reg_fc1` rows, `reg_fc2` columns); the ordinary MLP keeps its shape with those rows and columns
zeroed"). Such a file is written here from that sentence, then loaded the two ways a checkpoint is loaded
(torch `load_state_dict`, as timm's `load_checkpoint` does, and the project's streamed reader): the model
must come out bit for bit the one baked now, and compute the same."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

from surgery import Recipe, bake_registers
from surgery.backends import adapter_for
from surgery.core.modules import RegisterMlp
from surgery.core.weights import load_safetensors_streamed
from surgery.organisms.vit import build_timm_organism


def _split_as_010(state: dict[str, torch.Tensor], baked: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`state` in 0.1.0's layout, from its README's sentence (not from the code under test)."""
    out = {k: v.clone() for k, v in state.items()}
    for name, mod in baked.named_modules():
        if isinstance(mod, RegisterMlp):
            p = name + "."
            units = out[p + "units"]
            rows = torch.cat([units, mod.hidden_features + units]) if mod.gated else units
            out[p + "reg_fc1.weight"] = out[p + "fc1.weight"][rows].clone()
            out[p + "fc1.weight"][rows] = 0.0
            if p + "fc1.bias" in out:
                out[p + "reg_fc1.bias"] = out[p + "fc1.bias"][rows].clone()
                out[p + "fc1.bias"][rows] = 0.0
    return out


@pytest.mark.parametrize("variant", ["clip", "swiglu"])
def test_a_010_checkpoint_loads_as_the_model_baked_now(variant, tmp_path):
    model, planting = build_timm_organism(0, variant)
    recipe = Recipe({int(k): list(v) for k, v in planting.neurons.items()})
    fam = adapter_for(model)
    baked = bake_registers(copy.deepcopy(model), recipe, adapter=fam).eval()
    state = baked.state_dict()
    legacy = _split_as_010(state, baked)
    assert any(k.endswith("reg_fc1.weight") for k in legacy) and not any(k.endswith("reg_fc1.weight") for k in state)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = baked.forward_features(x)

    fresh = bake_registers(copy.deepcopy(model), recipe, adapter=fam).eval()
    for t in fresh.state_dict().values():
        t.data.zero_() if t.is_floating_point() else None
    fresh.load_state_dict(legacy, strict=True)  # no missing / unexpected keys
    for k, v in state.items():
        assert torch.equal(fresh.state_dict()[k], v), k

    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in legacy.items()}, str(path))
    streamed = bake_registers(copy.deepcopy(model), recipe, adapter=fam).eval()
    load_safetensors_streamed(streamed, path)
    for k, v in state.items():
        assert torch.equal(streamed.state_dict()[k], v), k
    with torch.no_grad():
        assert torch.equal(fresh.forward_features(x), want)
        assert torch.equal(streamed.forward_features(x), want)


def test_a_legacy_branch_of_the_wrong_shape_is_refused(tmp_path):
    model, planting = build_timm_organism(0, "clip")
    recipe = Recipe({int(k): list(v) for k, v in planting.neurons.items()})
    fam = adapter_for(model)
    baked = bake_registers(copy.deepcopy(model), recipe, adapter=fam)
    legacy = _split_as_010(baked.state_dict(), baked)
    key = next(k for k in legacy if k.endswith("reg_fc1.weight"))
    legacy[key] = legacy[key][:, :-1].contiguous()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in legacy.items()}, str(path))
    with pytest.raises(RuntimeError, match=r"size mismatch for \S*reg_fc1\.weight"):
        load_safetensors_streamed(bake_registers(copy.deepcopy(model), recipe, adapter=fam), path)
