"""HF transformers: CLIPVisionModel, CLIPModel, Dinov2Model (GELU and SwiGLU), Dinov2WithRegistersModel.

Organisms are built in transformers' own module structure with planted register neurons, saved with
`save_pretrained`, loaded through transformers' real `from_pretrained` (folders and a fake offline hub
cache), discovered, baked, exported as an HF folder and checked against the hooked reference; the
export is also loaded the way users will: `AutoModel.from_pretrained(DIR, trust_remote_code=True)`.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

from surgery.core.bake import bake_registers, register_token_indices
from surgery.core.discovery import DiscoveryConfig, find_register_neurons
from surgery.core.errors import ModelInputError, SurgeryError, UnsafeCheckpointError
from surgery.backends import adapter_for
from surgery.core.images import ImageBatches, list_images
from surgery.backends import load_model
from surgery.core.images import builtin_images
from surgery.organisms.families import (build_hf_clip_organism, build_hf_dinov2_organism, save_hf_organism,
                                        write_fake_hub_repo)
from surgery.core.parity import check_parity
from surgery.pipeline import run_check, run_convert
from surgery.core.recipe import Recipe
from surgery.core.reference import hooked_reference

TOL = 1e-5
BUILDERS = {
    "clip_vision": lambda: build_hf_clip_organism(0),
    "clip_model": lambda: build_hf_clip_organism(0, full_clip=True),
    "dinov2": lambda: build_hf_dinov2_organism(0),
    "dinov2_swiglu": lambda: build_hf_dinov2_organism(0, swiglu=True),
    "dinov2_reg4": lambda: build_hf_dinov2_organism(0, num_register_tokens=4),
}
CLASSES = {"clip_vision": "CLIPVisionModel", "clip_model": "CLIPModel", "dinov2": "Dinov2Model",
           "dinov2_swiglu": "Dinov2Model", "dinov2_reg4": "Dinov2WithRegistersModel"}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.fixture(scope="module")
def organisms():
    return {k: b() for k, b in BUILDERS.items()}


@pytest.fixture(scope="module")
def saved(organisms, tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_src")
    return {k: save_hf_organism(m, root / k) for k, (m, _) in organisms.items()}


@pytest.fixture(scope="module")
def pixels(organisms):
    m, _ = organisms["dinov2"]
    tf = adapter_for(m).data_transform(m)
    files = list_images(builtin_images())
    return torch.cat([x for x, _ in ImageBatches(files[:12], tf, 12, progress=False)])


@pytest.fixture(scope="module")
def converted(saved, organisms, tmp_path_factory):
    """Each family converted with its planted neurons (clip_vision through discovery from images)."""
    root = tmp_path_factory.mktemp("hf_out")
    out = {}
    for k, src in saved.items():
        loaded = load_model(str(src))
        if k == "clip_vision":
            res = run_convert(loaded, root / k, images=builtin_images(), progress=False)
        else:
            nf = root / f"{k}.neurons.json"
            nf.write_text(json.dumps({"register_neurons": {str(a): b for a, b in organisms[k][1].neurons.items()}}))
            res = run_convert(loaded, root / k, neurons=str(nf), progress=False)
        out[k] = (loaded, res)
    return out


# ---- adapters and discovery --------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(BUILDERS))
def test_discovery_recovers_the_planted_neurons(kind, organisms):
    model, planting = organisms[kind]
    fam = adapter_for(model)
    assert fam.name == ("hf_clip" if kind.startswith("clip") else "hf_dinov2")
    res = find_register_neurons(model, list_images(builtin_images()), DiscoveryConfig(), adapter=fam, progress=False)
    assert {k: list(v) for k, v in res.recipe.neurons.items()} == planting.neurons


def test_token_layout_and_mlp_views(organisms):
    clip, _ = organisms["clip_model"]
    fam = adapter_for(clip)
    assert fam.vision(clip) is clip.vision_model and fam.insertion_point(clip) == (clip.vision_model, "pre_layrnorm")
    dino, _ = organisms["dinov2_reg4"]
    fam = adapter_for(dino)
    assert fam.num_prefix_tokens(dino) == 5 and fam.insertion_point(dino) == (dino.embeddings, "dropout")
    swi, _ = organisms["dinov2_swiglu"]
    w = adapter_for(swi).mlp_weights(swi.encoder.layer[0].mlp)
    assert w.gated and w.fc1_weight.shape[0] == 2 * w.hidden == 2 * swi.encoder.layer[0].mlp.down_proj.in_features


@pytest.mark.parametrize("kind", ["clip_vision", "dinov2_swiglu"])
def test_unbake_restores_the_stock_modules_exactly(kind, organisms, pixels):
    from surgery.core.bake import unbake

    model, planting = organisms[kind]
    fam = adapter_for(model)
    recipe = Recipe(planting.neurons)
    baked = bake_registers(copy.deepcopy(model), recipe, adapter=fam)
    unbake(baked, adapter=fam)
    assert type(baked.encoder.layers[2].mlp if kind.startswith("clip") else baked.encoder.layer[2].mlp) is \
        type(model.encoder.layers[2].mlp if kind.startswith("clip") else model.encoder.layer[2].mlp)
    with torch.no_grad():
        a, b = fam.forward_both(model, pixels[:4]), fam.forward_both(baked, pixels[:4])
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_every_image_of_a_batch_is_fixed(organisms, pixels):
    """The reference code edited only batch element 0; here each image matches its own batch-1 run."""
    model, planting = organisms["dinov2"]
    fam = adapter_for(model)
    baked = bake_registers(copy.deepcopy(model), Recipe(planting.neurons), adapter=fam)
    from surgery.core.effect import token_diagnostics

    x = pixels[:6]
    with torch.no_grad():
        full = fam.forward_tokens(baked, x)
        single = torch.cat([fam.forward_tokens(baked, x[i:i + 1]) for i in range(6)])
    assert rel(full, single) < TOL
    p = fam.num_prefix_tokens(model)

    def outliers(norms: torch.Tensor) -> torch.Tensor:  # last-block patch norms -> outliers per image
        return (norms > 2.5 * norms.median(dim=1, keepdim=True).values).sum(dim=1)

    before = outliers(token_diagnostics(model, x, adapter=fam)["norms"][-1][:, p:])
    after = outliers(token_diagnostics(baked, x, adapter=fam)["norms"][-1][:, p + 1:])
    assert int((before > 0).sum()) >= 3  # several images of the batch have outliers ...
    assert int(after.sum()) == 0  # ... and none is left in any of them


def test_attention_implementation_does_not_affect_parity(pixels):
    eager, planting = build_hf_clip_organism(0, attn_implementation="eager")
    sdpa, _ = build_hf_clip_organism(0, attn_implementation="sdpa")
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    recipe = Recipe(planting.neurons)
    baked = bake_registers(copy.deepcopy(sdpa), recipe, adapter=adapter_for(copy.deepcopy(sdpa)))
    report = check_parity(eager, baked, recipe, [pixels[:6], pixels[6:]], adapter=adapter_for(eager))
    assert report.passed, report.summary()


# ---- convert, check, AutoModel drop-in ---------------------------------------------------------

@pytest.mark.parametrize("kind", list(BUILDERS))
def test_convert_passes_check(kind, converted, organisms):
    loaded, res = converted[kind]
    assert loaded.source.library == "hf" and loaded.source.hf_class == CLASSES[kind]
    assert {k: list(v) for k, v in res.recipe.neurons.items()} == organisms[kind][1].neurons
    assert res.report.passed, res.report.summary()
    files = {p.name for p in res.out.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_vit_surgery.py", "preprocessor_config.json",
            "surgery.json", "README.md"} <= files
    cfg = json.loads((res.out / "config.json").read_text())
    p = 5 if kind == "dinov2_reg4" else 1
    assert cfg["auto_map"]["AutoModel"].startswith("modeling_vit_surgery.")
    assert cfg["vit_surgery"]["register_indices"] == [p] and cfg["vit_surgery"]["num_prefix_tokens"] == p
    # our loader reads it back without remote code, and `check` (un-baking) passes
    again = load_model(str(res.out))
    assert again.recipe == res.recipe and register_token_indices(again.model, adapter=again.adapter) == [p]
    batches = [x for x, _ in ImageBatches(list_images(builtin_images())[:8], again.transform, 8, progress=False)]
    report, _ = run_check(again, batches)
    assert report.passed, report.summary()


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_automodel_trust_remote_code_is_a_drop_in(kind, converted, pixels):
    from transformers import AutoModel

    loaded, res = converted[kind]
    model = AutoModel.from_pretrained(str(res.out), trust_remote_code=True).eval()
    assert type(model).__name__ == "VitSurgery" + CLASSES[kind]
    assert any(c.__name__ == CLASSES[kind] for c in type(model).__mro__)
    src, fam = loaded.model, loaded.adapter
    x = pixels[:5]
    with torch.no_grad(), hooked_reference(src, res.recipe, adapter=fam):
        ref_pooled, ref_tokens = fam.forward_both(src, x)
    with torch.no_grad():
        if kind == "clip_model":
            out = model.get_image_features(pixel_values=x)
            pooled = out.pooler_output
            full = model(pixel_values=x, input_ids=torch.tensor([[49406, 320, 49407]]))
            assert full.image_embeds.shape == (5, 32) and full.logits_per_image.shape == (5, 1)
        else:
            out = model(pixel_values=x, output_hidden_states=True)
            pooled = out.pooler_output
            assert len(out.hidden_states) == model.config.num_hidden_layers + 1
        one = model(pixel_values=x[2:3]) if kind != "clip_model" else model.get_image_features(pixel_values=x[2:3])
    assert type(out).__name__ == "BaseModelOutputWithPooling"
    assert rel(pooled, ref_pooled) < TOL and rel(out.last_hidden_state, ref_tokens) < TOL
    assert rel(one.last_hidden_state, out.last_hidden_state[2:3]) < TOL  # batch size does not matter
    # the documented layout: registers right after the prefix, patches from num_prefix_tokens on
    p = 5 if kind == "dinov2_reg4" else 1
    assert model.num_prefix_tokens == p + 1 and model.register_token_indices == [p]
    assert model.patch_tokens(out.last_hidden_state).shape[1] == 64
    assert out.last_hidden_state.shape[1] == p + 1 + 64


# ---- fake offline hub cache --------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["clip_vision", "clip_model", "dinov2", "dinov2_swiglu"])
def test_hub_ids_load_through_a_fake_offline_cache(kind, fake_hub, saved, organisms, pixels):
    repo = f"vit-surgery-test/{kind.replace('_', '-')}"
    write_fake_hub_repo(fake_hub, repo, {p.name: p for p in saved[kind].iterdir()})
    loaded = load_model(f"hf:{repo}")
    assert loaded.source.name_or_path == repo and loaded.source.hf_class == CLASSES[kind]
    assert loaded.source.preprocess["mean"] == [0.485, 0.456, 0.406]  # from preprocessor_config.json
    model = organisms[kind][0]
    fam = adapter_for(model)
    with torch.no_grad():
        a, b = fam.forward_both(model, pixels[:3]), loaded.adapter.forward_both(loaded.model, pixels[:3])
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_convert_from_the_hub_and_missing_repos(fake_hub, saved, organisms, tmp_path):
    write_fake_hub_repo(fake_hub, "vit-surgery-test/dinov2-reg4", {p.name: p for p in saved["dinov2_reg4"].iterdir()})
    nf = tmp_path / "n.json"
    nf.write_text(json.dumps({"register_neurons": {"2": [17, 101], "3": [42]}}))
    res = run_convert(load_model("hf:vit-surgery-test/dinov2-reg4"), tmp_path / "out", neurons=str(nf), progress=False)
    assert res.report.passed
    assert json.loads((tmp_path / "out" / "surgery.json").read_text())["source_model"] == "hf:vit-surgery-test/dinov2-reg4"
    with pytest.raises(ModelInputError, match="HF cache"):
        load_model("hf:vit-surgery-test/missing")


# ---- refusals ----------------------------------------------------------------------------------

def test_clear_refusals(saved, tmp_path):
    import shutil

    # remote code that is not ours: refused unless --trust-remote-code
    remote = tmp_path / "remote"
    shutil.copytree(saved["dinov2"], remote)
    cfg = json.loads((remote / "config.json").read_text())
    cfg["auto_map"] = {"AutoModel": "modeling_x.X"}
    (remote / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsafeCheckpointError, match="pass trust_remote_code if you trust it"):
        load_model(str(remote))
    # an HF model type we do not edit
    other = tmp_path / "vit"
    shutil.copytree(saved["dinov2"], other)
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelInputError, match="not supported"):
        load_model(f"hf:{other}")
    # weights that do not cover the model
    partial = tmp_path / "partial"
    shutil.copytree(saved["clip_vision"], partial)
    from safetensors.torch import load_file, save_file

    sd = load_file(str(partial / "model.safetensors"))
    save_file({k: v for k, v in sd.items() if "layers.5." not in k}, str(partial / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(ModelInputError, match="lacks"):
        load_model(str(partial))


class Payload:  # anything beyond tensors and plain containers needs full unpickling
    pass


def test_pickled_bin_needs_permission(saved, tmp_path):
    import shutil

    from safetensors.torch import load_file

    d = tmp_path / "bin"
    shutil.copytree(saved["dinov2"], d)
    sd = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    torch.save({**sd, "extra": Payload()}, d / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match="allow-unsafe-pickle"):
        load_model(str(d))
    torch.save(sd, d / "pytorch_model.bin")  # a plain state dict loads with weights_only semantics
    assert load_model(str(d)).source.hf_class == "Dinov2Model"


def test_convert_without_neurons_or_images_needs_a_published_set(saved):
    with pytest.raises(SurgeryError, match="no published register neurons"):
        run_convert(load_model(str(saved["dinov2"])), saved["dinov2"].parent / "never", progress=False)
    assert not (saved["dinov2"].parent / "never").exists()


def test_published_neurons_for_hf_dinov2_large():
    """`convert hf:facebook/dinov2-large` picks the published ViT-L/14 set (the same weights as the torch-hub
    checkpoint); the set validates against HF's module structure, bakes and passes parity. The model has
    ViT-L/14's depth (24) and MLP width (4096), which is what the set is checked against, on a narrow
    residual stream (64) to stay fast; tests/backends/test_dinov2.py runs the full-width timm ViT-L/14."""
    from transformers import Dinov2Config, Dinov2Model

    from surgery.core.source import LoadedModel, SourceInfo
    from surgery.pipeline import resolve_recipe
    from surgery.published import published_for_model

    cfg = Dinov2Config(hidden_size=64, mlp_ratio=64, num_hidden_layers=24, num_attention_heads=1, image_size=28,
                       patch_size=14)
    with torch.device("meta"):
        model = Dinov2Model(cfg)
    model = model.to_empty(device="cpu").eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.02, generator=g)
            elif "lambda1" in name:
                p.fill_(0.1)
            else:
                p.fill_(1.0) if name.endswith("weight") else p.normal_(0, 0.02, generator=g)
    fam = adapter_for(model)
    loaded = LoadedModel(model, fam, "hf:facebook/dinov2-large",
                         SourceInfo("hf", hf_class="Dinov2Model", name_or_path="facebook/dinov2-large"), None)
    name = published_for_model(loaded)
    assert name == "dinov2_vitl14"
    recipe, _ = resolve_recipe(loaded, name, {})
    baked = bake_registers(copy.deepcopy(model), recipe, adapter=fam)
    assert type(baked.encoder.layer[17].mlp).__name__ == "RegisterMlp" and len(baked.encoder.layer[17].mlp.units) == 17
    x = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    report = check_parity(model, baked, recipe, [x], adapter=fam)
    assert report.passed, report.summary()
