"""ONNX export: the fix inside the graph, validated in onnxruntime.

Organism-sized models only. The export batch is 2; onnxruntime is checked at batch 1 and 5 against the
PyTorch baked model and the hooked reference (fp32 relative error <= 1e-5).
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from surgery.exporters import onnx_patches, onnx_validate
from surgery.exporters.onnx_metadata import read_onnx_metadata
from surgery.exporters.onnx_publish import export_and_validate
from surgery.core.output_format import FP16_TOLERANCE, FP32_TOLERANCE, ONNX_FILE
from surgery.core.output_format import ONNX_DATA_FILE as DATA_FILE
from surgery.exporters.onnx_validate import validate_onnx, validation_batches
from surgery import __version__
from surgery.backends import adapter_for
from surgery.core.bake import register_token_indices, unbake
from surgery.cli import main
from surgery.core.errors import ModelInputError, ParityError
from surgery.backends import load_model
from surgery.core.judge import allowed_error, as_float64, float64_reference
from surgery.core.parity import OutputError
from surgery.core.recipe import Recipe
from tests.helpers import cli as run


def copy_baked(baked_dir: Path, dest: Path) -> Path:
    shutil.copytree(baked_dir, dest, ignore=shutil.ignore_patterns(ONNX_FILE, DATA_FILE))
    return dest


def session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def exported(baked_dir, tmp_path_factory):
    """A copy of the converted organism with model.onnx written by export_and_validate (dynamo)."""
    d = copy_baked(baked_dir, tmp_path_factory.mktemp("onnx") / "out")
    report = export_and_validate(d, loaded=load_model(str(d)), progress=False)
    from surgery.core.integrity import record_written

    record_written(d, [ONNX_FILE])  # what the export format (`vit-surgery export`) does after writing it
    return d, report


def test_export_writes_a_valid_graph_with_a_dynamic_batch(exported):
    d, report = exported
    assert report.passed and report.dtype == "float32" and report.tolerance == FP32_TOLERANCE == 1e-5
    assert report.export_batch_size == 2 and report.batch_sizes == [1, 5] and report.images == 6
    assert {(c.output, c.against) for c in report.comparisons} == {
        (o, "float64_reference") for o in ("pooled", "tokens")}
    # judged per vector against float64: well-conditioned vectors within 1e-5, none beyond its allowance
    assert all(c.passed and c.error.ratio <= 1.0 for c in report.comparisons)
    path = d / ONNX_FILE
    assert path.is_file() and not (d / DATA_FILE).exists()
    assert not list(d.glob(".onnx-export-*"))
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17

    def dims(vi):
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    assert [(i.name, dims(i)) for i in model.graph.input] == [("pixel_values", ["batch", 3, 64, 64])]
    # organism: 16 classes; 1 CLS + 1 test-time register + 64 patches, width 64
    assert [(o.name, dims(o)) for o in model.graph.output] == [("pooled", ["batch", 16]),
                                                               ("tokens", ["batch", 66, 64])]
    assert not any(n.op_type.startswith("ATen") for n in model.graph.node)
    doc = json.loads((d / "parity.json").read_text())
    assert doc["onnx"]["passed"] and doc["onnx"]["batch_sizes"] == [1, 5]


@torch.no_grad()
def test_onnxruntime_matches_pytorch_and_hooked_reference_at_batch_1_and_5(exported):
    d, _ = exported
    loaded = load_model(str(d))
    fam, baked = loaded.adapter, loaded.model
    source = copy.deepcopy(baked)
    unbake(source, adapter=fam)
    sess = session(d / ONNX_FILE)
    pixels = torch.cat(validation_batches(loaded, (6,)))
    # both implementations judged against the hooked reference in float64, per vector (surgery/core/judge.py)
    errors = {(o, a): OutputError(o) for o in ("pooled", "tokens") for a in ("onnx", "pytorch")}
    source64 = as_float64(source)

    def capture(model, family, x):
        return dict(zip(("pooled", "tokens"), family.forward_both(model, x)))

    singles = []
    for batch in (pixels[:1], pixels[1:6]):
        pooled, tokens = sess.run(["pooled", "tokens"], {"pixel_values": batch.numpy()})
        assert pooled.shape == (len(batch), 16) and tokens.shape == (len(batch), 66, 64)
        got = {"onnx": {"pooled": torch.from_numpy(pooled), "tokens": torch.from_numpy(tokens)},
               "pytorch": capture(baked, fam, batch)}
        judge = float64_reference(source64, loaded.recipe, fam, batch, capture)
        for (o, a), err in errors.items():
            err.update(got[a][o], judge.exact[o], allowed=judge.allowed(o, 1e-5))
        singles.append(got["onnx"])
    for (o, a), err in errors.items():
        assert err.within(1e-5), (o, a, err.to_dict())
    # the register token (index 1) is a real output: the fix is in the graph, not dropped
    assert register_token_indices(baked, adapter=fam) == [1]
    tok = singles[1]["tokens"]
    assert torch.isfinite(tok).all() and tok[:, 1].norm(dim=-1).min() > 0
    # batch 5 is not a batch-2 graph evaluated five times wrongly: each row equals its batch-1 run
    for i in range(5):
        one = sess.run(["tokens"], {"pixel_values": pixels[1 + i:2 + i].numpy()})[0]
        np.testing.assert_allclose(one[0], tok[i].numpy(), rtol=0, atol=1e-5)


def test_metadata_round_trips(exported):
    d, _ = exported
    loaded = load_model(str(d))
    meta = read_onnx_metadata(d / ONNX_FILE)
    assert Recipe.from_dict(meta["recipe"]) == loaded.recipe
    assert meta["recipe"] == loaded.recipe.to_dict()
    assert meta["register_token_indices"] == register_token_indices(loaded.model, adapter=adapter_for(loaded.model)) == [1]
    # num_prefix_tokens is the model's own (CLS + register): patches are tokens[:, num_prefix_tokens:]
    assert meta["num_prefix_tokens"] == loaded.model.num_prefix_tokens == 2
    assert meta["num_source_prefix_tokens"] == 1 and meta["num_registers"] == 1
    layout = meta["token_layout"]
    assert layout["register_indices"] == [1] and layout["first_patch_index"] == 2 and layout["num_tokens"] == 66
    surgery_doc = json.loads((d / "surgery.json").read_text())
    assert meta["source_model"] == surgery_doc["source_model"]
    assert meta["source"]["architecture"] == "vit_base_patch16_clip_224"
    assert meta["tool_version"] == __version__ and meta["tool"] == "vit-surgery"
    assert meta["dtype"] == "float32" and meta["export_batch_size"] == 2 and meta["family"] == "timm"
    assert "dynamo" in meta["exporter"]
    assert meta["interface"]["outputs"]["tokens"]["axes"] == ["batch", "sequence", "width"]
    assert meta["preprocess"]["input_size"] == [3, 64, 64]
    # the same properties as onnxruntime reports them
    custom = session(d / ONNX_FILE).get_modelmeta().custom_metadata_map
    assert json.loads(custom["vit_surgery.recipe"]) == loaded.recipe.to_dict()
    assert json.loads(custom["vit_surgery.register_token_indices"]) == [1]


def test_fp16_export_uses_its_documented_tolerance(baked_dir, tmp_path):
    d = copy_baked(baked_dir, tmp_path / "out")
    report = export_and_validate(d, loaded=load_model(str(d)), fp16=True, progress=False)
    assert report.passed and report.dtype == "float16" and report.tolerance == FP16_TOLERANCE == 2e-2
    worst = report.worst
    assert 1e-5 < worst.relative <= 2e-2  # really computed in float16, and within the looser bound
    model = onnx.load(str(d / ONNX_FILE))
    kinds = {t.data_type for t in model.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in kinds
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # float32 interface
    assert read_onnx_metadata(d / ONNX_FILE)["dtype"] == "float16"
    # check re-validates it with the fp16 tolerance
    loaded = load_model(str(d))
    again = validate_onnx(d, loaded, validation_batches(loaded, (3,)))
    assert again.passed and again.tolerance == 2e-2 and again.batch_sizes == [3]


def test_external_data_branch_and_legacy_exporter(baked_dir, tmp_path):
    d = copy_baked(baked_dir, tmp_path / "out")
    report = export_and_validate(d, loaded=load_model(str(d)), progress=False, exporter="legacy", external_data_threshold=0)
    assert report.passed and report.external_data
    assert (d / ONNX_FILE).stat().st_size < 200_000 < (d / DATA_FILE).stat().st_size
    model = onnx.load(str(d / ONNX_FILE), load_external_data=False)
    assert {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"} == {DATA_FILE}
    assert "legacy" in read_onnx_metadata(d / ONNX_FILE)["exporter"]
    assert session(d / ONNX_FILE).run(["pooled"], {"pixel_values": np.zeros((3, 3, 64, 64), np.float32)})[0].shape == (3, 16)
    # a small export replacing it leaves no stale weights file behind
    report = export_and_validate(d, loaded=load_model(str(d)), progress=False, exporter="legacy")
    assert report.passed and not report.external_data and not (d / DATA_FILE).exists()
    assert not list(d.glob(".onnx-export-*"))


def test_failed_validation_leaves_no_file_and_names_the_output(baked_dir, tmp_path, monkeypatch):
    d = copy_baked(baked_dir, tmp_path / "out")
    plain = onnx_patches.ExportWrapper.forward

    def broken(self, pixel_values):
        pooled, tokens = plain(self, pixel_values)
        return pooled, tokens * 1.001  # an export bug: tokens off by 1e-3

    monkeypatch.setattr(onnx_patches.ExportWrapper, "forward", broken)
    with pytest.raises(ParityError) as e:
        export_and_validate(d, loaded=load_model(str(d)), progress=False, exporter="legacy")
    msg = str(e.value)
    assert "\n" not in msg and "tokens vs float64 reference" in msg
    assert "pooled vs" not in msg and "no model.onnx written" in msg
    assert not (d / ONNX_FILE).exists() and not (d / DATA_FILE).exists()
    assert sorted(p.name for p in d.iterdir()) == sorted(p.name for p in baked_dir.iterdir()
                                                         if p.name not in (ONNX_FILE, DATA_FILE))
    # an existing model.onnx is left as it was
    (d / ONNX_FILE).write_bytes(b"previous export")
    with pytest.raises(ParityError):
        export_and_validate(d, loaded=load_model(str(d)), progress=False, exporter="legacy")
    assert (d / ONNX_FILE).read_bytes() == b"previous export"


def test_validation_uses_a_batch_size_other_than_the_export_one(exported):
    d, report = exported
    loaded = load_model(str(d))
    pixels = torch.cat(validation_batches(loaded, (4,)))
    again = validate_onnx(d, loaded, [pixels[:2], pixels[2:4]])  # every batch as big as the export's
    assert again.passed and again.batch_sizes == [1, 1, 2] and again.images == 4


def test_check_validates_the_onnx_file_and_rejects_a_corrupt_one(exported, tmp_path, capsys):
    src, _ = exported
    d = tmp_path / "out"
    shutil.copytree(src, d)
    code, out, err = run(["check", d, "--num-images", "8", "--report", tmp_path / "check.json"], capsys)
    assert code == 0, err
    assert "onnx PASS" in out and "parity PASS" in out
    assert json.loads((tmp_path / "check.json").read_text())["onnx"]["passed"]
    good = (d / ONNX_FILE).read_bytes()
    for bad in (b"this is not an onnx file" * 10, good[: len(good) // 2], b""):
        (d / ONNX_FILE).write_bytes(bad)
        code, out, err = run(["check", d, "-q", "--num-images", "8"], capsys)
        assert code == 11, (code, err)  # the export recorded the file's hash: a changed file is damage
        line = err.strip()
        assert "\n" not in line and "model.onnx" in line and "Traceback" not in line
    code, out, err = run(["check", d, "--num-images", "8", "--skip-onnx"], capsys)
    assert code == 11 and "model.onnx" in err  # --skip-onnx skips the numbers, not the integrity record
    loaded = load_model(str(d))  # an unreadable file met by the validation itself is an input error (exit 4)
    with pytest.raises(ModelInputError):
        validate_onnx(d, loaded, validation_batches(loaded, (2,)))


def test_check_flags_an_onnx_file_from_another_recipe(exported, tmp_path, capsys):
    src, _ = exported
    d = tmp_path / "out"
    shutil.copytree(src, d)
    model = onnx.load(str(d / ONNX_FILE))
    for p in model.metadata_props:
        if p.key == "vit_surgery.recipe":
            p.value = json.dumps({"register_neurons": {"2": [17]}, "num_registers": 1, "scale": 1.0, "mode": "shared"})
    onnx.save(model, str(d / ONNX_FILE))
    code, _, err = run(["check", d, "--num-images", "4"], capsys)
    assert code == 11 and "model.onnx" in err  # a changed file: OUT's integrity record catches it first
    from surgery.core.integrity import record_written

    record_written(d, [ONNX_FILE])  # as if an export had written (and recorded) it: the numbers must catch it
    code, out, err = run(["check", d, "--num-images", "4"], capsys)
    assert code == 7 and "onnx FAIL" in out and "another recipe" in out
    assert "out of tolerance: model.onnx" in err and "\n" not in err.strip()


def test_export_command_exit_codes(exported, organism_dir, tmp_path, capsys):
    src, _ = exported
    d = tmp_path / "out"
    shutil.copytree(src, d)
    code, out, err = run(["export", d, "--format", "onnx", "-q"], capsys)
    assert code == 8 and "--overwrite" in err
    before = (d / ONNX_FILE).stat().st_mtime_ns
    code, out, err = run(["export", d, "--format", "onnx", "--overwrite", "--exporter", "legacy", "-q"], capsys)
    assert code == 0, err
    assert "onnx PASS" in out and f"wrote {d / ONNX_FILE}" in out and err == ""
    assert (d / ONNX_FILE).stat().st_mtime_ns != before
    code, out, err = run(["export", organism_dir, "--format", "onnx", "-q"], capsys)  # not a converted folder
    assert code == 4 and "not a vit-surgery output" in err
    code, out, err = run(["export", tmp_path / "missing", "-q"], capsys)
    assert code == 4 and "not found" in err
    with pytest.raises(SystemExit) as e:
        main(["export", str(d), "--format", "tflite"])
    assert e.value.code == 2


def test_convert_with_onnx_writes_a_validated_graph(organism_dir, tmp_path, capsys):
    neurons = tmp_path / "n.json"
    neurons.write_text(json.dumps({"register_neurons": {"2": [17, 101], "3": [42]}}))
    out = tmp_path / "out"
    code, stdout, err = run(["convert", organism_dir, "--neurons", neurons, "--out", out, "--onnx"], capsys)
    assert code == 0, err
    lines = stdout.splitlines()  # the bake's lines first, then the ONNX check's
    assert lines[0].startswith("baked ") and lines[1].startswith("parity PASS")
    assert any(ln.startswith("onnx PASS") for ln in lines[2:]) and lines[-1].startswith("wrote ")
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "surgery.json", "parity.json",
                                              "README.md", ONNX_FILE}
    doc = json.loads((out / "parity.json").read_text())
    assert doc["parity"]["passed"] and doc["onnx"]["passed"] and doc["onnx"]["batch_sizes"] == [1, 5]
    assert read_onnx_metadata(out / ONNX_FILE)["recipe"]["register_neurons"] == {"2": [17, 101], "3": [42]}


def test_register_branch_activation_is_tail_accurate_in_float32_where_it_has_a_sigmoid_form():
    import open_clip.transformer as oc
    from timm.layers import QuickGELU
    from transformers.activations import ACT2FN
    from surgery.core.modules import MlpWeights, RegisterMlp
    from surgery.exporters.tail_accurate_activation import tail_accurate_equivalent, tail_accurate_register_branches

    def mlp(act):
        w = MlpWeights(torch.randn(16, 8), torch.randn(16), torch.randn(8, 16), torch.randn(8), act)
        return torch.nn.Sequential(RegisterMlp(w, [3, 5], num_prefix=1, num_registers=1))

    sigmoid_family = {"timm QuickGELU": QuickGELU(), "open_clip QuickGELU": oc.QuickGELU(),
                      "HF quick_gelu": ACT2FN["quick_gelu"], "SiLU": torch.nn.SiLU(), "HF silu": ACT2FN["silu"],
                      "tanh GELU": torch.nn.GELU(approximate="tanh"), "HF gelu_pytorch_tanh": ACT2FN["gelu_pytorch_tanh"]}
    x64 = torch.linspace(-40.0, 8.0, 2001, dtype=torch.float64)
    for name, act in sigmoid_family.items():
        gate = tail_accurate_equivalent(act)
        assert gate is not None, name
        torch.testing.assert_close(gate(x64), act(x64), rtol=1e-9, atol=1e-12)  # the same function
        truth = gate(x64)  # float64 (tanh GELU's own formula cancels in float64 too in the far tail)
        got = gate(x64.float()).double()
        rel_err = ((got - truth).abs() / truth.abs().clamp_min(1e-300))[truth.abs() > 1e-30]
        assert rel_err.max() < 2e-5, (name, rel_err.max())  # relative, deep into the negative tail
    assert tail_accurate_equivalent(torch.nn.GELU()) is None  # exact (erf) GELU: no sigmoid form, left alone

    quick, exact = mlp(QuickGELU()), mlp(torch.nn.GELU())
    x = torch.randn(2, 6, 8)
    want = quick(x)
    with tail_accurate_register_branches(quick) as changed:
        assert changed == ["0"] and quick[0].act is not quick[0].reg_act  # the ordinary MLP keeps its own
        torch.testing.assert_close(quick(x), want, rtol=1e-5, atol=1e-6)
    assert quick[0].reg_act is quick[0].act  # restored
    with tail_accurate_register_branches(exact) as changed:
        assert changed == []


def test_open_clip_export_with_the_attention_fast_path_trap(tmp_path, capsys):
    import surgery.organisms.families as fams

    model, planting = fams.build_open_clip_organism(0)
    src = fams.save_open_clip_organism(model, tmp_path / "src")
    neurons = tmp_path / "n.json"
    neurons.write_text(json.dumps({"register_neurons": {str(k): v for k, v in planting.neurons.items()}}))
    out = tmp_path / "out"
    assert torch.backends.mha.get_fastpath_enabled()
    code, _, err = run(["convert", src, "--neurons", neurons, "--out", out, "-q"], capsys)
    assert code == 0, err
    for exporter in ("dynamo", "legacy"):
        report = export_and_validate(out, loaded=load_model(str(out)), progress=False, exporter=exporter)
        assert report.passed and report.batch_sizes == [1, 5], report.summary()
        assert exporter in read_onnx_metadata(out / ONNX_FILE)["exporter"]
    assert torch.backends.mha.get_fastpath_enabled()  # restored after export


def test_validation_judges_each_vector_not_the_worst_case():
    """An error on one well-conditioned vector fails even when another vector is ill-conditioned."""
    ref = torch.ones(1, 3, 4)
    cond = torch.tensor([[1e-7, 1e-7, 1e-4]])  # token 2 is a thousand times more ill-conditioned
    allowed = allowed_error(cond, 1e-5)
    assert torch.allclose(allowed, torch.tensor([[1e-5, 1e-5, 1e-2]]))
    noisy_register = ref.clone()
    noisy_register[0, 2] *= 1 + 5e-3  # within its allowance
    err = OutputError("tokens")
    err.update(noisy_register, ref, allowed=allowed)
    assert onnx_validate.Comparison("tokens", "float64_reference", err, 1e-5).passed
    wrong_patch = noisy_register.clone()
    wrong_patch[0, 0] *= 1 + 5e-5  # the register's slack must not excuse this
    err = OutputError("tokens")
    err.update(wrong_patch, ref, allowed=allowed)
    comp = onnx_validate.Comparison("tokens", "float64_reference", err, 1e-5)
    assert not comp.passed and err.where == (0, 0)
    report = onnx_validate.OnnxReport(path="m.onnx", comparisons=[comp], batch_sizes=[1], images=1, export_batch_size=2)
    assert not report.passed and "(image, token) (0, 0)" in report.summary()


def test_every_builtin_image_passes_validation(exported):
    """All 24 built-in images, including those where the register token is ill-conditioned."""
    d, _ = exported
    loaded = load_model(str(d))
    report = validate_onnx(d, loaded, validation_batches(loaded, (8, 8, 8)))
    assert report.passed, report.summary()
    assert report.images == 24 and report.batch_sizes == [8, 8, 8]
    for c in report.comparisons:
        assert c.error.ratio <= 1.0, c.to_dict()


# ---- the shared helpers: sessions (surgery/core/onnx_runtime.py), re-batching (surgery/core/images.py) ----

def test_a_session_that_cannot_load_or_run_is_a_one_line_model_input_error(tmp_path):
    from onnx import TensorProto, helper

    from surgery.core.onnx_runtime import open_session

    with pytest.raises(ModelInputError) as e:
        open_session(b"not an onnx model", "garbage.onnx")
    assert str(e.value).startswith("garbage.onnx: onnxruntime cannot load it (") and "\n" not in str(e.value)
    # a graph fixed to batch 1 (Reshape to [1, 4]) runs at batch 1 and refuses batch 2, naming the batch
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])], "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor("shape", TensorProto.INT64, [2], [1, 4])])
    path = tmp_path / "fixed.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    session = open_session(path)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    assert np.array_equal(session.run_pixels(["y"], x[:1])[0], x[:1])
    with pytest.raises(ModelInputError) as e:
        session.run(["y"], {"x": x})
    assert str(e.value).startswith(f"{path}: onnxruntime cannot run it on a batch of 2 image(s) of [4] (Reshape node")
    assert "\n" not in str(e.value)


def test_rebatching_cuts_consecutive_batches_and_always_adds_another_size():
    from surgery.core.images import split_batches, with_another_batch_size

    x = torch.arange(6.0).reshape(6, 1)
    sizes = lambda batches: [len(b) for b in batches]  # noqa: E731
    assert sizes(split_batches(x, [1, 5])) == [1, 5] and sizes(split_batches(x, [4, 4])) == [4, 2]
    assert sizes(split_batches(x, [6, 3])) == [6] and torch.equal(torch.cat(split_batches(x, [4, 4])), x)
    two = split_batches(x, [2, 2, 2])
    assert sizes(with_another_batch_size(two, 2)) == [1, 1, 2, 2]  # all at the export batch: the first is split
    assert torch.equal(torch.cat(with_another_batch_size(two, 2)), x)
    assert sizes(with_another_batch_size(split_batches(x, [2, 4]), 2)) == [2, 4]  # already another size
    assert sizes(with_another_batch_size([x[:1], x[:0]], 1)) == [1]  # empty dropped; one image cannot be split


def test_export_form_splits_the_branch_off_and_restores_the_model_bit_for_bit():
    """While torch exports, each RegisterMlp computes its branch from a k-row `reg_fc1` of its own with those
    fc1 rows zero (exporters/register_branch_export.py): the same values as the baked model, fc2's input free
    of the register units' activations, and afterwards every tensor as it was."""
    import copy

    from surgery.core.modules import MlpWeights, RegisterMlp
    from surgery.exporters.register_branch_export import split_register_branches

    torch.manual_seed(0)
    for gated in (False, True):
        w = MlpWeights(torch.randn(64 if gated else 32, 8), torch.randn(64 if gated else 32), torch.randn(8, 32),
                       torch.randn(8), torch.nn.SiLU() if gated else torch.nn.GELU(), gated=gated)
        model = torch.nn.Sequential(RegisterMlp(w, [3, 5, 30], num_prefix=1, num_registers=1))
        before = copy.deepcopy(model.state_dict())
        x = torch.randn(2, 6, 8)
        want = model(x)
        fc2_inputs = []
        hook = model[0].fc2.register_forward_pre_hook(lambda m, a: fc2_inputs.append(a[0]))
        with split_register_branches(model) as split:
            assert split == ["0"] and tuple(model[0].reg_fc1.weight.shape) == ((6 if gated else 3), 8)
            traced = torch.fx.symbolic_trace(model)  # the graph form, as the exporters see it
            # the same values up to float32 rounding (the CLS and register rows add the branch after fc2
            # instead of in one fused GEMM: a few ulps of the output's scale)
            torch.testing.assert_close(traced(x), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
            assert torch.equal(fc2_inputs[-1][..., [3, 5, 30]], torch.zeros(2, 6, 3))
        hook.remove()
        assert model[0].reg_fc1 is None and set(model.state_dict()) == set(before)
        for k, v in before.items():
            assert torch.equal(model.state_dict()[k], v), k
        assert torch.equal(model(x), want)
