"""Discovery, hooked reference, baking and parity on timm model organisms."""
from __future__ import annotations

import copy

import pytest
import torch

from surgery import DiscoveryConfig, Recipe, bake_registers, check_parity, find_register_neurons, hooked_reference
from surgery.core.bake import register_token_indices, unbake
from surgery.core.effect import effect_metrics, token_diagnostics
from surgery.backends import adapter_for
from surgery.core.modules import RegisterMlp, register_edit
from surgery.organisms.vit import TIMM_VARIANTS, build_timm_organism

from tests.helpers import pixels_from

VARIANTS = sorted(TIMM_VARIANTS)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("variant", VARIANTS)
def test_discovery_recovers_exactly_the_planted_units(variant, calib_dir):
    model, planting = build_timm_organism(0, variant)
    result = find_register_neurons(model, calib_dir, progress=False, adapter=adapter_for(model))
    assert {k: list(v) for k, v in result.recipe.neurons.items()} == planting.neurons
    assert result.counts["images_with_outliers"] == 18  # every image with a trigger patch, none without
    assert result.max_layer == 3


def test_discovery_on_other_planting_and_unseen_images(unseen_images):
    plant = {1: [(5, +1)], 4: [(200, -1), (7, -1)]}  # bright patches made in block 1, dark in 4
    model, planting = build_timm_organism(7, "vit", plant=plant)
    assert planting.neurons == {1: [5], 4: [7, 200]}
    result = find_register_neurons(model, unseen_images, progress=False, adapter=adapter_for(model))
    assert {k: list(v) for k, v in result.recipe.neurons.items()} == planting.neurons


def test_discovery_is_deterministic_and_batch_size_independent(timm_organism, calib_dir):
    model, _ = timm_organism
    r1 = find_register_neurons(model, calib_dir, DiscoveryConfig(batch_size=1), progress=False, adapter=adapter_for(model))
    r2 = find_register_neurons(model, calib_dir, DiscoveryConfig(batch_size=7), progress=False, adapter=adapter_for(model))
    assert r1.recipe == r2.recipe
    for a, b in zip(r1.ranking, r2.ranking):
        assert (a["layer"], a["unit"]) == (b["layer"], b["unit"])
        assert a["score"] == pytest.approx(b["score"], rel=1e-5)


def test_seeded_sampling_is_reproducible(timm_organism, calib_dir):
    model, _ = timm_organism
    cfg = DiscoveryConfig(num_images=10, seed=3)
    a = find_register_neurons(model, calib_dir, cfg, progress=False, adapter=adapter_for(model))
    b = find_register_neurons(model, calib_dir, cfg, progress=False, adapter=adapter_for(model))
    assert a.to_json() == b.to_json()
    c = find_register_neurons(model, calib_dir, DiscoveryConfig(num_images=10, seed=4), progress=False, adapter=adapter_for(model))
    assert c.counts != a.counts or c.ranking != a.ranking


def test_fixed_threshold_and_top_k(timm_organism, calib_dir):
    model, _ = timm_organism
    r = find_register_neurons(model, calib_dir, DiscoveryConfig(threshold=100.0, top_k=1, max_layer=5),
                              progress=False, adapter=adapter_for(model))
    assert r.threshold["value"] == 100.0 and r.max_layer == 5
    assert r.recipe.num_neurons == 1 and r.cut == 1


def _naive_reference(model, recipe, x):
    """Independent per-image implementation of the paper's intervention, written out longhand."""
    outs = []
    for i in range(x.shape[0]):
        handles = []

        def add_reg(_m, args):
            t = args[0]
            z = torch.zeros(1, recipe.num_registers, t.shape[-1])
            return (torch.cat([t[:, :1], z, t[:, 1:]], 1),)

        def edit(units):
            def hook(_m, args):
                h = args[0].clone()
                vals = h[0][:, units]
                flat = vals.flatten()
                m = flat[flat.abs().argmax()]
                h[0, 1:1 + recipe.num_registers, units] = m * recipe.scale
                h[0, 1 + recipe.num_registers:, units] = 0.0
                return (h,)
            return hook

        handles.append(model.norm_pre.register_forward_pre_hook(add_reg))
        for layer, units in recipe.neurons.items():
            handles.append(model.blocks[layer].mlp.fc2.register_forward_pre_hook(edit(list(units))))
        model.num_prefix_tokens += recipe.num_registers
        try:
            outs.append(model.forward_features(x[i:i + 1]))
        finally:
            model.num_prefix_tokens -= recipe.num_registers
            for h in handles:
                h.remove()
    return torch.cat(outs)


