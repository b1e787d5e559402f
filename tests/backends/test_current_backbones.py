"""Today's backbones: timm `Eva` (DINOv3, EVA02, PE-Core), open_clip towers on timm trunks (SigLIP2,
EVA02, PE-Core), HF `DINOv3ViTModel` and `SiglipVisionModel`.

Organisms in each library's own module structure with planted register neurons, saved by the library's
own writer and loaded back through its real code path. The baked outputs are judged against a hooked
reference written here from the rule in REFERENCE.md (not surgery/core/reference.py or modules.py):

- R zero tokens enter right after the prefix tokens (CLS, trained registers) at the input of the
  pre-norm (timm `norm_pre`; HF models without one: the input of the first layer), with no position;
- RoPE: the registers are prefix tokens, so they get no rotary position (timm Eva: each attention
  module's `num_prefix_tokens` counts them; HF DINOv3 rotates only the last P = #patches tokens);
- in each block with register neurons, on the input of the MLP down projection: per image, register
  rows <- the value of largest magnitude over all tokens and all of the block's register neurons,
  patch rows <- 0, prefix rows unchanged;
- pooling is the model's own with the prefix count raised by R ('avg' skips the register, 'token' reads
  CLS, an attention-pool head sees every token, the register included).
"""
from __future__ import annotations

import contextlib
import copy
import json
import shutil
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch
from torch import nn

import surgery
from surgery.cli import main
from surgery.demo import save_organism
from surgery.core.discovery import DiscoveryConfig, find_register_neurons
from surgery.backends import adapter_for
from surgery.core.images import ImageBatches, list_images
from surgery.backends import load_model
from surgery.core.images import builtin_images
from surgery.organisms.eva import (build_eva_organism, build_hf_dinov3_organism, build_hf_siglip_organism,
                                   build_open_clip_timm_organism)
from surgery.organisms.families import save_hf_organism, save_open_clip_organism
from tests.helpers import rel

TOL = 1e-5


# ---- the independent hooked reference --------------------------------------------------------------

def edit_rows(h: torch.Tensor, p: int, R: int) -> torch.Tensor:
    """REFERENCE.md's edit on the register-neuron activations of one block, h [B, N, k], image by image."""
    out = torch.zeros_like(h)
    for b in range(h.shape[0]):
        flat = h[b].reshape(-1)
        m = flat[flat.abs().argmax()]
        out[b, :p] = h[b, :p]
        out[b, p:p + R] = m
    return out


@contextlib.contextmanager
def reference_hooks(entry: nn.Module, downs: dict[int, tuple[nn.Module, list[int]]], p: int, R: int,
                    set_prefix: Callable[[int], None]) -> Iterator[None]:
    """Zero registers into `entry`'s input after p prefix tokens; edit `downs` inputs; prefix count p + R."""
    def add(_m, args):
        x = args[0]
        reg = torch.zeros(x.shape[0], R, x.shape[-1], dtype=x.dtype)
        return (torch.cat([x[:, :p], reg, x[:, p:]], dim=1),) + tuple(args[1:])

    def edit(units: list[int]):
        def hook(_m, args):
            h = args[0].clone()
            h[..., units] = edit_rows(h[..., units], p, R)
            return (h,) + tuple(args[1:])
        return hook

    handles = [entry.register_forward_pre_hook(add)]
    handles += [down.register_forward_pre_hook(edit(units)) for down, units in downs.values()]
    set_prefix(p + R)
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        set_prefix(p)


def eva_reference(model: nn.Module, neurons: dict[int, list[int]], R: int = 1):
    """timm Eva: registers into norm_pre; RoPE skips attn.num_prefix_tokens, which counts them."""
    p = model.num_prefix_tokens

    def set_prefix(n: int) -> None:
        model.num_prefix_tokens = n
        for blk in model.blocks:
            blk.attn.num_prefix_tokens = n

    downs = {i: (model.blocks[i].mlp.fc2, units) for i, units in neurons.items()}
    return reference_hooks(model.norm_pre, downs, p, R, set_prefix)


