"""ONNX input: find / convert / check on an ONNX file alone (no PyTorch source), the graph rewritten.

Each family's organism is exported by torch (dynamo or legacy exporter, opset 17 or 18, optionally through
onnxruntime's fused transformer optimisations); the ONNX file is then the only input. Judged against the
PyTorch model it came from: `find` on PyTorch (same neurons, same scores), the hooked reference
(surgery.core.reference, forward hooks on the PyTorch model) and vit-surgery's own baked ONNX export.
"""
from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from surgery.core.bake import bake_registers
from surgery.cli import main
from surgery.core.discovery import find_register_neurons
from surgery.backends import adapter_for
from surgery.onnx_graph import check_onnx, convert_onnx, find_register_neurons_onnx, recognise
from surgery.core.images import split_batches
from surgery.organisms.onnx_graphs import OPTIMUM_OUTPUTS, build_organism, export_optimum_style, export_source_onnx
from surgery.core.images import builtin_images
from surgery.core.parity import OutputError
from surgery.core.recipe import Recipe
from surgery.core.reference import hooked_reference
from tests.helpers import pixels_from

TOL = 1e-5
SCORE_RTOL = 1e-4  # float32 activations summed in float64: scores agree far better than this

# (organism, exporter, opset, onnxruntime.transformers model_type or None)
FAST_CASES = [
    ("timm_clip", "dynamo", 18, None),
    ("timm_siglip", "dynamo", 18, None),  # no CLS token, attention-pool head
    ("open_clip", "legacy", 17, "clip"),
    ("hf_clip", "dynamo", 17, "clip"),
    ("hf_dinov2", "legacy", 18, "vit"),
    ("hf_dinov2_swiglu", "dynamo", 18, None),  # gated MLP, separate gate / up projections
    ("timm_swiglu", "legacy", 17, None),  # gated MLP, one packed projection chunked by Slices
    ("hf_siglip", "dynamo", 18, None),  # HF SigLIP: no CLS, attention-pool head reading every token
    ("hf_siglip", "optimum", 14, None),  # as optimum's exporter writes it: dynamic height / width
]
SLOW_CASES = [(org, exp, opset, opt)
              for org in ("timm_clip", "timm_vit", "timm_reg4", "timm_siglip", "open_clip", "open_clip_quickgelu",
                          "hf_clip", "hf_dinov2", "hf_dinov2_swiglu", "timm_swiglu", "hf_siglip")
              for exp in ("dynamo", "legacy") for opset in (17, 18) for opt in (None, "vit" if "clip" not in org
                                                                               else "clip")
              if (org, exp, opset, opt) not in FAST_CASES and not (org.endswith("siglip") and opt)
              # torch's dynamo exporter writes timm's packed SwiGLU chunk as Split(num_outputs), an opset-18
              # attribute, also at opset 17: onnxruntime refuses that source file itself
              and not (org == "timm_swiglu" and exp == "dynamo" and opset == 17)]

_SOURCES: dict[tuple, tuple] = {}


def source_case(tmp_root: Path, case: tuple) -> tuple[Path, torch.nn.Module, object]:
    """(source.onnx, PyTorch model, planting) for a case; exported once per session."""
    if case not in _SOURCES:
        org, exporter, opset, opt = case
        model, planting = build_organism(org)
        folder = tmp_root / "_".join(map(str, case))
        if exporter == "optimum":  # HF's own ONNX layout: last_hidden_state / pooler_output, config.json
            path = export_optimum_style(model, folder, opset=opset)
        else:
            path = export_source_onnx(model, folder / "model.onnx", exporter=exporter, opset=opset, optimize=opt)
            if hasattr(model, "config"):  # an HF model's ONNX comes with its config.json
                model.config.save_pretrained(folder)
        _SOURCES[case] = (path, model, planting)
    return _SOURCES[case]


@pytest.fixture(scope="session")
def onnx_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("onnx_graph")


def torch_outputs(model, fam, x, recipe=None):
    with torch.no_grad():
        if recipe is None:
            return fam.forward_both(model, x)
        with hooked_reference(model, recipe, adapter=fam):
            return fam.forward_both(model, x)


