"""The judge's allowance from the float32 (and half) kernels' own error, and what its lines say.

Default tier: the allowance rule on hand-made errors (expected values written from the rule), the FAIL /
PASS lines. Slow tier: real-size ViT-B/16 and ViT-L/14 (random init, planted register neurons): a
correct bake passes, every mutation (surgery/organisms/mutations.py) fails.
"""
from __future__ import annotations

import copy

import pytest
import torch

from surgery.core.judge import kernel_allowance
from surgery.core.parity import OutputError, ParityReport


def test_kernel_allowance_is_four_times_the_own_error_floored_at_its_99th_percentile():
    own = torch.tensor([[1e-7] * 99 + [1e-5]])  # 100 vectors; the 99th percentile lies between 1e-7 and 1e-5
    floor = 1e-7 + 0.01 * (1e-5 - 1e-7)  # linear interpolation at rank 0.99 * 99 = 98.01
    got = kernel_allowance(own)
    assert torch.allclose(got[0, :99], torch.full((99,), 4 * floor, dtype=got.dtype))
    assert float(got[0, 99]) == pytest.approx(4e-5)


def test_an_error_the_kernels_explain_passes_and_says_why():
    ref = torch.ones(1, 4, 8, dtype=torch.float64)
    own = torch.full((1, 4), 2e-5, dtype=torch.float64)  # the hooked reference itself, in float32, vs float64
    got = ref.clone()
    got[0, 2] *= 1 + 5e-5  # 2.5 x the reference's own error: within 4 x
    err = OutputError("tokens")
    allowed = torch.maximum(torch.full_like(own, 1e-5), kernel_allowance(own))
    err.update(got, ref, allowed=allowed, kernel=kernel_allowance(own), own=own, tolerance=1e-5)
    report = ParityReport(1e-5, outputs={"tokens": err}, images=1)
    assert report.passed
    line = report.summary()
    assert "allowed there 8e-05: 4 x the error the hooked reference itself makes in float32" in line, line


def test_a_failure_states_the_reference_own_error_and_names_tolerance():
    ref = torch.ones(1, 4, 8, dtype=torch.float64)
    own = torch.full((1, 4), 1e-6, dtype=torch.float64)
    got = ref.clone()
    got[0, 1] *= 1.003  # a wrong bake: 750 x the kernel allowance
    err = OutputError("block3.residual")
    allowed = torch.maximum(torch.full_like(own, 1e-5), kernel_allowance(own))
    err.update(got, ref, allowed=allowed, kernel=kernel_allowance(own), own=own, tolerance=1e-5)
    report = ParityReport(1e-5, outputs={err.name: err}, images=1)
    line = report.summary()
    assert not report.passed and line.startswith("parity FAIL")
    assert "the hooked reference itself in float32 is off by 1e-06 there (1e-06 at most)" in line, line
    assert "--tolerance 5e-3 accepts it" in line, line


def test_an_export_failure_states_the_reference_own_error_and_what_tolerance_would_take():
    from surgery.exporters.onnx_validate import Comparison, OnnxReport

    ref = torch.ones(2, 3, 8, dtype=torch.float64)
    own = torch.full((2, 3), 2e-6, dtype=torch.float64)
    own[1, 2] = 3e-6
    got = ref.clone()
    got[1, 2] *= 1.004  # a wrong export: relative error 4e-3 at (image 1, token 2)
    err = OutputError("tokens")
    allowed = torch.maximum(torch.full_like(own, 1e-5), kernel_allowance(own))
    err.update(got, ref, allowed=allowed, kernel=kernel_allowance(own), own=own, tolerance=1e-5)
    ok = OutputError("pooled")
    ok.update(ref[:, 0], ref[:, 0], allowed=torch.full((2,), 1e-5, dtype=torch.float64), tolerance=1e-5)
    report = OnnxReport(path="model.onnx", tolerance=1e-5, export_batch_size=2, batch_sizes=[2], images=2,
                        comparisons=[Comparison("pooled", "float64_reference", ok, 1e-5),
                                     Comparison("tokens", "float64_reference", err, 1e-5)])
    line = report.summary()
    assert not report.passed and line.startswith("onnx FAIL") and "\n" not in line
    assert "tokens vs float64 reference relative error 0.004 > allowed 1.2e-05" in line, line  # 4 x 3e-6
    assert "at (image, token) (1, 2), where the hooked reference itself in float32 is off by 3e-06 (3e-06 at most)" \
        in line, line
    assert "pooled vs" not in line  # only what failed
    assert "accepting this one needs a tolerance of 5e-3" in line, line
    assert "--tolerance does not loosen an export's validation (each format validates at its own, here 1e-05)" \
        in line, line


def test_check_uses_the_tolerance_recorded_by_convert(tmp_path):
    from surgery.core.output_format import recorded_tolerance

    assert recorded_tolerance(tmp_path) is None
    (tmp_path / "parity.json").write_text('{"parity": {"tolerance": 0.0001, "passed": true}}')
    assert recorded_tolerance(tmp_path) == 1e-4
    (tmp_path / "parity.json").write_text('{"parity": {"tolerance": "nan"}}')
    assert recorded_tolerance(tmp_path) is None


# ---- one verdict protocol (surgery/core/verdict.py) ---------------------------------------------------

