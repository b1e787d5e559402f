"""The baked model and the hooked reference judged by an independent implementation of the rule
(tests/helpers/rule_reference.py), in float64, per feature vector; and the judge that `check` and the ONNX
validation use, shown to be independent of float32 kernel rounding but not blind to real errors."""
from __future__ import annotations

import copy

import pytest
import torch

from tests.helpers.rule_reference import edit_post_activation, per_vector_relative, rule_reference
from surgery import Recipe, bake_registers, hooked_reference
from surgery.backends import adapter_for
from surgery.organisms.vit import build_timm_organism
from surgery.organisms.families import build_hf_dinov2_organism, build_open_clip_organism
from surgery.core.parity import check_parity

EXACT = 1e-9  # float64 against float64: any real difference in the rule is many orders above this


def _timm(variant: str):
    model, planting = build_timm_organism(0, variant)
    return model, planting.neurons, adapter_for(model)


def _open_clip():
    clip, planting = build_open_clip_organism(0)
    return clip.visual, planting.neurons, adapter_for(clip.visual)


def _hf_dinov2_reg():
    model, planting = build_hf_dinov2_organism(0, num_register_tokens=4)
    return model, planting.neurons, adapter_for(model)


# (builder, prefix tokens): CLS-less SigLIP (0), CLIP (1), trained registers (5), gated SwiGLU MLPs
CASES = {
    "siglip_no_cls": (lambda: _timm("siglip"), 0),
    "clip": (lambda: _timm("clip"), 1),
    "reg4": (lambda: _timm("reg4"), 5),
    "swiglu_gated": (lambda: _timm("swiglu"), 1),
    "open_clip": (_open_clip, 1),
    "hf_dinov2_registers": (_hf_dinov2_reg, 5),
}
OPTIONS = [dict(num_registers=1, scale=1.0, mode="shared"), dict(num_registers=3, scale=0.5, mode="per_neuron")]


def _outputs(model, fam, x):
    pooled, tokens = fam.forward_both(model, x)
    return {"pooled": pooled, "tokens": tokens}


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: f"R{o['num_registers']}-{o['mode']}")
@pytest.mark.parametrize("case", sorted(CASES))
@torch.no_grad()
def test_baked_and_hooked_equal_the_rule_in_float64(case, options):
    build, prefix = CASES[case]
    model, neurons, fam = build()
    assert fam.num_prefix_tokens(model) == prefix
    recipe = Recipe({int(k): list(v) for k, v in neurons.items()}).with_options(**options)
    source = copy.deepcopy(model).double().eval()
    baked = bake_registers(copy.deepcopy(model), recipe, adapter=fam).double().eval()
    size = fam.input_size(model)[-1]
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with rule_reference(source, recipe.neurons, num_registers=recipe.num_registers, scale=recipe.scale,
                        per_neuron=recipe.mode == "per_neuron", family=fam):
        want = _outputs(source, fam, x)
    with hooked_reference(source, recipe, adapter=fam):
        hooked = _outputs(source, fam, x)
    got = _outputs(baked, fam, x)
    R = recipe.num_registers
    assert want["tokens"].shape[1] == _outputs(source, fam, x)["tokens"].shape[1] + R
    for name in ("pooled", "tokens"):
        for impl in (got, hooked):
            rel = per_vector_relative(impl[name], want[name])
            assert float(rel.max()) < EXACT, (case, name, float(rel.max()))
    # the registers are really there and really fed: non-zero output at every register position
    regs = want["tokens"][:, prefix:prefix + R]
    assert bool((regs.norm(dim=-1) > 0).all())


def test_the_rule_itself_on_a_hand_example():
    """Straight from REFERENCE.md: registers <- scale x signed max, patches <- 0, prefix unchanged."""
    h = torch.tensor([[[1.0, -2.0, 5.0], [0.0, 0.0, 9.0], [3.0, -7.0, 1.0], [6.0, 2.0, -1.0]]])  # [1, 4, 3]
    out = edit_post_activation(h, [0, 1], num_prefix=1, num_registers=1, scale=2.0, per_neuron=False)
    assert out[0, 0].tolist() == [1.0, -2.0, 5.0]  # prefix row unchanged
    assert out[0, 1].tolist() == [-14.0, -14.0, 9.0]  # register: 2 x (-7), the largest |.| of units 0, 1
    assert out[0, 2:, :2].abs().sum() == 0 and out[0, 2:, 2].tolist() == [1.0, -1.0]  # other units untouched
    per = edit_post_activation(h, [0, 1], num_prefix=1, num_registers=1, scale=1.0, per_neuron=True)
    assert per[0, 1].tolist() == [6.0, -7.0, 9.0]


# ---- the judge ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clip_case(calib_dir):
    from tests.helpers import pixels_from

    model, neurons, fam = _timm("clip")
    recipe = Recipe({int(k): list(v) for k, v in neurons.items()})
    x = pixels_from(calib_dir, fam.data_transform(model), 6)  # images with and without triggers
    return model, recipe, fam, x


def _with_activation_noise(baked, fam, absolute: float, seed: int):
    """Emulate another CPU's activation kernel: every activation output off by up to `absolute`."""
    gen = torch.Generator().manual_seed(seed)
    hooks = []
    for block in fam.blocks(baked):
        act = block.mlp.act
        hooks.append(act.register_forward_hook(
            lambda _m, _a, y: y + absolute * (2 * torch.rand(y.shape, generator=gen) - 1).to(y)))
    return hooks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_check_passes_under_another_cpus_activation_rounding(clip_case, seed):
    """Activation kernels accurate to ~1e-7 absolute (PyTorch's erf, onnxruntime's sigmoid) move the
    register token of outlier-free images by far more than 1e-5 relative; the judge must not care."""
    model, recipe, fam, x = clip_case
    baked = bake_registers(copy.deepcopy(model), recipe, adapter=fam)
    hooks = _with_activation_noise(baked, fam, 3e-7, seed)
    try:
        report = check_parity(model, baked, recipe, [x], adapter=fam)
    finally:
        for h in hooks:
            h.remove()
    assert report.passed, report.summary()


@pytest.mark.parametrize("defect", ["scale", "patch_row"])
def test_check_fails_a_real_defect(clip_case, defect):
    """A wrong register value (scale 1.001) or a patch row not zeroed is caught, however small."""
    model, recipe, fam, x = clip_case
    baked = bake_registers(copy.deepcopy(model), recipe, adapter=fam)
    layer = sorted(recipe.neurons)[0]
    mlp = fam.blocks(baked)[layer].mlp
    if defect == "scale":
        mlp.scale = 1.001
    else:  # one register unit's patch rows leak through the ordinary MLP
        with torch.no_grad():
            u = int(mlp.units[0])  # (fc1 holds every unit; fc2's register columns are zero)
            mlp.fc2.weight[:, u] = mlp.reg_fc2.weight[:, 0] * 1e-3
    report = check_parity(model, baked, recipe, [x], adapter=fam)
    assert not report.passed
    assert report.failures()[0].name.startswith(f"block{layer}")  # caught where it starts