def hf_reference(model: nn.Module, layers: nn.ModuleList, p: int, neurons: dict[int, list[int]], R: int = 1):
    """HF DINOv3 / SigLIP: registers into the first layer's input; HF DINOv3's rope rotates the last P tokens."""
    downs = {i: (getattr(layers[i].mlp, "down_proj", None) or layers[i].mlp.fc2, units) for i, units in neurons.items()}
    return reference_hooks(layers[0], downs, p, R, lambda n: None)


# ---- fixtures --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    m, _ = build_eva_organism(0, "dinov3")
    tf = adapter_for(m).data_transform(m)
    return torch.cat([x for x, _ in ImageBatches(list_images(builtin_images())[:12], tf, 12, progress=False)])


@pytest.fixture(scope="module")
def trigger_free_images(tmp_path_factory) -> Path:
    """The built-in calibration images without any trigger (every fourth one): a model shows no outliers."""
    d = tmp_path_factory.mktemp("no_triggers")
    for f in list_images(builtin_images())[3::4]:
        shutil.copy(f, d / Path(f).name)
    return d


def convert(src: Path, out: Path, capsys, *extra: str) -> dict:
    code = main(["convert", str(src), "--images", str(builtin_images()), "--out", str(out), "-q", *extra])
    err = capsys.readouterr().err
    assert code == 0, err
    return json.loads((out / "surgery.json").read_text())


def ours(stderr: str) -> list[str]:
    """vit-surgery's own stderr lines (transformers' save progress bars may land in the same capture)."""
    lines = stderr.replace("\r", "\n").splitlines()
    assert not any("Traceback" in ln for ln in lines)
    return [ln for ln in lines if ln.startswith("vit-surgery")]


# ---- timm Eva -------------------------------------------------------------------------------------

EVA_PREFIX = {"dinov3": 5, "dinov3_swiglu": 5, "eva02": 1, "pe_core": 1}
SLOW = pytest.mark.slow  # the same paths as a fast row; kept out of the default run for time


@pytest.mark.parametrize("variant", [v if v in ("dinov3", "pe_core") else pytest.param(v, marks=SLOW)
                                     for v in EVA_PREFIX])
def test_eva_discovery_bake_and_independent_reference(variant, tmp_path, capsys, pixels):
    import timm

    model, planting = build_eva_organism(0, variant)
    assert adapter_for(model).name == "timm_eva" and model.rope is not None
    res = find_register_neurons(model, list_images(builtin_images()), DiscoveryConfig(), progress=False, adapter=adapter_for(model))
    assert {k: list(v) for k, v in res.recipe.neurons.items()} == planting.neurons

    src = save_organism(model, tmp_path / "src")
    doc = convert(src, tmp_path / "out", capsys)
    p = EVA_PREFIX[variant]
    assert doc["token_layout"] == {"num_prefix_tokens": p, "register_indices": [p]}  # after trained registers
    baked = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()  # timm drop-in
    assert baked.num_prefix_tokens == p + 1 and all(b.attn.num_prefix_tokens == p + 1 for b in baked.blocks)
    with torch.no_grad():
        with eva_reference(model, planting.neurons):
            ref_tokens = model.forward_features(pixels)
            ref_pooled = model.forward_head(ref_tokens)
        tokens = baked.forward_features(pixels)
        pooled = baked.forward_head(tokens)
    assert rel(tokens, ref_tokens) <= TOL and rel(pooled, ref_pooled) <= TOL


def test_eva_register_gets_no_rotary_position(pixels):
    """The register is a prefix token: moving it changes nothing that RoPE would make position-dependent,
    and the patch tokens keep their rotary positions (rope table rows = patches only)."""
    model, planting = build_eva_organism(0, "pe_core")
    n_patches = model.patch_embed.num_patches
    seen: list[int] = []
    h = model.blocks[0].attn.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["rope"].shape[-2]),
                                                       with_kwargs=True)
    with torch.no_grad(), eva_reference(model, planting.neurons):
        model.forward_features(pixels[:2])
    h.remove()
    assert seen == [n_patches]  # RoPE rows for the patches only; prefix + register are skipped


