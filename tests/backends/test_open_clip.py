"""open_clip models in and out.

An organism in open_clip's own module structure (a tiny CLIP whose image tower has planted register
neurons) is saved as an open_clip folder, loaded through open_clip's real code path (local-dir and a
fake offline hub cache), discovered, baked, exported as an open_clip folder and checked against the
hooked reference; the exported model's encode_image carries the fix while the text tower is untouched.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU, VisionTransformer
from safetensors.torch import load_file

import surgery
from surgery.core.bake import bake_registers, register_token_indices, unbake
from surgery.core.discovery import DiscoveryConfig
from surgery.core.errors import ModelInputError
from surgery.backends import adapter_for
from surgery.backends.open_clip.adapter import OPEN_CLIP, RegisteredVisionTransformer
from surgery.backends.open_clip.loader import resolve_spec
from surgery.backends import load_model
from surgery.organisms.families import build_open_clip_organism, save_open_clip_organism, write_fake_hub_repo
from surgery.core.parity import check_parity
from surgery.pipeline import parity_batches, run_check, run_convert, run_find, write_json
from surgery.core.recipe import Recipe
from surgery.core.reference import hooked_reference

from tests.helpers import pixels_from

HUB_REPO = "vit-surgery-test/open-clip-organism"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def organism():
    return build_open_clip_organism(0)


@pytest.fixture(scope="module")
def organism_dir(tmp_path_factory, organism) -> Path:
    return save_open_clip_organism(organism[0], tmp_path_factory.mktemp("oc") / "organism")


@pytest.fixture(scope="module")
def loaded(organism_dir):
    return load_model(str(organism_dir))


@pytest.fixture(scope="module")
def found(loaded, calib_dir, tmp_path_factory):
    result = run_find(loaded, calib_dir, DiscoveryConfig(), progress=False)
    path = tmp_path_factory.mktemp("oc_neurons") / "neurons.json"
    write_json(path, result.to_json())
    return result, path


@pytest.fixture(scope="module")
def converted(loaded, found, tmp_path_factory):
    out = tmp_path_factory.mktemp("oc_out") / "baked"
    res = run_convert(loaded, out, neurons=str(found[1]), progress=False)
    return out, res


@pytest.fixture(scope="module")
def pixels(loaded, calib_dir) -> torch.Tensor:
    return pixels_from(calib_dir, loaded.transform, 12)


# ---- loading -------------------------------------------------------------------------------------

def test_loader_returns_the_image_tower_and_keeps_the_clip_model(loaded, organism):
    assert isinstance(loaded.model, VisionTransformer)
    assert loaded.adapter is OPEN_CLIP and adapter_for(loaded.model) is OPEN_CLIP
    assert loaded.source.library == "open_clip" and loaded.recipe is None
    clip = loaded.extra["clip"]
    assert isinstance(clip, open_clip.CLIP) and clip.visual is loaded.model
    assert loaded.source.model_cfg == organism[0].organism_source["model_cfg"]
    ref = organism[0].state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in clip.state_dict().items())
    assert OPEN_CLIP.num_prefix_tokens(loaded.model) == 1
    assert OPEN_CLIP.input_size(loaded.model) == (3, 64, 64)


# ---- discovery, baking, parity ---------------------------------------------------------------------

def test_discovery_finds_exactly_the_planted_units(found, organism):
    result, _ = found
    assert {k: list(v) for k, v in result.recipe.neurons.items()} == organism[1].neurons
    assert result.counts["images_with_outliers"] == 18


def test_convert_writes_an_open_clip_folder_that_passes_check(converted, found):
    out, res = converted
    assert {p.name for p in out.iterdir()} >= {"open_clip_config.json", "open_clip_model.safetensors",
                                               "surgery.json", "parity.json"}
    assert res.report.passed, res.report.summary()
    assert res.effect["after"]["outlier_share"] < res.effect["before"]["outlier_share"]
    cfg = json.loads((out / "open_clip_config.json").read_text())
    assert set(cfg) == {"model_cfg", "preprocess_cfg"}
    # `vit-surgery check OUT`: the loader recognises the folder and rebuilds the source by un-baking
    reloaded = load_model(str(out))
    assert reloaded.recipe == found[0].recipe
    assert isinstance(reloaded.model, RegisteredVisionTransformer)
    batches = parity_batches(reloaded, None, 8, 8, 0, False)
    report, _ = run_check(reloaded, batches)
    assert report.passed, report.summary()


def test_cli_check_on_the_open_clip_folder(converted, tmp_path):
    from surgery.cli import main

    assert main(["check", str(converted[0]), "-q", "--num-images", "8", "--report", str(tmp_path / "p.json")]) == 0
    assert json.loads((tmp_path / "p.json").read_text())["parity"]["passed"]


def test_exported_encode_image_equals_hooked_reference(converted, organism, pixels, found, calib_dir):
    clip, preprocess = surgery.open_clip_load(converted[0])
    assert isinstance(clip, open_clip.CLIP)
    source = organism[0]
    recipe = found[0].recipe
    with torch.inference_mode():
        with hooked_reference(source.visual, recipe, adapter=OPEN_CLIP):
            ref = source.encode_image(pixels)
            ref_n = source.encode_image(pixels, normalize=True)
        got = clip.encode_image(pixels)
        got_n = clip.encode_image(pixels, normalize=True)
        plain = source.encode_image(pixels)
    assert _rel(got, ref) <= 1e-5 and _rel(got_n, ref_n) <= 1e-5
    assert _rel(plain, ref) > 1e-3  # the fix does change the embedding of triggered images
    assert type(source.visual) is VisionTransformer  # the hooked reference left the source as it was
    # the returned preprocess is open_clip's own eval transform from the folder's preprocess_cfg
    assert torch.equal(pixels_from(calib_dir, preprocess, 12), pixels)


def test_text_tower_is_byte_identical(converted, organism):
    source = organism[0].state_dict()
    written = load_file(str(converted[0] / "open_clip_model.safetensors"))
    text_keys = [k for k in source if not k.startswith("visual.")]
    assert text_keys and all(k in written for k in text_keys)
    for k in text_keys:
        assert written[k].dtype == source[k].dtype and torch.equal(written[k], source[k]), k
    clip, _ = surgery.open_clip_load(converted[0])
    loaded_sd = clip.state_dict()
    assert all(torch.equal(loaded_sd[k], source[k]) for k in text_keys)


def test_zero_shot_classification_still_works(converted, organism, pixels, found):
    out = converted[0]
    clip, _ = surgery.open_clip_load(out)
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    text = tokenizer(["a dark square", "a bright square", "a smooth texture"])
    source = organism[0]
    with torch.inference_mode():
        img, txt, scale = clip(pixels, text)
        src_txt = source.encode_text(text, normalize=True)
        with hooked_reference(source.visual, found[0].recipe, adapter=OPEN_CLIP):
            ref_img = source.encode_image(pixels, normalize=True)
    assert torch.equal(txt, src_txt)  # text tower untouched
    logits = scale * img @ txt.T
    ref_logits = scale * ref_img @ src_txt.T
    assert logits.shape == (len(pixels), 3) and torch.isfinite(logits).all()
    assert _rel(logits, ref_logits) <= 1e-5


def test_each_image_in_a_batch_equals_it_alone(converted, pixels):
    clip, _ = surgery.open_clip_load(converted[0])
    with torch.inference_mode():
        batch = clip.encode_image(pixels)
        alone = torch.cat([clip.encode_image(pixels[i:i + 1]) for i in range(len(pixels))])
    assert _rel(alone, batch) <= 1e-5


def test_unbake_restores_the_original_tower_exactly(converted, organism):
    clip, _ = surgery.open_clip_load(converted[0])
    visual = copy.deepcopy(clip.visual)
    unbake(visual, adapter=OPEN_CLIP)
    assert type(visual) is VisionTransformer
    original = organism[0].visual.state_dict()
    restored = visual.state_dict()
    assert restored.keys() == original.keys()
    assert all(torch.equal(restored[k], original[k]) for k in original)


def test_plain_open_clip_refuses_the_baked_folder_loudly(converted):
    with pytest.raises(RuntimeError, match="Missing key"):
        open_clip.create_model_from_pretrained(f"local-dir:{converted[0]}")


# ---- open_clip pooling variants -------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["avg", "none", "attn_pool"])
def test_pooling_skips_the_registers(variant, pixels):
    kw = {"attentional_pool": True} if variant == "attn_pool" else {"pool_type": variant}
    clip, planting = build_open_clip_organism(1, **kw)
    visual = clip.visual
    recipe = Recipe(planting.neurons, num_registers=2)
    baked = bake_registers(copy.deepcopy(visual), recipe, adapter=adapter_for(copy.deepcopy(visual)))
    report = check_parity(visual, baked, recipe, [pixels[:6]], adapter=OPEN_CLIP)
    assert report.passed, report.summary()
    assert register_token_indices(baked, adapter=adapter_for(baked)) == [1, 2]
    with torch.inference_mode():
        out_src, out_baked = visual(pixels[:4]), baked(pixels[:4])
        assert out_src.shape == out_baked.shape  # same layout as the original model: registers stripped
        if variant == "avg":
            tokens = OPEN_CLIP.forward_tokens(baked, pixels[:4])
            assert tokens.shape[1] == 1 + 2 + 64
            expected = tokens[:, 3:].mean(1) @ baked.proj  # patches only, no CLS, no registers
            assert _rel(out_baked, expected) <= 1e-5
        baked.output_tokens = visual.output_tokens = True
        (_, tok_src), (_, tok_baked) = visual(pixels[:4]), baked(pixels[:4])
        assert tok_src.shape == tok_baked.shape
        inter_src = visual.forward_intermediates(pixels[:4], indices=2)
        inter_baked = baked.forward_intermediates(pixels[:4], indices=2)
        assert [t.shape for t in inter_src["image_intermediates"]] == \
            [t.shape for t in inter_baked["image_intermediates"]] == [(4, 64, 8, 8)] * 2


def test_quickgelu_organism_round_trip(calib_dir, tmp_path):
    clip, planting = build_open_clip_organism(2, quick_gelu=True)
    assert isinstance(clip.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    folder = save_open_clip_organism(clip, tmp_path / "qg")
    lm = load_model(f"open_clip:local-dir:{folder}")
    assert isinstance(lm.model.transformer.resblocks[0].mlp.gelu, QuickGELU)
    res = run_convert(lm, tmp_path / "out", neurons=None, images=calib_dir, progress=False)
    assert {k: list(v) for k, v in res.recipe.neurons.items()} == planting.neurons
    assert res.report.passed
    baked, _ = surgery.open_clip_load(tmp_path / "out")
    assert all(isinstance(b.mlp.act, QuickGELU) for i, b in enumerate(baked.visual.transformer.resblocks)
               if i in planting.neurons)


# ---- fake offline hub cache ----------------------------------------------------------------------

def test_load_and_convert_through_a_fake_offline_hub_cache(fake_hub, organism_dir, organism, found, tmp_path):
    write_fake_hub_repo(fake_hub, HUB_REPO, {n: organism_dir / n for n in
                                             ("open_clip_config.json", "open_clip_model.safetensors")})
    lm = load_model(f"open_clip:hf-hub:{HUB_REPO}")
    assert isinstance(lm.model, VisionTransformer) and lm.source.model_name == f"hf-hub:{HUB_REPO}"
    ref = organism[0].state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in lm.extra["clip"].state_dict().items())
    res = run_convert(lm, tmp_path / "out", neurons=str(found[1]), progress=False)
    assert res.report.passed
    assert json.loads((tmp_path / "out" / "surgery.json").read_text())["source"]["spec"] == f"open_clip:hf-hub:{HUB_REPO}"


def test_openai_tags_build_quickgelu(fake_hub, organism_dir, monkeypatch):
    # ViT-B-16's config has no quick_gelu; its openai tag was trained with QuickGELU
    assert not open_clip.get_model_config("ViT-B-16").get("quick_gelu")
    assert resolve_spec("open_clip:ViT-B-16/openai").force_quick_gelu
    assert not resolve_spec("open_clip:ViT-B-16/laion2b_s34b_b88k").force_quick_gelu
    assert not resolve_spec("open_clip:ViT-B-16-quickgelu/openai").force_quick_gelu  # already QuickGELU
    # the whole real path, on a tiny arch registered with an openai-style QuickGELU tag
    from open_clip import factory, pretrained

    cfg = json.loads((organism_dir / "open_clip_config.json").read_text())["model_cfg"]
    monkeypatch.setitem(factory._MODEL_CONFIGS, "vit-surgery-tiny", cfg)
    tag = dict(pretrained._pcfg(hf_hub="vit-surgery-test/tiny-openai/", quick_gelu=True))
    monkeypatch.setitem(pretrained._PRETRAINED, "vit-surgery-tiny", {"openai": tag})
    write_fake_hub_repo(fake_hub, "vit-surgery-test/tiny-openai",
                        {"open_clip_model.safetensors": organism_dir / "open_clip_model.safetensors"})
    with pytest.warns(UserWarning, match="QuickGELU mismatch"):  # the trap: plain open_clip builds nn.GELU
        plain = open_clip.create_model("vit-surgery-tiny", pretrained="openai")
    assert isinstance(plain.visual.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)
    lm = load_model("open_clip:vit-surgery-tiny/openai")
    assert all(isinstance(b.mlp.gelu, QuickGELU) for b in lm.model.transformer.resblocks)
    assert lm.source.quick_gelu and lm.source.model_cfg["quick_gelu"] is True  # exported configs keep it


# ---- refusals ------------------------------------------------------------------------------------

def test_siglip_timm_trunk_is_no_longer_refused(fake_hub):
    """open_clip SigLIP (a timm trunk in TimmModel) is supported now (tests/backends/test_current_backbones.py):
    offline it gets as far as fetching the weights."""
    with pytest.raises(ModelInputError, match="could not get the pretrained weights"):
        load_model("open_clip:ViT-B-16-SigLIP/webli")


@pytest.mark.parametrize("spec, message", [
    ("open_clip:ViT-Q-99/laion", "unknown open_clip architecture"),
    ("open_clip:ViT-B-16/no-such-tag", "unknown pretrained tag 'no-such-tag' for ViT-B-16 .*laion2b_s34b_b88k"),
    ("open_clip:ViT-B-16", "name the pretrained weights"),
    ("open_clip:RN50/openai", "ResNet"),
    ("open_clip:ViT-B-16/laion2b_s34b_b88k", "could not get the pretrained weights.*HF_HUB_CACHE"),
    ("open_clip:hf-hub:nobody/nothing", "could not get the pretrained weights"),
    ("open_clip:", "needs a model"),
])
def test_clear_errors(fake_hub, spec, message):
    with pytest.raises(ModelInputError, match=message):
        load_model(spec)


def test_normformer_mlp_is_refused():
    visual = VisionTransformer(image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_ratio=2.0, scale_fc=True)
    with pytest.raises(ModelInputError, match="scale_fc"):
        OPEN_CLIP.blocks(visual)


def test_cli_reports_refusal_on_one_line(fake_hub, tmp_path, capsys):
    from surgery.cli import main
    from surgery.core.images import builtin_images

    code = main(["find", "open_clip:RN50/openai", "--images", str(builtin_images()), "--out", str(tmp_path / "n.json")])
    err = capsys.readouterr().err.strip()
    assert code == 4 and len(err.splitlines()) == 1 and "ResNet" in err
