"""The baked block's eager launch cost, counted: the aten ops one eager forward dispatches
(tests/helpers/op_count.py, view ops left out) are deterministic, so the count per baked block and for the register
token is asserted exactly, in float32 and half precision; and the lean forward still computes the rule
(tests/helpers/rule_reference.py, an independent implementation) in float32 and bfloat16."""
from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch

from tests.helpers import pixels_from
from tests.helpers.op_count import dispatched_ops
from tests.helpers.rule_reference import per_vector_relative, rule_reference
from surgery import Recipe, bake_registers
from surgery.backends import adapter_for
from surgery.core.modules import MlpWeights, RegisterMlp
from surgery.organisms.vit import build_timm_organism

# Per baked block, besides the ordinary MLP (whose fc1 GEMM and activation the branch reads): one index_select
# of the k register units' activations, abs / argmax / gather (signed max), one cat (prefix rows + register
# rows) and one fused GEMM + add into those rows. Issue 32's target: at most 6.
BRANCH_OPS = Counter({"index_select": 1, "abs": 1, "argmax": 1, "gather": 1, "cat": 1, "baddbmm_": 1})
HALF = (torch.bfloat16, torch.float16)


def _baked(variant: str = "clip", **options):
    model, planting = build_timm_organism(0, variant)
    recipe = Recipe({int(k): list(v) for k, v in planting.neurons.items()}).with_options(**options)
    fam = adapter_for(model)
    return model, bake_registers(copy.deepcopy(model), recipe, adapter=fam), recipe, fam


@pytest.mark.parametrize("dtype", [torch.float32, *HALF], ids=str)
def test_baked_block_and_register_token_dispatch_the_fewest_ops(dtype):
    model, baked, recipe, fam = _baked()
    model, baked = model.to(dtype), baked.to(dtype)
    layer = sorted(recipe.neurons)[0]
    tokens = torch.randn(2, 66, fam.embed_dim(model), dtype=dtype)  # CLS + register + 64 patches
    extra = (dispatched_ops(fam.get_mlp(fam.blocks(baked)[layer]), tokens)
             - dispatched_ops(fam.get_mlp(fam.blocks(model)[layer]), tokens))
    assert extra == BRANCH_OPS  # no cast in half precision, no multiply for scale 1
    assert sum(extra.values()) <= 6
    parent, attr = fam.insertion_point(baked)
    inserter = getattr(parent, attr)
    token = dispatched_ops(inserter, tokens[:, 1:]) - dispatched_ops(inserter.inner, tokens[:, 1:])
    assert token == Counter({"cat": 1})
    x = torch.randn(2, 3, 64, 64, dtype=dtype)
    whole = dispatched_ops(baked.forward_features, x) - dispatched_ops(model.forward_features, x)
    per_block = [sum(BRANCH_OPS.values()) - (len(units) == 1) for units in recipe.neurons.values()]  # 1 unit: a view
    assert sum(whole.values()) == sum(per_block) + 1
    assert "_to_copy" not in whole


def test_scale_other_than_1_costs_one_multiply_and_per_neuron_the_same_ops():
    tokens = torch.randn(2, 66, 8)
    w = MlpWeights(torch.randn(32, 8), torch.randn(32), torch.randn(8, 32), torch.randn(8), torch.nn.GELU())
    linear, gelu = torch.nn.functional.linear, torch.nn.functional.gelu
    ordinary = dispatched_ops(lambda t: linear(gelu(linear(t, w.fc1_weight, w.fc1_bias)), w.fc2_weight, w.fc2_bias),
                              tokens)  # the original MLP's own ops
    for scale, per_neuron, want in ((1.0, True, BRANCH_OPS), (0.5, False, BRANCH_OPS + Counter({"mul": 1}))):
        mlp = RegisterMlp(w, [3, 5, 9], num_prefix=1, num_registers=1, scale=scale, per_neuron=per_neuron)
        assert dispatched_ops(mlp, tokens) - ordinary == want


def test_one_unit_is_a_view_and_no_prefix_token_needs_no_cat():
    """One register unit: its activations are a slice of the ordinary hidden layer (a view, no op); no
    prefix token (SigLIP): the register rows alone, no cat. Either still computes the rule."""
    tokens = torch.randn(2, 66, 8)
    w = MlpWeights(torch.randn(32, 8), torch.randn(32), torch.randn(8, 32), torch.randn(8), torch.nn.GELU())
    linear, gelu = torch.nn.functional.linear, torch.nn.functional.gelu
    ordinary = dispatched_ops(lambda t: linear(gelu(linear(t, w.fc1_weight, w.fc1_bias)), w.fc2_weight, w.fc2_bias),
                              tokens)
    cases = (([7], 1, BRANCH_OPS - Counter({"index_select": 1})), ([3, 5], 0, BRANCH_OPS - Counter({"cat": 1})),
             ([7], 0, BRANCH_OPS - Counter({"index_select": 1, "cat": 1})))
    for units, p, want in cases:
        mlp = RegisterMlp(w, units, num_prefix=p, num_registers=1)
        assert dispatched_ops(mlp, tokens) - ordinary == want, (units, p)
        # the rule, written out: the original MLP with the units' activations edited before fc2
        hid = gelu(linear(tokens, w.fc1_weight, w.fc1_bias))
        h = hid[..., units]
        flat = h.reshape(2, -1)
        m = flat.gather(1, flat.abs().argmax(1, keepdim=True)).view(2, 1, 1).expand(2, 1, len(units))
        edited = torch.cat([h[:, :p], m, torch.zeros_like(h[:, p + 1:])], dim=1)
        hid = hid.clone()
        hid[..., units] = edited
        torch.testing.assert_close(mlp(tokens), linear(hid, w.fc2_weight, w.fc2_bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["clip", "swiglu", "siglip"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@torch.no_grad()
def test_lean_forward_computes_the_rule_in_float32_and_bfloat16(variant, dtype, calib_dir):
    """Baked in `dtype` against the independent rule in float64: as close as the rule itself run in
    `dtype` (the model's own rounding in that dtype, not one CPU's kernels), within a factor 2. A missing or
    wrong edit is orders of magnitude above (tests/core/test_rule_reference.py pins float64 to 1e-9)."""
    model, baked, recipe, fam = _baked(variant, num_registers=2, mode="per_neuron" if variant == "swiglu" else "shared")
    x = pixels_from(calib_dir, fam.data_transform(model), 8)
    opts = dict(num_registers=recipe.num_registers, scale=recipe.scale, per_neuron=recipe.mode == "per_neuron")
    model64 = copy.deepcopy(model).double()
    with rule_reference(model64, recipe.neurons, **opts):
        want = model64.forward_features(x.double())
    ref_low = copy.deepcopy(model).to(dtype)
    with rule_reference(ref_low, recipe.neurons, **opts):
        rule_own = per_vector_relative(ref_low.forward_features(x.to(dtype)), want).max()
    got = per_vector_relative(baked.to(dtype).forward_features(x.to(dtype)), want).max()
    assert got <= 2 * rule_own + 1e-7, (float(got), float(rule_own))