def test_eva_effect_outliers_leave_and_sink_moves(pixels):
    from surgery.core.bake import bake_registers, register_token_indices
    from surgery.core.effect import effect_metrics, token_diagnostics

    model, planting = build_eva_organism(0, "dinov3")
    fam = adapter_for(model)
    baked = bake_registers(copy.deepcopy(model), surgery.Recipe(planting.neurons), adapter=adapter_for(copy.deepcopy(model)))
    before = effect_metrics(token_diagnostics(model, pixels, adapter=fam), 5, [])
    regs = register_token_indices(baked, adapter=fam)
    after = effect_metrics(token_diagnostics(baked, pixels, adapter=fam), 6, regs)
    assert before["outlier_share"] > 0.01 and after["outlier_share"] == 0.0
    assert before["cls_attention_top_patch_mass"] > 0.3 and after["cls_attention_top_patch_mass"] < 0.02
    assert after["cls_attention_register_mass"] > 0.5


def test_eva02_clip_hidden_norm_is_refused():
    import timm

    from surgery.core.errors import ModelInputError

    m = timm.create_model("eva02_base_patch16_clip_224", pretrained=False, img_size=32, patch_size=8, embed_dim=64,
                          depth=2, num_heads=2)
    with pytest.raises(ModelInputError, match="scale_mlp"):
        adapter_for(m).mlp_weights(m.blocks[0].mlp)


# ---- open_clip towers on timm trunks ---------------------------------------------------------------

OPEN_CLIP_TIMM = [("PE-Core-T-16-384", "vit_pe_core_tiny_patch16_384", 1),  # Eva, RoPE, attention pool
                  ("ViT-B-16-SigLIP2", "vit_base_patch16_siglip_224", 0),  # no CLS, attention pool
                  pytest.param("EVA02-B-16", "eva02_tiny_patch14_224", 1, marks=SLOW)]  # Eva, RoPE, token pool


@pytest.mark.parametrize("base, trunk, prefix", OPEN_CLIP_TIMM, ids=["PE-Core", "SigLIP2", "EVA02"])
def test_open_clip_timm_trunk(base, trunk, prefix, tmp_path, capsys, pixels):
    clip, planting = build_open_clip_timm_organism(tmp_path / "trunk", 0, base, trunk)
    visual = clip.visual
    assert type(visual).__name__ == "TimmModel" and adapter_for(visual).name == "open_clip_timm"
    src = save_open_clip_organism(clip, tmp_path / "src")
    doc = convert(src, tmp_path / "out", capsys)
    assert doc["recipe"]["register_neurons"] == {str(k): v for k, v in planting.neurons.items()}
    assert doc["token_layout"]["register_indices"] == [prefix]
    baked_clip, _ = surgery.open_clip_load(tmp_path / "out")
    t = visual.trunk

    def set_prefix(n: int) -> None:
        t.num_prefix_tokens = n
        for blk in t.blocks:
            if hasattr(blk.attn, "num_prefix_tokens"):
                blk.attn.num_prefix_tokens = n

    downs = {i: (t.blocks[i].mlp.fc2, u) for i, u in planting.neurons.items()}
    with torch.no_grad():
        with reference_hooks(t.norm_pre, downs, prefix, 1, set_prefix):
            ref = clip.encode_image(pixels)
        got = baked_clip.encode_image(pixels)
    assert rel(got, ref) <= TOL  # the image embedding, through open_clip's own encode_image


# ---- HF DINOv3 / SigLIP ------------------------------------------------------------------------

HF = {"dinov3": (lambda: build_hf_dinov3_organism(0), 5),
      "dinov3_gated": (lambda: build_hf_dinov3_organism(0, gated=True), 5),
      "siglip": (lambda: build_hf_siglip_organism(0), 0)}