def _error(name: str, relative: float) -> OutputError:
    """An OutputError whose worst vector is `relative` off (plain tolerance judge, no allowance)."""
    ref = torch.ones(1, 2, 4, dtype=torch.float64)
    got = ref.clone()
    got[0, 1] *= 1 + relative  # the vector's relative error is exactly `relative` (all its entries scale)
    err = OutputError(name)
    err.update(got, ref)
    return err


def _verdicts(relative: float) -> dict[str, object]:
    """One of every verdict type, judged on an error of `relative` against a tolerance of 1e-3."""
    from pathlib import Path

    from surgery.api import CheckResult, ExportResult
    from surgery.core.recipe import Recipe
    from surgery.exporters.onnx_int8 import Int8Report
    from surgery.exporters.onnx_validate import Comparison, OnnxReport
    from surgery.onnx_graph.check import OnnxCheckReport
    from surgery.onnx_graph.folder import FolderCheck
    from surgery.onnx_graph.variants import Fp32Judgement
    from surgery.pipeline import ConvertResult

    tol = 1e-3
    parity = ParityReport(tol, outputs={"tokens": _error("tokens", relative)}, images=1)
    comparison = Comparison("tokens", "float64_reference", _error("tokens", relative), tol)
    onnx = OnnxReport(path="model.onnx", tolerance=tol, export_batch_size=2, batch_sizes=[1], images=1,
                      comparisons=[comparison])
    onnx_check = OnnxCheckReport("baked.onnx", "source.onnx", tol, batch_sizes=[1],
                                 errors={"tokens": _error("tokens", relative)})
    # bound = factor x unbaked error + FP32_TOLERANCE = 1 x 1e-3 + 1e-5
    fp32 = Fp32Judgement("model_fp16.onnx", "model.onnx", factor=1.0, noise_max=0.05,
                         baked={"tokens": _error("tokens", relative)}, baseline={"tokens": _error("tokens", 1e-3)})
    folder = FolderCheck(reports={"onnx/model.onnx": onnx_check}, judgements={"onnx/model_fp16.onnx": fp32})
    cosine = 1.0 - relative  # INT8's judge: cosines against 1 - tolerance
    int8 = Int8Report("model_quantized.onnx", "dynamic", pooled_min=1 - tol, patch_min=1 - tol,
                      pooled_cosine=[cosine], patch_cosine=[cosine], images=1)
    recipe = Recipe({0: (1,)})
    return {"ParityReport": parity, "Comparison": comparison, "OnnxReport": onnx, "OnnxCheckReport": onnx_check,
            "Fp32Judgement": fp32, "FolderCheck": folder, "Int8Report": int8,
            "CheckResult": CheckResult(parity, exports=[onnx]), "ExportResult": ExportResult(onnx, ["model.onnx"]),
            "ConvertResult": ConvertResult(Path("out"), recipe, parity, None, None, exports=[int8])}


@pytest.mark.parametrize("relative, passed", [(1e-4, True), (5e-2, False)])
def test_every_verdict_type_satisfies_the_one_protocol(relative, passed):
    """passed is a bool property, summary() one line saying PASS or FAIL (a failing one never PASS),
    to_dict() carries the same passed and summary and is JSON; whatever judged it."""
    import json
    import re

    from surgery.core.output_format import json_text
    from surgery.core.verdict import Verdict

    assert not isinstance(_error("tokens", 0.0), Verdict)  # a part of a report, not a verdict
    for name, v in _verdicts(relative).items():
        assert isinstance(v, Verdict), name
        assert v.passed is passed, (name, v.summary())
        line = v.summary()
        words = set(re.findall(r"\b(PASS|FAIL)\b", line))
        assert words == ({"PASS"} if passed else {"FAIL"}), (name, line)
        assert "\n" not in line, (name, line)
        d = json.loads(json_text(v.to_dict()))
        assert d["passed"] is passed and d["summary"] == line, name


# ---- real size (slow) ------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("shape, images, patch", [("vit_b16", 4, 16), ("vit_l14", 2, 14)])
def test_real_size_correct_bake_passes_and_every_mutation_fails(shape, images, patch, tmp_path):
    from PIL import Image

    from surgery.backends import adapter_for
    from surgery.core.bake import bake_registers
    from surgery.core.errors import ParityError
    from surgery.core.parity import check_parity
    from surgery.organisms.mutations import MUTATIONS, build_real_size_vit
    from surgery.organisms.vit import write_organism_images

    model, recipe = build_real_size_vit(shape, 0)
    fam = adapter_for(model)
    tf = fam.data_transform(model)
    files = write_organism_images(tmp_path, count=images, seed=0, size=224, patch=patch)
    x = torch.stack([tf(Image.open(f).convert("RGB")) for f in files])
    batches = [x[:1], x[1:]]

    def bake(m, r):
        return bake_registers(copy.deepcopy(m), r, adapter=adapter_for(m))

    baked = bake(model, recipe)
    report = check_parity(model, baked, recipe, batches, adapter=fam)
    assert report.passed, report.summary()
    for name, mutate in MUTATIONS.items():
        wrong = mutate(model, baked, recipe, bake)
        try:
            verdict = check_parity(model, wrong, recipe, batches, adapter=fam)
        except ParityError:
            continue  # refused before any number is also caught
        assert not verdict.passed, f"{name}: {verdict.summary()}"
        assert verdict.worst.excess(verdict.tolerance) > 10, f"{name}: {verdict.summary()}"
        del wrong