def test_hooked_reference_matches_longhand_per_image_implementation(timm_organism, calib_dir):
    model, planting = timm_organism
    recipe = Recipe(planting.neurons, scale=1.5)
    x = pixels_from(calib_dir, adapter_for(model).data_transform(model), 6)
    with torch.no_grad():
        expected = _naive_reference(model, recipe, x)
        with hooked_reference(model, recipe, adapter=adapter_for(model)):
            got = model.forward_features(x)
    assert _rel(got, expected) < 1e-6
    assert model.num_prefix_tokens == 1  # restored


def test_register_edit_rule():
    h = torch.tensor([[[1.0, -2.0], [0.5, 0.1], [3.0, -7.0], [0.2, 0.3]]])  # [1, 4 tokens, 2 units]
    out = register_edit(h, num_prefix=1, num_registers=1, scale=2.0)
    assert out[0, 0].tolist() == [1.0, -2.0]  # CLS untouched
    assert out[0, 1].tolist() == [-14.0, -14.0]  # signed max (-7) x scale, over all tokens and units
    assert out[0, 2:].abs().sum() == 0  # patches zeroed
    per = register_edit(h, 1, 1, 1.0, per_neuron=True)
    assert per[0, 1].tolist() == [3.0, -7.0]


@pytest.mark.parametrize("variant", VARIANTS)
def test_baked_model_matches_hooked_reference(variant, calib_dir):
    model, planting = build_timm_organism(0, variant)
    recipe = Recipe(planting.neurons)
    baked = bake_registers(copy.deepcopy(model), recipe, adapter=adapter_for(copy.deepcopy(model)))
    x = pixels_from(calib_dir, adapter_for(model).data_transform(model))
    report = check_parity(model, baked, recipe, [x[:8], x[8:]], adapter=adapter_for(model))
    assert report.passed, report.summary()
    assert all(e.ratio <= 1.0 for e in report.outputs.values())  # per vector, vs the float64 reference
    assert {"pooled", "tokens", "block0.residual", "block5.residual"} <= set(report.outputs)
    assert report.images == len(x)
    blocks = baked.blocks
    assert all(isinstance(blocks[i].mlp, RegisterMlp) == (i in recipe.neurons) for i in range(len(blocks)))


def test_parity_detects_a_wrong_model(timm_organism, calib_dir):
    model, planting = timm_organism
    recipe = Recipe(planting.neurons)
    baked = bake_registers(copy.deepcopy(model), recipe, adapter=adapter_for(copy.deepcopy(model)))
    with torch.no_grad():
        baked.blocks[4].mlp.fc2.weight[0, 0] += 0.05
    x = pixels_from(calib_dir, adapter_for(model).data_transform(model), 8)
    report = check_parity(model, baked, recipe, [x], adapter=adapter_for(model))
    assert not report.passed
    assert report.failures()[0].name == "block4.residual"


@pytest.mark.parametrize("mode", ["shared", "per_neuron"])
def test_each_image_in_a_batch_equals_its_output_alone(timm_organism, calib_dir, mode):
    model, planting = timm_organism
    baked = bake_registers(copy.deepcopy(model), Recipe(planting.neurons, num_registers=2, mode=mode), adapter=adapter_for(copy.deepcopy(model)))
    x = pixels_from(calib_dir, adapter_for(model).data_transform(model), 6)
    with torch.no_grad():
        batched = baked.forward_features(x)
        alone = torch.cat([baked.forward_features(x[i:i + 1]) for i in range(len(x))])
    assert _rel(batched, alone) < 1e-5


def test_outliers_vanish_and_the_sink_moves_to_the_register(timm_organism, calib_dir):
    model, planting = timm_organism
    baked = bake_registers(copy.deepcopy(model), Recipe(planting.neurons), adapter=adapter_for(copy.deepcopy(model)))
    x = pixels_from(calib_dir, adapter_for(model).data_transform(model))
    regs = register_token_indices(baked, adapter=adapter_for(baked))
    assert regs == [1]
    before = effect_metrics(token_diagnostics(model, x, adapter=adapter_for(model)), 1, [])
    after = effect_metrics(token_diagnostics(baked, x, adapter=adapter_for(baked)), 2, regs)
    assert before["outlier_share"] > 0.01 and after["outlier_share"] == 0.0
    assert before["max_over_median_patch_norm"] > 10 and after["max_over_median_patch_norm"] < 1.5
    assert before["cls_attention_top_patch_mass"] > 0.3 and after["cls_attention_top_patch_mass"] < 0.02
    assert after["cls_attention_register_mass"] > 0.5
    assert after["register_norm"] > 5 * after["median_patch_norm"]