@pytest.mark.parametrize("kind", [k if k != "dinov3_gated" else pytest.param(k, marks=SLOW) for k in HF])
def test_hf_current(kind, tmp_path, capsys, pixels):
    from transformers import AutoModel

    build, prefix = HF[kind]
    model, planting = build()
    res = find_register_neurons(model, list_images(builtin_images()), DiscoveryConfig(), progress=False, adapter=adapter_for(model))
    assert {k: list(v) for k, v in res.recipe.neurons.items()} == planting.neurons
    src = save_hf_organism(model, tmp_path / "src")
    doc = convert(src, tmp_path / "out", capsys)
    assert doc["token_layout"] == {"num_prefix_tokens": prefix, "register_indices": [prefix]}
    remote = AutoModel.from_pretrained(str(tmp_path / "out"), trust_remote_code=True).eval()
    layers = model.model.layer if kind.startswith("dinov3") else model.encoder.layers
    with torch.no_grad():
        with hf_reference(model, layers, prefix, planting.neurons):
            ref = model(pixel_values=pixels)
        got = remote(pixel_values=pixels)
    assert rel(got.last_hidden_state, ref.last_hidden_state) <= TOL
    assert rel(got.pooler_output, ref.pooler_output) <= TOL


def test_hf_siglip2_is_refused_in_one_line(tmp_path, capsys):
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    Siglip2VisionModel(Siglip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, num_patches=16, patch_size=8)).save_pretrained(
        tmp_path / "s2")
    code = main(["find", str(tmp_path / "s2"), "--images", str(builtin_images()), "--out", str(tmp_path / "n.json")])
    err = ours(capsys.readouterr().err)
    assert code == 4 and len(err) == 1 and "variable-resolution" in err[0]


# ---- no outliers: the existing exit in every family ---------------------------------------------------

def _sources(tmp: Path) -> dict[str, Path]:
    eva, _ = build_eva_organism(0, "dinov3")
    clip, _ = build_open_clip_timm_organism(tmp / "trunk", 0)
    dino, _ = build_hf_dinov3_organism(0)
    sig, _ = build_hf_siglip_organism(0)
    return {"timm_eva": save_organism(eva, tmp / "eva"),
            "open_clip_timm": save_open_clip_organism(clip, tmp / "oc"),
            "hf_dinov3": save_hf_organism(dino, tmp / "hfd"), "hf_siglip": save_hf_organism(sig, tmp / "hfs")}


def test_no_outliers_exit_in_every_family(tmp_path, trigger_free_images, capsys):
    for name, src in _sources(tmp_path).items():
        assert load_model(str(src)).adapter.name == name
        code = main(["find", str(src), "--images", str(trigger_free_images), "--out", str(tmp_path / f"{name}.json")])
        err = ours(capsys.readouterr().err)
        assert code == 6, (name, err)
        assert len(err) == 1 and "patch-token norms: median" in err[0] and "p99" in err[0]


def test_published_registry_has_no_entries_for_these_yet(tmp_path):
    """None are published for DINOv3 / SigLIP2 / EVA02 / PE-Core: convert without --neurons/--images says so."""
    from surgery.published import published_for_model

    model, _ = build_eva_organism(0, "dinov3")
    loaded = load_model(str(save_organism(model, tmp_path / "eva")))
    assert published_for_model(loaded) is None


# ---- ONNX export of a RoPE model ------------------------------------------------------------------------

