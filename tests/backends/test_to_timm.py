"""convert --to timm: open_clip CLIP, HF CLIP and HF DINOv2 towers re-expressed as timm ViTs, then baked."""
from __future__ import annotations

import json

import pytest
import timm
import torch

import surgery
from surgery.cli import main
from surgery.backends import adapter_for, load_model
from surgery.organisms.families import (build_hf_clip_organism, build_hf_dinov2_organism, build_open_clip_organism,
                                        save_hf_organism, save_open_clip_organism)
from surgery.to_timm import to_timm


def _convert_and_compare(src, planting, tmp_path, calib_dir, capsys, prefix_tokens: int) -> None:
    """convert --to timm finds the planted neurons, and the baked timm folder reproduces the hooked
    reference on the source model (pooled output, fp32 tolerance)."""
    out = tmp_path / "out"
    code = main(["convert", str(src), "--images", str(calib_dir), "--out", str(out), "--to", "timm", "-q"])
    _, err = capsys.readouterr()
    assert code == 0, err
    doc = json.loads((out / "surgery.json").read_text())
    assert doc["recipe"]["register_neurons"] == {str(k): v for k, v in planting.neurons.items()}
    assert json.loads((out / "parity.json").read_text())["parity"]["passed"]
    baked = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert baked.num_prefix_tokens == prefix_tokens
    loaded = load_model(str(src))
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad(), surgery.hooked_reference(loaded.model, surgery.Recipe(planting.neurons), adapter=adapter_for(loaded.model)):
        reference = loaded.adapter.forward_pooled(loaded.model, x)
    with torch.no_grad():
        got = baked(x)
    assert float((got - reference).norm(dim=-1).max() / reference.norm(dim=-1).min()) < 1e-5


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_open_clip_to_timm_folder(quick_gelu, tmp_path, calib_dir, capsys):
    clip, planting = build_open_clip_organism(0, quick_gelu=quick_gelu)
    src = save_open_clip_organism(clip, tmp_path / "oc")
    _convert_and_compare(src, planting, tmp_path, calib_dir, capsys, prefix_tokens=2)


@pytest.mark.parametrize("full_clip", [False, True])
def test_hf_clip_to_timm_folder(full_clip, tmp_path, calib_dir, capsys):
    model, planting = build_hf_clip_organism(0, full_clip=full_clip)
    src = save_hf_organism(model, tmp_path / "hf")
    _convert_and_compare(src, planting, tmp_path, calib_dir, capsys, prefix_tokens=2)


@pytest.mark.parametrize("kw", [{}, {"swiglu": True}, {"num_register_tokens": 4}], ids=["plain", "swiglu", "reg4"])
def test_hf_dinov2_to_timm_folder(kw, tmp_path, calib_dir, capsys):
    model, planting = build_hf_dinov2_organism(0, **kw)
    src = save_hf_organism(model, tmp_path / "hf")
    _convert_and_compare(src, planting, tmp_path, calib_dir, capsys,
                         prefix_tokens=1 + kw.get("num_register_tokens", 0) + 1)


def test_to_timm_refuses_towers_without_a_timm_equivalent(tmp_path):
    from surgery.core.errors import ModelInputError

    clip, _ = build_open_clip_organism(0, attentional_pool=True)
    src = save_open_clip_organism(clip, tmp_path / "ap")
    with pytest.raises(ModelInputError, match="no timm equivalent"):
        to_timm(load_model(str(src)))