def own_baked_export(model, recipe, scratch: Path) -> ort.InferenceSession:
    """vit-surgery's own export of the same PyTorch model, baked in PyTorch (exporters/onnx_export.py)."""
    from surgery.exporters.onnx_export import export_graph

    fam = adapter_for(model)
    baked = bake_registers(copy.deepcopy(model), recipe, adapter=fam)
    g = export_graph(baked, fam, scratch, progress=False)
    return ort.InferenceSession(g.proto.SerializeToString(), providers=["CPUExecutionProvider"])


def round_trip(tmp_root: Path, case: tuple, recipe_options: dict | None = None) -> None:
    src, model, planting = source_case(tmp_root, case)
    fam = adapter_for(model)
    tf = fam.data_transform(model)
    # find: same neurons, same scores as on the PyTorch model
    found = find_register_neurons_onnx(src, builtin_images(), transform=tf, progress=False)
    want = find_register_neurons(model, builtin_images(), progress=False, adapter=adapter_for(model))
    assert dict(found.recipe.neurons) == dict(want.recipe.neurons) == {k: tuple(v) for k, v in planting.neurons.items()}
    assert [(r["layer"], r["unit"]) for r in found.ranking[:10]] == [(r["layer"], r["unit"]) for r in want.ranking[:10]]
    np.testing.assert_allclose([r["score"] for r in found.ranking[:10]], [r["score"] for r in want.ranking[:10]],
                               rtol=SCORE_RTOL)
    assert found.layers[-1]["median"] == pytest.approx(want.layers[-1]["median"], rel=1e-5)
    recipe = found.recipe.with_options(**(recipe_options or {}))
    # convert on the ONNX alone, checked against the hooked reference graph
    pixels = pixels_from(builtin_images(), tf, 12)
    batches = split_batches(pixels, [1, 3, 8])
    out = tmp_root / ("out_" + "_".join(map(str, case)) + "_" + "_".join(f"{k}{v}" for k, v in (recipe_options or {}).items()))
    res = convert_onnx(src, out, recipe, check_batches=batches, overwrite=True)
    assert res.report.passed and res.report.batch_sizes == [1, 3, 8]
    onnx.checker.check_model(str(res.out), full_check=True)
    sess = ort.InferenceSession(str(res.out), providers=["CPUExecutionProvider"])
    src_sess = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == [o.name for o in src_sess.get_outputs()]  # every output kept
    assert sess.get_inputs()[0].shape[0] == src_sess.get_inputs()[0].shape[0]  # batch stays dynamic
    meta = {p.key: p.value for p in onnx.load(str(res.out), load_external_data=False).metadata_props}
    assert json.loads(meta["vit_surgery.recipe"]) == recipe.to_dict()
    p = fam.num_prefix_tokens(model)
    assert json.loads(meta["vit_surgery.register_token_indices"]) == list(range(p, p + recipe.num_registers))
    # against the PyTorch hooked reference and vit-surgery's own baked export, at several batch sizes
    with tempfile.TemporaryDirectory() as scratch:
        own = own_baked_export(model, recipe, Path(scratch))
    names = ["pooled", "tokens"] if case[1] != "optimum" else list(OPTIMUM_OUTPUTS[::-1])
    errs = {(n, against): OutputError(n) for n in ("pooled", "tokens") for against in ("hooked", "own_export")}
    offset = 0
    for x in batches:
        got = sess.run(names, {"pixel_values": x.numpy()})
        ref = torch_outputs(model, fam, x, recipe)
        own_out = own.run(["pooled", "tokens"], {"pixel_values": x.numpy()})
        for i, n in enumerate(("pooled", "tokens")):
            errs[(n, "hooked")].update(torch.from_numpy(got[i]), ref[i], offset)
            errs[(n, "own_export")].update(torch.from_numpy(got[i]), torch.from_numpy(own_out[i]), offset)
        offset += len(x)
    worst = {k: e.relative for k, e in errs.items()}
    assert max(v for (n, a), v in worst.items() if a == "own_export") <= TOL, worst
    if max(worst.values()) > TOL:
        # fp32 round-off in the activation's far tail (the register row of an image without outliers): the
        # float64 hooked reference judges, as exporters/onnx_export.py does: onnxruntime must be at least as
        # close to it as PyTorch's own float32 run is.
        exact = copy.deepcopy(model).double()
        onnx_err, torch_err = OutputError("tokens"), OutputError("tokens")
        for x in batches:
            want64 = torch_outputs(exact, fam, x.double(), recipe)[1]
            onnx_err.update(torch.from_numpy(sess.run(names[1:], {"pixel_values": x.numpy()})[0]), want64)
            torch_err.update(torch_outputs(model, fam, x, recipe)[1], want64)
        assert worst[("pooled", "hooked")] <= TOL, worst
        assert onnx_err.relative <= TOL + torch_err.relative, (worst, onnx_err.relative, torch_err.relative)