def test_eva_rope_onnx_export_matches_the_independent_reference(tmp_path, capsys, pixels):
    """DINOv3 organism (RoPE, 4 trained registers) -> convert --onnx; onnxruntime's tokens and pooled output
    judged per vector against the reference above run in float64, with the float64 judge's allowance
    (surgery/core/judge.py: TOL x max(1, conditioning / median conditioning), conditioning measured on that float64
    run under float32-sized noise). Patch tokens only match if the register had no rotary position in the graph."""
    import onnxruntime as ort

    from surgery.core.judge import allowed_error, float32_sized_noise

    model, planting = build_eva_organism(0, "dinov3")
    src = save_organism(model, tmp_path / "src")
    nf = tmp_path / "n.json"
    nf.write_text(json.dumps({"register_neurons": {str(k): v for k, v in planting.neurons.items()}}))
    out = tmp_path / "out"
    code = main(["convert", str(src), "--neurons", str(nf), "--out", str(out), "--onnx", "-q"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((out / "parity.json").read_text())["onnx"]["passed"]

    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    pooled, tokens = (torch.from_numpy(a) for a in sess.run(["pooled", "tokens"], {"pixel_values": pixels.numpy()}))
    m64 = copy.deepcopy(model).double()
    x64 = pixels.double()
    with torch.no_grad(), eva_reference(m64, planting.neurons):
        ref_tokens = m64.forward_features(x64)
        ref_pooled = m64.forward_head(ref_tokens)
        with float32_sized_noise(m64):
            noisy_tokens = m64.forward_features(x64)
            noisy_pooled = m64.forward_head(noisy_tokens)
    p = EVA_PREFIX["dinov3"]
    assert tokens.shape == ref_tokens.shape and tokens.shape[1] == p + 1 + 64  # CLS, 4 trained registers, the register, 8x8 patches

    def per_vector(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a.double() - b).norm(dim=-1) / b.norm(dim=-1)

    for got, ref, noisy in ((tokens, ref_tokens, noisy_tokens), (pooled, ref_pooled, noisy_pooled)):
        err = per_vector(got, ref)
        assert bool((err <= allowed_error(per_vector(noisy, ref), TOL)).all()), float(err.max())
    # every vector but the register is held to the plain tolerance: only the register's row can be
    # ill-conditioned here (its final LayerNorm normalises a residual that is near-constant without outliers)
    not_register = torch.ones(tokens.shape[1], dtype=torch.bool)
    not_register[p] = False
    assert float(per_vector(tokens, ref_tokens)[:, not_register].max()) <= TOL
    assert float(per_vector(pooled, ref_pooled).max()) <= TOL


# ---- --to timm for open_clip towers on timm trunks ------------------------------------------------------

def test_open_clip_timm_trunk_to_timm_folder(tmp_path, capsys, pixels):
    """convert --to timm: the trunk (timm Eva, RoPE, attention-pool head) as a timm folder with the fix baked;
    it finds the planted units and reproduces the independent reference on the source tower's image embedding."""
    import timm

    clip, planting = build_open_clip_timm_organism(tmp_path / "trunk", 0)
    src = save_open_clip_organism(clip, tmp_path / "src")
    doc = convert(src, tmp_path / "out", capsys, "--to", "timm")
    assert doc["recipe"]["register_neurons"] == {str(k): v for k, v in planting.neurons.items()}
    baked = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()
    assert adapter_for(baked).name == "timm_eva" and baked.num_prefix_tokens == 2
    from surgery.core.judge import allowed_error, float32_sized_noise, per_vector_relative

    visual = copy.deepcopy(clip.visual).double()
    x64 = pixels.double()
    with torch.no_grad():
        with eva_reference(visual.trunk, planting.neurons):
            ref_pooled = visual(x64)  # open_clip's image embedding (before normalisation)
            ref_tokens = visual.trunk.forward_features(x64)
            with float32_sized_noise(visual):  # the float64 judge's conditioning (surgery/core/judge.py)
                cond_pooled = per_vector_relative(visual(x64), ref_pooled)
                cond_tokens = per_vector_relative(visual.trunk.forward_features(x64), ref_tokens)
        pooled, tokens = baked(pixels), baked.forward_features(pixels)
    assert rel(pooled, ref_pooled) <= TOL
    assert bool((per_vector_relative(tokens, ref_tokens) <= allowed_error(cond_tokens, TOL)).all())
    assert bool((per_vector_relative(pooled, ref_pooled) <= allowed_error(cond_pooled, TOL)).all())


def test_open_clip_timm_trunk_with_its_own_head_is_refused_for_timm(tmp_path):
    from surgery.core.errors import ModelInputError
    from surgery.to_timm import to_timm

    clip, _ = build_open_clip_timm_organism(tmp_path / "trunk", 0)
    loaded = load_model(str(save_open_clip_organism(clip, tmp_path / "src")))
    loaded.model.head.add_module("proj", nn.Linear(32, 32, bias=False))  # open_clip's timm_proj='linear'
    with pytest.raises(ModelInputError, match="adds its own head"):
        to_timm(loaded)