def test_unbake_restores_the_original_exactly(timm_organism, calib_dir):
    model, planting = timm_organism
    baked = bake_registers(copy.deepcopy(model), Recipe(planting.neurons), adapter=adapter_for(copy.deepcopy(model)))
    restored = copy.deepcopy(baked)
    recipe = unbake(restored, adapter=adapter_for(restored))
    assert recipe == baked.surgery_recipe
    x = pixels_from(calib_dir, adapter_for(model).data_transform(model), 4)
    with torch.no_grad():
        assert torch.equal(restored(x), model(x))
    sd, ref = restored.state_dict(), model.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)


def test_timm_apis_skip_the_register(calib_dir):
    model, planting = build_timm_organism(0, "vit")
    model.global_pool = "avg"
    recipe = Recipe(planting.neurons)
    baked = bake_registers(copy.deepcopy(model), recipe, adapter=adapter_for(copy.deepcopy(model)))
    x = pixels_from(calib_dir, adapter_for(model).data_transform(model), 4)
    with torch.no_grad():
        with hooked_reference(model, recipe, adapter=adapter_for(model)):
            ref_pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        tokens = baked.forward_features(x)
        pooled = baked.forward_head(tokens, pre_logits=True)
        inter = baked.forward_intermediates(x, indices=[2, 5], intermediates_only=True)
    assert baked.num_prefix_tokens == 2
    assert _rel(pooled, ref_pooled) < 1e-5
    assert _rel(pooled, tokens[:, 2:].mean(1)) < 1e-6  # average over patches only, register excluded
    assert [t.shape for t in inter] == [torch.Size([4, 64, 8, 8])] * 2  # 8x8 patch grid, no register


def test_graph_capture_sees_the_fix(timm_organism, calib_dir):
    model, planting = timm_organism
    recipe = Recipe(planting.neurons)
    baked = bake_registers(copy.deepcopy(model), recipe, adapter=adapter_for(copy.deepcopy(model)))
    x = pixels_from(calib_dir, adapter_for(model).data_transform(model), 4)
    with torch.no_grad():
        expected = baked(x)
        traced = torch.jit.trace(baked, x)
        assert _rel(traced(x), expected) < 1e-6
        exported = torch.export.export(baked, (x,))
        assert _rel(exported.module()(x), expected) < 1e-6
        compiled = torch.compile(baked, backend="aot_eager")
        assert _rel(compiled(x), expected) < 1e-6
        with hooked_reference(model, recipe, adapter=adapter_for(model)):
            ref = model(x)
        fixed_patches = baked.forward_features(x)[:, 2:]
        plain_patches = model.forward_features(x)[:, 1:]
    assert _rel(expected, ref) < 1e-5
    assert _rel(fixed_patches, plain_patches) > 0.1  # the fix changes the patch features


@pytest.mark.parametrize("seed, dtype", [(0, torch.float16), (3, torch.bfloat16)])
def test_half_precision_judge_passes_a_right_bake_and_catches_a_branch_off_by_5_percent(seed, dtype, calib_dir):
    # HF CLIP organisms whose right half-precision bakes the earlier judge (2 x own error, median floor)
    # refused on CPU: the register token carries 2-3 x the reference's own rounding error.
    from surgery.organisms.families import build_hf_clip_organism

    model, planting = build_hf_clip_organism(seed)
    model.eval()
    recipe = Recipe(planting.neurons)
    x = pixels_from(calib_dir, adapter_for(model).data_transform(model), 16)
    baked = bake_registers(copy.deepcopy(model), recipe, adapter=adapter_for(copy.deepcopy(model))).to(dtype)
    report = check_parity(model, baked, recipe, [x[:8], x[8:]], adapter=adapter_for(model))
    assert report.passed, report.summary()
    branch = next(m for m in baked.modules() if isinstance(m, RegisterMlp))
    with torch.no_grad():
        branch.reg_fc2.weight.mul_(1.05)
    report = check_parity(model, baked, recipe, [x[:8], x[8:]], adapter=adapter_for(model))
    assert not report.passed and report.failures()[0].name.startswith("block"), report.summary()