@pytest.mark.parametrize("case", FAST_CASES, ids=lambda c: "-".join(map(str, c)))
def test_onnx_round_trip_matches_pytorch(onnx_root, case):
    round_trip(onnx_root, case)


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CASES, ids=lambda c: "-".join(map(str, c)))
def test_onnx_round_trip_matrix(onnx_root, case):
    round_trip(onnx_root, case)


def test_per_neuron_two_registers_and_scale(onnx_root):
    round_trip(onnx_root, ("timm_clip", "dynamo", 18, None), {"mode": "per_neuron", "num_registers": 2, "scale": 0.5})


def test_recognition_names_blocks_activation_and_entry(onnx_root):
    src, _, _ = source_case(onnx_root, ("hf_clip", "dynamo", 17, "clip"))
    vit = recognise(src)
    d = vit.describe()
    assert d["blocks"] == 6 and d["mlp_hidden"] == [256] and d["activations"] == ["quick_gelu"]
    assert any("pre-norm" in n for n in vit.notes)  # HF CLIP's pre_layrnorm: the register enters before it
    src, _, _ = source_case(onnx_root, ("timm_clip", "dynamo", 18, None))
    assert recognise(src).describe()["activations"] == ["gelu"]


def test_external_data_is_written_and_kept(onnx_root, tmp_path):
    src, model, planting = source_case(onnx_root, ("timm_clip", "dynamo", 18, None))
    recipe = Recipe(neurons=planting.neurons)
    res = convert_onnx(src, tmp_path / "ext", recipe, external_data_threshold=0)
    assert res.external_data and (tmp_path / "ext" / "model.onnx.data").is_file()
    # a source with external data keeps it
    ext_src = tmp_path / "src" / "model.onnx"
    ext_src.parent.mkdir()
    onnx.save_model(onnx.load(str(src)), str(ext_src), save_as_external_data=True, location="model.onnx.data",
                    size_threshold=1024)
    assert (ext_src.parent / "model.onnx.data").stat().st_size > 100_000
    res2 = convert_onnx(ext_src, tmp_path / "ext2", recipe)
    assert res2.external_data and (tmp_path / "ext2" / "model.onnx.data").is_file()
    x = pixels_from(builtin_images(), adapter_for(model).data_transform(model), 2)
    a = ort.InferenceSession(str(res.out)).run(None, {"pixel_values": x.numpy()})
    b = ort.InferenceSession(str(res2.out)).run(None, {"pixel_values": x.numpy()})
    np.testing.assert_array_equal(a[1], b[1])
    report = check_onnx(res2.out, ext_src, [x[:1], x])
    assert report.passed


def _write_processor(folder: Path, size: int) -> None:
    from transformers import CLIPImageProcessor

    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, resample=3,
                       image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)


