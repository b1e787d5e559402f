"""The baked timm output passes timm's own generic model tests, as its source does.

timm's `tests/test_models.py` (from the sdist of the installed timm, see tests/helpers/timm_sdist.py) runs on a
baked organism of each timm-class family (VisionTransformer, Eva) loaded the way users load it
(`local-dir:OUT`): forward, backward, default cfgs, forward_intermediates, features_only (plain and
feature_cls="getter"), TorchScript and FX (symbolic trace, backward, traced + scripted). On top:
`torch.compile(fullgraph=True)` and `torch.export`, both equal to eager.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from surgery.backends import adapter_for
from surgery.backends.timm.loader import timm_source
from surgery.backends.timm.writer import write_timm_dir
from surgery.core.bake import bake_registers
from surgery.core.recipe import Recipe
from surgery.organisms.vit import build_timm_organism
from surgery.organisms.eva import build_eva_organism

from tests.helpers.timm_sdist import register_baked_folder, timm_model_tests

FAMILIES = {
    "vit": lambda: build_timm_organism(0, "clip"),     # VisionTransformer (CLIP-style: norm_pre, QuickGELU-free)
    "eva": lambda: build_eva_organism(0, "dinov3"),    # Eva (RoPE, trained registers)
}

# (timm test function, its arguments after the model name)
TIMM_TESTS = [
    ("test_model_forward", (1,)),
    ("test_model_backward", (2,)),
    ("test_model_default_cfgs_non_std", (1, "meta")),  # vit_*/eva_* names are timm's "non-std" models
    ("test_model_forward_intermediates", (1,)),
    ("test_model_forward_features", (1,)),  # features_only=True, the family's default feature class
    ("test_model_forward_intermediates_features", (1,)),  # features_only=True, feature_cls="getter"
    ("test_model_forward_torchscript", (1,)),
    ("test_model_forward_fx", (1,)),
    ("test_model_backward_fx", (2,)),
    ("test_model_forward_fx_torchscript", (1,)),
]


def _write_baked(family: str, folder: Path) -> Path:
    model, planting = FAMILIES[family]()
    src = model.organism_source
    recipe = Recipe(neurons={k: tuple(sorted(v)) for k, v in planting.neurons.items()})
    source = timm_source(model, src["architecture"], src["model_args"])
    bake_registers(model, recipe, adapter=adapter_for(model))
    write_timm_dir(model, folder, source=source, surgery={"recipe": recipe.to_dict()})
    return folder


@pytest.fixture(scope="module")
def baked_names(tmp_path_factory) -> dict[str, str]:
    """timm model names for the baked organisms (registered as local-dir:FOLDER entrypoints)."""
    root = tmp_path_factory.mktemp("timm-model-tests")
    return {f: register_baked_folder(f"vit_surgery_organism_{f}", _write_baked(f, root / f)) for f in FAMILIES}


@pytest.fixture(scope="module")
def timm_tests():
    return timm_model_tests()


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("test_name, args", TIMM_TESTS, ids=[t for t, _ in TIMM_TESTS])
def test_timm_generic_model_test(timm_tests, baked_names, family: str, test_name: str, args: tuple) -> None:
    fn = getattr(timm_tests, test_name, None)
    if fn is None:
        pytest.skip(f"timm's test_models.py defines no {test_name} here (GITHUB_ACTIONS or another timm version)")
    fn(baked_names[family], *args)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_baked_is_baked(baked_names, family: str) -> None:
    """The registered names build the baked model (not its source), also as features_only."""
    import timm

    from surgery.core.modules import PrependRegisters, RegisterMlp

    model = timm.create_model(baked_names[family], pretrained=True)
    assert model.surgery_recipe is not None
    assert any(isinstance(m, RegisterMlp) for m in model.modules())
    for cls in ("getter", None):
        kw = {"feature_cls": cls} if cls else {}
        feats = timm.create_model(baked_names[family], pretrained=True, features_only=True, **kw)
        assert any(isinstance(m, PrependRegisters) for m in feats.modules())
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            want = model.forward_intermediates(x, indices=feats.out_indices, intermediates_only=True)
            got = feats(x)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_compile_fullgraph_and_export(baked_names, family: str) -> None:
    import timm

    model = timm.create_model(baked_names[family], pretrained=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
        compiled = torch.compile(model, fullgraph=True, backend="eager")  # graph capture, no codegen: fast
        torch.testing.assert_close(compiled(x), want, rtol=0, atol=0)
        exported = torch.export.export(model, (x,))
        torch.testing.assert_close(exported.module()(x), want, rtol=1e-6, atol=1e-6)
        # the half-precision branch is decided at cast time, so a cast model traces without a break
        half = torch.compile(model.to(torch.bfloat16), fullgraph=True, backend="eager")
        assert half(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_half_precision_model_has_one_static_path() -> None:
    """RegisterMlp runs a half model's branch in the model's dtype on the same path as float32 (no branch on
    dtype at all): an FX trace of a cast half module (its graph form: add + cat instead of the eager in-place
    fused GEMM + add) agrees with the loaded half module to half precision's rounding, in half precision."""
    import copy

    from surgery.core.modules import MlpWeights, RegisterMlp

    w = MlpWeights(torch.randn(16, 8), torch.randn(16), torch.randn(8, 16), torch.randn(8), torch.nn.GELU())
    mlp = RegisterMlp(w, [3, 5], num_prefix=1, num_registers=1)
    loaded = copy.deepcopy(mlp)
    loaded.load_state_dict({k: v.half() if v.is_floating_point() else v for k, v in mlp.state_dict().items()},
                           assign=True)
    x = torch.randn(2, 6, 8).half()
    traced = torch.fx.symbolic_trace(copy.deepcopy(mlp).half())  # static path: no TraceError on dtype
    got = traced(x)
    assert got.dtype == torch.float16
    want = loaded(x)
    torch.testing.assert_close(got[:, 2:], want[:, 2:], rtol=0, atol=0)  # patch rows: the same ops
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)  # CLS + register rows: one rounding apart
