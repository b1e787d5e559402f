"""DINOv2: timm DINOv2 organisms (LayerScale, SwiGLU, trained registers), the DINOv2 torch-hub checkpoint
layout loaded into timm through timm's own checkpoint filter, and the published register neurons of
DINOv2 ViT-L/14 (no calibration images needed)."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from surgery import published
from surgery.core.bake import bake_registers, register_token_indices
from surgery.demo import save_organism
from surgery.core.errors import ModelInputError, NeuronsFileError, UnsafeCheckpointError, UsageError
from surgery.backends import adapter_for
from surgery.core.images import ImageBatches, list_images
from surgery.core.source import LoadedModel, SourceInfo
from surgery.backends import load_model
from surgery.organisms.vit import build_timm_organism
from surgery.core.images import builtin_images
from surgery.organisms.families import build_dinov2_hub_organism
from surgery.core.parity import check_parity
from surgery.pipeline import resolve_recipe, run_check, run_convert

TOL = 1e-5
VARIANTS = ["plain", "swiglu", "reg4"]


@pytest.fixture(scope="module")
def hub_organisms(tmp_path_factory):
    """variant -> (timm model, planting, path of the torch-hub style .pth)."""
    root = tmp_path_factory.mktemp("dinov2_hub")
    out = {}
    for v in VARIANTS:
        model, planting, sd = build_dinov2_hub_organism(0, v)
        path = root / f"dinov2_organism_{v}_pretrain.pth"
        torch.save(sd, path)
        out[v] = (model, planting, path)
    return out


def _pixels(model, n=6):
    tf = adapter_for(model).data_transform(model)
    return torch.cat([x for x, _ in ImageBatches(list_images(builtin_images())[:n], tf, n, progress=False)])


# ---- timm DINOv2 organisms ---------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["dinov2", "swiglu", "reg4"])
def test_timm_dinov2_organisms_convert_and_check(variant, tmp_path):
    model, planting = build_timm_organism(0, variant)
    src = save_organism(model, tmp_path / "src")
    res = run_convert(load_model(str(src)), tmp_path / "out", images=builtin_images(), progress=False)
    assert {k: list(v) for k, v in res.recipe.neurons.items()} == planting.neurons
    assert res.report.passed, res.report.summary()
    baked = load_model(str(tmp_path / "out"))
    p = 5 if variant == "reg4" else 1
    assert register_token_indices(baked.model, adapter=baked.adapter) == [p]  # after CLS and the trained registers
    if variant == "swiglu":
        assert baked.model.blocks[2].mlp.gated


def test_registers_go_after_the_trained_registers():
    from surgery.core.recipe import Recipe

    model, planting = build_timm_organism(0, "reg4")
    fam = adapter_for(model)
    baked = bake_registers(copy.deepcopy(model), Recipe(planting.neurons), adapter=fam)
    seen = []
    baked.norm_pre.inner.register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    x = _pixels(model, 4)
    with torch.no_grad():
        a, b = model.forward_features(x), baked.forward_features(x)
    assert b.shape[1] == a.shape[1] + 1 and baked.num_prefix_tokens == 6 and baked.num_reg_tokens == 5
    tokens = seen[0]  # what enters the pre-norm: [cls, 4 trained registers, test-time register (zeros), patches]
    assert torch.equal(tokens[:, 1:5], model.reg_token.expand(4, -1, -1))
    assert torch.count_nonzero(tokens[:, 5]) == 0 and register_token_indices(baked, adapter=fam) == [5]


# ---- the torch-hub checkpoint layout -----------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_hub_layout_loads_into_timm(variant, hub_organisms):
    model, _, path = hub_organisms[variant]
    sd = torch.load(path, weights_only=True)
    assert "mask_token" in sd and "blocks.0.ls1.gamma" in sd
    assert ("blocks.0.mlp.w12.weight" in sd) == (variant == "swiglu")
    assert ("register_tokens" in sd) == (variant == "reg4")
    loaded = load_model(f"dinov2:{path}")
    assert loaded.source.library == "timm" and loaded.source.checkpoint_layout == "dinov2-torch-hub"
    assert loaded.source.architecture == {"plain": "vit_small_patch14_dinov2", "swiglu": "vit_giant_patch14_dinov2",
                                             "reg4": "vit_small_patch14_reg4_dinov2"}[variant]
    x = _pixels(model, 3)
    with torch.no_grad():
        assert torch.equal(loaded.model.forward_features(x), model.forward_features(x))
    assert loaded.adapter.num_prefix_tokens(loaded.model) == (5 if variant == "reg4" else 1)


@pytest.mark.parametrize("variant", VARIANTS)
def test_hub_layout_convert_and_check(variant, hub_organisms, tmp_path):
    model, planting, path = hub_organisms[variant]
    res = run_convert(load_model(f"dinov2:{path}"), tmp_path / "out", images=builtin_images(), progress=False)
    assert {k: list(v) for k, v in res.recipe.neurons.items()} == planting.neurons
    assert res.report.passed, res.report.summary()
    baked = load_model(str(tmp_path / "out"))  # an ordinary timm folder
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architecture"] == "vit_surgery_baked"
    batches = [x for x, _ in ImageBatches(list_images(builtin_images())[:8], baked.transform, 8, progress=False)]
    report, _ = run_check(baked, batches)
    assert report.passed, report.summary()


def test_hub_layout_spec_forms_and_errors(hub_organisms, tmp_path):
    _, _, path = hub_organisms["plain"]
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / path.name).write_bytes(path.read_bytes())
    assert load_model(f"dinov2:{folder}").source.architecture == "vit_small_patch14_dinov2"
    assert load_model(str(path)).source.checkpoint_layout == "dinov2-torch-hub"  # bare path, recognised by keys
    with pytest.raises(ModelInputError, match="not found"):
        load_model(f"dinov2:{tmp_path / 'nope.pth'}")
    other = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(2)}, other)
    with pytest.raises(ModelInputError, match="not a DINOv2 torch-hub checkpoint"):
        load_model(f"dinov2:{other}")
    sd = torch.load(path, weights_only=True)
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"model": sd, "args": Namespace()}, unsafe)
    with pytest.raises(UnsafeCheckpointError, match="allow-unsafe-pickle"):
        load_model(f"dinov2:{unsafe}")


class Namespace:  # a pickled object: loading it needs full unpickling
    pass


# ---- published register neurons (DINOv2 ViT-L/14) ------------------------------------------------

def _fast_random(model: torch.nn.Module) -> torch.nn.Module:
    """Materialise a meta-device model with random weights quickly (std 0.02, unit norms, LayerScale 0.1)."""
    model = model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 or "token" in name:
                p.normal_(0, 0.02, generator=g)
            elif name.endswith("gamma"):
                p.fill_(0.1)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02, generator=g)
    return model.eval()


def _vit_large(arch: str = "vit_large_patch14_dinov2", **narrow) -> LoadedModel:
    """ViT-L/14 DINOv2 at 28 px (4 patches); `narrow` args shrink the residual width for speed."""
    import timm

    from surgery.backends.timm.loader import timm_source

    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False, img_size=28, num_classes=0,
                                  pretrained_cfg_overlay={"input_size": (3, 28, 28)}, **narrow)
    model = _fast_random(model)
    fam = adapter_for(model)
    return LoadedModel(model, fam, arch, timm_source(model, arch, {"img_size": 28}), fam.data_transform(model))


@pytest.fixture(scope="module")
def vit_large():
    return _vit_large()


def test_published_dinov2_vitl14_validates_bakes_and_passes_parity(vit_large):
    recipe, _ = resolve_recipe(vit_large, "dinov2_vitl14", {})
    assert recipe.num_neurons == 45 and sorted(recipe.neurons) == [12, 13, 14, 15, 16, 17]
    assert recipe.neurons[17][-1] == 4047
    baked = bake_registers(copy.deepcopy(vit_large.model), recipe, adapter=vit_large.adapter)
    x = torch.randn(4, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    report = check_parity(vit_large.model, baked, recipe, [x[:3], x[3:]], adapter=vit_large.adapter)
    assert report.passed, report.summary()
    # recognised by name: `convert vit_large_patch14_dinov2` needs no --neurons and no images
    assert published.published_for_model(vit_large) == "dinov2_vitl14"
    for spec in ("dinov2:/models/dinov2_vitl14_pretrain.pth", "hf:facebook/dinov2-large"):
        assert published.published_for_model(LoadedModel(vit_large.model, vit_large.adapter, spec, SourceInfo("timm"), None)) == \
            "dinov2_vitl14"


def test_published_set_is_not_applied_to_the_trained_register_sibling():
    reg = _vit_large("vit_large_patch14_reg4_dinov2", embed_dim=64, num_heads=1, mlp_ratio=64)  # depth 24, MLP 4096
    assert reg.adapter.num_prefix_tokens(reg.model) == 5
    named_like_l14 = LoadedModel(reg.model, reg.adapter, "dinov2:/m/dinov2_vitl14_reg4_pretrain.pth", SourceInfo("timm"), None)
    assert published.published_for_model(named_like_l14) is None
    assert published.published_for_model(reg) is None


def test_published_set_on_a_model_of_another_size_is_refused(hub_organisms):
    loaded = load_model(f"dinov2:{hub_organisms['plain'][2]}")
    with pytest.raises(NeuronsFileError, match="does not exist|out of range"):
        resolve_recipe(loaded, "dinov2_vitl14", {})
    with pytest.raises(NeuronsFileError, match="not a file and not a published set"):
        resolve_recipe(loaded, "dinov2_vitx99", {})


def test_convert_picks_the_published_set_automatically(hub_organisms, tmp_path, monkeypatch, capsys):
    """Adding a model is one data entry; `convert MODEL` then needs neither --neurons nor --images."""
    from surgery.cli import main

    _, planting, path = hub_organisms["plain"]
    reg = dict(published.registry())
    reg["organism_dinov2"] = {"source": "test organism", "models": ["dinov2_organism_plain"], "depth": 6,
                              "register_neurons": {str(k): v for k, v in planting.neurons.items()}}
    monkeypatch.setattr(published, "registry", lambda: reg)
    res = run_convert(load_model(f"dinov2:{path}"), tmp_path / "out", progress=False)
    assert {k: list(v) for k, v in res.recipe.neurons.items()} == planting.neurons and res.report.passed
    assert main(["convert", f"dinov2:{path}", "--out", str(tmp_path / "cli"), "-q"]) == 0
    assert (tmp_path / "cli" / "model.safetensors").exists()
    # no published set for this one: a clear error, nothing written
    other = hub_organisms["swiglu"][2]
    assert main(["convert", f"dinov2:{other}", "--out", str(tmp_path / "none"), "-q"]) == UsageError.exit_code
    assert "no published register neurons" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