def test_cli_find_convert_check_on_the_onnx_alone(onnx_root, tmp_path, capsys):
    src, model, planting = source_case(onnx_root, ("timm_clip", "dynamo", 18, None))
    d = tmp_path / "repo"
    d.mkdir()
    (d / "model.onnx").write_bytes(src.read_bytes())
    _write_processor(d, 64)  # an HF ONNX repo ships its preprocessing this way
    images = builtin_images()
    assert main(["find", str(d / "model.onnx"), "--images", str(images), "--out", str(tmp_path / "n.json"), "-q"]) == 0
    doc = json.loads((tmp_path / "n.json").read_text())
    want = find_register_neurons(model, images, progress=False, adapter=adapter_for(model))
    assert doc["register_neurons"] == {str(k): list(v) for k, v in want.recipe.neurons.items()}
    assert doc["provenance"]["preprocess_from"].endswith("preprocessor_config.json")
    out = tmp_path / "out"
    assert main(["convert", str(d / "model.onnx"), "--neurons", str(tmp_path / "n.json"), "--out", str(out), "-q"]) == 0
    assert (out / "model.onnx").is_file() and (out / "preprocessor_config.json").is_file()
    assert main(["check", str(out / "model.onnx"), "--source", str(d / "model.onnx"), "--images", str(images),
                 "-q"]) == 0
    rep = json.loads((out / "parity.json").read_text())["onnx"]
    assert rep["passed"] and rep["batch_sizes"][:2] == [1, 3] and len(rep["batch_sizes"]) == 3
    capsys.readouterr()
    # existing OUT: exit 8, untouched
    before = (out / "model.onnx").read_bytes()
    assert main(["convert", str(d / "model.onnx"), "--neurons", str(tmp_path / "n.json"), "--out", str(out), "-q"]) == 8
    assert (out / "model.onnx").read_bytes() == before
    # a rewritten file whose recipe metadata was changed no longer matches the reference: exit 7
    m = onnx.load(str(out / "model.onnx"))
    for prop in m.metadata_props:
        if prop.key == "vit_surgery.recipe":
            doc = json.loads(prop.value)
            doc["scale"] = 2.0
            prop.value = json.dumps(doc)
    onnx.save(m, str(tmp_path / "tampered.onnx"))
    assert main(["check", str(tmp_path / "tampered.onnx"), "--source", str(d / "model.onnx"), "-q"]) == 7


def test_cli_convert_with_images_in_one_go(onnx_root, tmp_path, capsys):
    src, _, planting = source_case(onnx_root, ("hf_dinov2", "legacy", 18, "vit"))
    out = tmp_path / "o"
    assert main(["convert", str(src), "--images", str(builtin_images()), "--out", str(out), "-q"]) == 0
    meta = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    assert json.loads(meta["vit_surgery.recipe"])["register_neurons"] == {str(k): v for k, v in planting.neurons.items()}


def _one_line_exit(args, capsys) -> tuple[int, str]:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    errors = [ln for ln in err if "error" in ln]
    assert len(errors) == 1, err
    return code, errors[0]


def test_unrecognised_graphs_are_refused_naming_the_node(tmp_path, capsys):
    # a gated MLP whose gate is tanh (neither SiLU nor GELU): refused at the gated product
    from surgery.organisms.vit import build_timm_organism

    glu, _ = build_timm_organism(0, "swiglu")
    for blk in glu.blocks:
        blk.mlp.act = torch.nn.Tanh()
    path = export_source_onnx(glu, tmp_path / "tanh_glu" / "model.onnx")
    code, msg = _one_line_exit(["find", path, "--images", builtin_images(), "--out", tmp_path / "n.json"], capsys)
    assert code == 4 and "gate activation [Tanh]" in msg and "(Mul)" in msg, msg  # names the node and its op
    assert not (tmp_path / "n.json").exists()
    # not a ViT at all
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(4))
    conv(torch.zeros(1, 3, 16, 16))
    cnn = tmp_path / "cnn.onnx"
    torch.onnx.export(conv, (torch.zeros(2, 3, 16, 16),), str(cnn), dynamo=False, input_names=["x"])
    code, msg = _one_line_exit(["find", cnn, "--images", builtin_images(), "--out", tmp_path / "n2.json"], capsys)
    assert code == 4 and "no transformer MLP" in msg and "(Gemm)" in msg


def test_neurons_outside_the_graph_are_refused(onnx_root, tmp_path, capsys):
    src, _, _ = source_case(onnx_root, ("timm_clip", "dynamo", 18, None))
    (tmp_path / "n.json").write_text(json.dumps({"register_neurons": {"9": [1]}}))
    code, msg = _one_line_exit(["convert", src, "--neurons", tmp_path / "n.json", "--out", tmp_path / "o"], capsys)
    assert code == 5 and "block 9" in msg and not (tmp_path / "o").exists()
