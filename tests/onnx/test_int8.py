"""INT8 ONNX export: static (QDQ, calibrated) and dynamic, the register branch kept float,
validated against the float32 baked model before the file is moved in, refused (exit 7) otherwise.

Organism sizes only. Expectations come from the graph itself (which MatMuls carry the register units'
k-wide float weights, which nodes read DequantizeLinear outputs) and from onnxruntime run here against
the PyTorch baked model, not from the exporter's own report.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import surgery
from surgery.exporters import onnx_int8
from surgery.core.output_format import ONNX_DATA_FILE as DATA_FILE, ONNX_FILE
from surgery.exporters.onnx_metadata import read_onnx_metadata
from surgery.backends import load_model
from surgery.cli import main
from surgery.core.images import builtin_images

from tests.helpers import pixels_from, rel
from tests.helpers.client_envs import ORT_NODE_RUNNER, ORT_RUNNER, ORT_VERSIONS, ort_python, run_levels, transformers_js_dir


def cli(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def copy_baked(baked_dir: Path, dest: Path) -> Path:
    shutil.copytree(baked_dir, dest, ignore=shutil.ignore_patterns(ONNX_FILE, DATA_FILE, "model_int8.onnx",
                                                                   "model_quantized.onnx"))
    return dest


@pytest.fixture(scope="module")
def static_out(baked_dir, tmp_path_factory):
    d = copy_baked(baked_dir, tmp_path_factory.mktemp("int8") / "out")
    code = main(["export", str(d), "--int8", "--images", str(builtin_images()), "-q"])
    assert code == 0
    return d


@pytest.fixture(scope="module")
def dynamic_out(baked_dir, tmp_path_factory):
    d = copy_baked(baked_dir, tmp_path_factory.mktemp("int8dyn") / "out")
    assert main(["export", str(d), "--int8", "dynamic", "-q"]) == 0
    return d


def _cos(a, b) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(torch.as_tensor(a).double(), torch.as_tensor(b).double(), dim=-1)


def _outputs_vs_pytorch(path: Path, out_dir: Path, register: bool = False) -> tuple[torch.Tensor, ...]:
    """Per image: pooled cosine and mean patch-token cosine of the INT8 file against the PyTorch baked model
    (and with `register`, the register token's cosine: index 1, after CLS, in the timm organism)."""
    loaded = load_model(str(out_dir))
    x = pixels_from(builtin_images(), loaded.transform)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    pooled, tokens = sess.run(["pooled", "tokens"], {"pixel_values": x.numpy()})
    with torch.no_grad():
        ref_pooled, ref_tokens = loaded.adapter.forward_both(loaded.model, x)
    first = loaded.adapter.num_prefix_tokens(loaded.model)
    got = (_cos(pooled, ref_pooled), _cos(tokens[:, first:], ref_tokens[:, first:]).mean(dim=1))
    return got + (_cos(tokens[:, 1], ref_tokens[:, 1]),) if register else got


def _register_weight_shapes(out_dir: Path) -> set[tuple[int, int]]:
    """The (in, out) shapes of the register branch's projections, from the baked recipe: reg_fc1 is
    D x k and reg_fc2 k x D for the k register units of each split block."""
    recipe = json.loads((out_dir / "surgery.json").read_text())["recipe"]
    width = 64  # organism embed dim
    ks = {len(v) for v in recipe["register_neurons"].values()}
    return {(width, k) for k in ks} | {(k, width) for k in ks}


def _float_branch_matmuls(proto) -> list:
    """MatMuls whose weight is a float initializer of a register-branch shape (D x k or k x D)."""
    inits = {i.name: i for i in proto.graph.initializer}
    return [n for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in inits
            and inits[n.input[1]].data_type == onnx.TensorProto.FLOAT]


def test_static_export_passes_validation_and_records_what_stayed_float(static_out):
    path = static_out / "model_int8.onnx"
    assert path.is_file() and not list(static_out.glob(".onnx-int8-export-*"))
    onnx.checker.check_model(str(path))
    meta = read_onnx_metadata(path)
    q = json.loads(meta["int8"])
    assert meta["dtype"] == "int8" and meta["register_token_indices"] == [1]
    assert q["mode"] == "static" and q["format"] == "QDQ" and "per channel" in q["weights"]
    assert q["calibration_images"] == 18  # 24 built-in images, every 4th held out for validation
    kept = q["nodes_kept_float"]
    recipe = json.loads((static_out / "surgery.json").read_text())["recipe"]
    assert len(kept) == len(recipe["register_neurons"]) and all(kept.values())
    parity = json.loads((static_out / "parity.json").read_text())["onnx_int8"]["model_int8.onnx"]
    assert parity["passed"] and parity["images"] == 6
    assert parity["pooled_cosine"]["min"] >= onnx_int8.POOLED_COSINE_MIN
    assert parity["patch_token_cosine"]["min"] >= onnx_int8.PATCH_COSINE_MIN
    card = (static_out / "README.md").read_text()
    assert "## INT8 ONNX (`model_int8.onnx`)" in card and f"{parity['pooled_cosine']['min']:.4f}" in card


def test_static_int8_matches_the_pytorch_model_here(static_out):
    pooled, patches = _outputs_vs_pytorch(static_out / "model_int8.onnx", static_out)
    assert float(pooled.min()) >= 0.98 and float(patches.min()) >= 0.98  # the documented tolerance


def test_register_branch_stays_float_in_the_quantized_graph(static_out):
    proto = onnx.load(str(static_out / "model_int8.onnx"))
    kept = json.loads({p.key: p.value for p in proto.metadata_props}["vit_surgery.int8"])["nodes_kept_float"]
    names = {n.name: n for n in proto.graph.node}
    producer = {o: n for n in proto.graph.node for o in n.output}
    inits = {i.name: i for i in proto.graph.initializer}
    shapes = _register_weight_shapes(static_out)
    branch_mm = []
    for scope, nodes in kept.items():
        for name in nodes:
            node = names[name]  # present under its name
            for t in node.input:  # reads float tensors: no DequantizeLinear feeds the branch
                p = producer.get(t)
                assert p is None or p.op_type not in ("DequantizeLinear", "DynamicQuantizeLinear"), (name, t)
            if node.op_type == "MatMul":
                branch_mm.append(node)
        assert any(names[n].op_type == "ArgMax" for n in nodes), scope  # the signed-max edit
    # the branch projections are exactly the float MatMuls with register-unit shapes
    got = {tuple(inits[n.input[1]].dims) for n in branch_mm if n.input[1] in inits}
    assert got == shapes
    reg_shaped = [n for n in _float_branch_matmuls(proto) if tuple(inits[n.input[1]].dims) in shapes]
    assert {n.name for n in reg_shaped} == {n.name for n in branch_mm}
    # and the ordinary MLPs are quantized: their fc1/fc2 weights reach the MatMul through DequantizeLinear
    quantized = [n for n in proto.graph.node if n.op_type == "MatMul" and n.name not in {m.name for m in branch_mm}
                 and producer.get(n.input[1]) is not None and producer[n.input[1]].op_type == "DequantizeLinear"]
    assert len(quantized) >= 6 * 2  # six blocks' fc1 and fc2 at least


def test_static_int8_keeps_attention_probabilities_out_of_int8(static_out):
    """No QuantizeLinear reads a Softmax output, so no onnxruntime can fuse DequantizeLinear -> Softmax ->
    QuantizeLinear into QLinearSoftmax (whose int8 kernel before 1.32 wraps probabilities near 1, the
    register's sink attention, to 0: microsoft/onnxruntime#29727); the readers are named in the metadata."""
    proto = onnx.load(str(static_out / "model_int8.onnx"))
    softmax = [n for n in proto.graph.node if n.op_type == "Softmax"]
    assert len(softmax) == 6  # one per block of the organism
    probs = {n.output[0] for n in softmax}
    readers = [n for n in proto.graph.node if set(n.input) & probs]
    assert readers and not [n.name for n in readers if n.op_type == "QuantizeLinear"]
    assert {n.op_type for n in readers} == {"MatMul"}  # probabilities @ V, in float
    q = json.loads({p.key: p.value for p in proto.metadata_props}["vit_surgery.int8"])
    assert sorted(q["attention_probabilities_kept_float"]) == sorted(n.name for n in readers)
    assert "runtimes_not_supported" not in q


def test_static_int8_weights_cannot_saturate_the_uint8_int8_kernels(static_out):
    """x86 CPUs without VNNI multiply uint8 activations by int8 weights with VPMADDUBSW, which adds two
    products into an int16 and saturates at 32767: 255 * |w| * 2 must fit, so |w| <= 64. Every int8 weight
    of a quantized MatMul/Gemm/Conv stays inside that (and uses it: the largest is 64)."""
    from onnx import numpy_helper

    proto = onnx.load(str(static_out / "model_int8.onnx"))
    inits = {i.name: i for i in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    weights = []
    for n in proto.graph.node:
        if n.op_type in ("MatMul", "Gemm", "Conv") and len(n.input) > 1:
            dq = producer.get(n.input[1])
            if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in inits:
                weights.append(numpy_helper.to_array(inits[dq.input[0]]))
    assert len(weights) >= 6 * 4  # qkv, proj, fc1, fc2 of six blocks at least
    assert all(w.dtype == "int8" for w in weights)
    assert max(int(abs(w.astype(int)).max()) for w in weights) == 64
    assert all(255 * int(abs(w.astype(int)).max()) * 2 <= 32767 for w in weights)


def test_static_int8_gives_the_same_numbers_at_every_optimisation_level(static_out):
    """The integer kernels onnxruntime fuses at EXTENDED/ALL compute what the QDQ graph says (level
    DISABLE): every token within 1e-2 relative (a kernel that drops the sink's attention or saturates on
    the register row is 0.8-0.97 off there), and the register token close to the PyTorch model's."""
    loaded = load_model(str(static_out))
    x = pixels_from(builtin_images(), loaded.transform)
    runs = run_levels(static_out / "model_int8.onnx", x.numpy())
    for level, got in runs.items():
        assert rel(torch.from_numpy(got["tokens"]), torch.from_numpy(runs["disable"]["tokens"])) < 1e-2, level
    pooled, patches, register = _outputs_vs_pytorch(static_out / "model_int8.onnx", static_out, register=True)
    assert float(register.min()) >= 0.95, register.tolist()


def _int8_inputs(out_dir: Path, tmp: Path) -> tuple[Path, torch.Tensor]:
    loaded = load_model(str(out_dir))
    x = pixels_from(builtin_images(), loaded.transform)
    np.save(tmp / "x.npy", x.numpy())
    return tmp / "x.npy", x


@pytest.mark.slow
@pytest.mark.parametrize("version", ORT_VERSIONS)
def test_static_int8_in_every_onnxruntime_version(version, static_out, tmp_path):
    """onnxruntime `version` (a cached venv, tests/helpers/client_envs.py) at every optimisation level gives every
    token of the static INT8 file, the register token included, within 1e-2 relative of the installed
    onnxruntime's level ALL (before the fix 1.18-1.30 were 0.97 off on the register row at EXTENDED/ALL)."""
    py = ort_python(version)
    path = static_out / "model_int8.onnx"
    xin, x = _int8_inputs(static_out, tmp_path)
    want = torch.from_numpy(run_levels(path, x.numpy())["all"]["tokens"])
    job = [{"model": str(path), "input": str(xin), "output": str(tmp_path / "out.npz")}]
    done = subprocess.run([str(py), "-c", ORT_RUNNER, json.dumps(job)], capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == version
    got = np.load(tmp_path / "out.npz")
    for level in ("disable", "basic", "extended", "all"):
        tokens = torch.from_numpy(got[f"{level}/tokens"])
        assert rel(tokens[:, 1], want[:, 1]) < 1e-2, (version, level, "register")
        assert rel(tokens, want) < 1e-2, (version, level)


@pytest.mark.slow
def test_static_int8_in_transformers_js_onnxruntime_node(static_out, tmp_path):
    """The onnxruntime-node that transformers.js 4 bundles (default session options: optimisation "all")
    gives the static INT8 file's tokens, the register token included, within 1e-2 relative of the
    installed onnxruntime."""
    project = transformers_js_dir()
    path = static_out / "model_int8.onnx"
    _, x = _int8_inputs(static_out, tmp_path)
    (tmp_path / "x.bin").write_bytes(x.numpy().astype("<f4").tobytes())
    (project / "run_ort_node.mjs").write_text(ORT_NODE_RUNNER)
    done = subprocess.run(["node", "run_ort_node.mjs", str(path), str(tmp_path / "x.bin"), json.dumps(list(x.shape)),
                           str(tmp_path / "out.json")], cwd=project, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads((tmp_path / "out.json").read_text())["tokens"]
    tokens = torch.tensor(got["data"], dtype=torch.float32).reshape(got["dims"])
    want = torch.from_numpy(run_levels(path, x.numpy())["all"]["tokens"])
    assert rel(tokens[:, 1], want[:, 1]) < 1e-2 and rel(tokens, want) < 1e-2, done.stdout


def test_dynamic_export_passes_and_keeps_the_branch_float(dynamic_out):
    path = dynamic_out / "model_quantized.onnx"
    assert path.is_file()
    proto = onnx.load(str(path))
    ops = {n.op_type for n in proto.graph.node}
    assert "DynamicQuantizeLinear" in ops or "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    kept = json.loads({p.key: p.value for p in proto.metadata_props}["vit_surgery.int8"])
    assert kept["mode"] == "dynamic" and kept["calibration_images"] == 0
    inits = {i.name: i for i in proto.graph.initializer}
    shapes = _register_weight_shapes(dynamic_out)
    names = {n.name: n for n in proto.graph.node}
    float_reg = {tuple(inits[names[n].input[1]].dims) for ns in kept["nodes_kept_float"].values() for n in ns
                 if names[n].op_type == "MatMul" and names[n].input[1] in inits}
    assert float_reg == shapes
    pooled, patches = _outputs_vs_pytorch(path, dynamic_out)
    assert float(pooled.min()) >= 0.98 and float(patches.min()) >= 0.98  # the documented tolerance
    parity = json.loads((dynamic_out / "parity.json").read_text())["onnx_int8"]
    assert parity["model_quantized.onnx"]["passed"]
    assert parity["model_quantized.onnx"]["validation_images"] == "the built-in images"


def test_failed_validation_is_refused_with_exit_7_and_writes_nothing(baked_dir, tmp_path, capsys, monkeypatch):
    d = copy_baked(baked_dir, tmp_path / "out")
    before = sorted(p.name for p in d.iterdir())
    card = (d / "README.md").read_text()
    monkeypatch.setattr(onnx_int8, "POOLED_COSINE_MIN", 1.01)  # impossible: cosine <= 1
    code, out, err = cli(["export", d, "--int8", "dynamic", "-q"], capsys)
    assert code == 7
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "INT8 export failed validation" in lines[0] and "Traceback" not in err
    assert "pooled cosine" in lines[0] and "needed 1.01" in lines[0]
    assert sorted(p.name for p in d.iterdir()) == before  # no file, no scratch folder
    assert (d / "README.md").read_text() == card


@pytest.mark.parametrize("args,code,words", [
    (["--int8"], 2, "--images CALIB"),
    (["--int8", "static", "--fp16", "--images", "IMAGES"], 2, "exclusive"),
    (["--int8", "--format", "openvino", "--images", "IMAGES"], 12, "NNCF"),
    (["--images", "IMAGES"], 2, "--int8"),
    (["--int8", "weird"], 2, "invalid choice"),
])
def test_usage_errors(baked_dir, tmp_path, capsys, args, code, words):
    d = copy_baked(baked_dir, tmp_path / "out")
    args = [str(builtin_images()) if a == "IMAGES" else a for a in args]
    try:
        got, out, err = cli(["export", d, *args], capsys)
    except SystemExit as e:  # argparse choices
        got, err = e.code, capsys.readouterr().err
    assert got == code and words in err
    assert not (d / "model_int8.onnx").exists()


def test_existing_file_needs_overwrite(static_out, capsys):
    code, _, err = cli(["export", static_out, "--int8", "--images", builtin_images(), "-q"], capsys)
    assert code == 8 and "--overwrite" in err


def test_register_branch_found_in_both_exporters(baked_dir, tmp_path):
    """The branch is named by the dynamo exporter's scope records and by the legacy exporter's node paths."""
    from surgery.exporters.onnx_export import export_graph

    loaded = load_model(str(baked_dir))
    recipe = json.loads((baked_dir / "surgery.json").read_text())["recipe"]
    for exporter in ("dynamo", "legacy"):
        scratch = tmp_path / exporter
        scratch.mkdir()
        g = export_graph(loaded.model, loaded.adapter, scratch, exporter=exporter, progress=False)
        branch = onnx_int8.register_branch_nodes(g.proto)
        assert len(branch) == len(recipe["register_neurons"]), exporter
        ops = {n.op_type for n in g.proto.graph.node if n.name in {x for v in branch.values() for x in v}}
        assert {"MatMul", "ArgMax"} <= ops, (exporter, ops)


def test_quickgelu_branch_is_float32_and_kept_out_of_quantization(tmp_path):
    """A QuickGELU model's register branch is exported with its tail-accurate float32 activation (no
    float64 node, exporters/tail_accurate_activation.py); the quantizer keeps that branch float and the
    file still passes the INT8 validation."""
    from surgery.organisms.families import build_open_clip_organism, save_open_clip_organism

    model, planting = build_open_clip_organism(0, quick_gelu=True)
    src = save_open_clip_organism(model, tmp_path / "src")
    nf = tmp_path / "neurons.json"
    nf.write_text(json.dumps({"register_neurons": {str(k): v for k, v in planting.neurons.items()}}))
    out = surgery.convert(str(src), tmp_path / "out", neurons=nf).out
    loaded = load_model(str(out))
    report, path = onnx_int8.export_int8(out, loaded=loaded, mode="static", images=builtin_images(), progress=False)
    assert report.passed
    proto = onnx.load(str(path))
    doubles = [n for n in proto.graph.node if n.op_type == "Cast"
               and any(a.name == "to" and a.i == onnx.TensorProto.DOUBLE for a in n.attribute)]
    assert doubles == []
    kept = {x for v in json.loads({p.key: p.value for p in proto.metadata_props}["vit_surgery.int8"])
            ["nodes_kept_float"].values() for x in v}
    by_name = {n.name: n for n in proto.graph.node}
    assert kept and kept <= set(by_name)  # the branch's nodes are in the file, unquantized
    assert not any(by_name[k].op_type in ("QuantizeLinear", "DequantizeLinear") for k in kept)


def test_hf_layout_dynamic_int8(tmp_path, capsys):
    """--layout hf: onnx/model_quantized.onnx next to config.json, outputs by HF name, branch float."""
    from surgery.organisms.families import build_hf_dinov2_organism

    model, planting = build_hf_dinov2_organism(0)
    nf = tmp_path / "neurons.json"
    nf.write_text(json.dumps({"register_neurons": {str(k): v for k, v in planting.neurons.items()}}))
    out = surgery.convert(model, tmp_path / "out", neurons=nf).out
    code, stdout, err = cli(["export", out, "--format", "onnx", "--layout", "hf", "--int8", "dynamic", "-q"], capsys)
    assert code == 0, err
    path = out / "onnx" / "model_quantized.onnx"
    assert path.is_file() and not (out / "onnx" / "model.onnx").exists()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert {o.name for o in sess.get_outputs()} == {"last_hidden_state", "pooler_output"}
    loaded = load_model(str(out))
    x = pixels_from(builtin_images(), loaded.transform, 6)
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"pixel_values": x.numpy()})))
    with torch.no_grad():
        ref = loaded.model(pixel_values=x)
    first = loaded.adapter.num_prefix_tokens(loaded.model)
    assert float(_cos(got["pooler_output"], ref.pooler_output).min()) >= 0.98
    assert float(_cos(got["last_hidden_state"][:, first:], ref.last_hidden_state[:, first:]).mean(1).min()) >= 0.98
    proto = onnx.load(str(path))
    kept = json.loads({p.key: p.value for p in proto.metadata_props}["vit_surgery.int8"])["nodes_kept_float"]
    assert len(kept) == len(planting.neurons) and all(kept.values())


def test_int8_counts_only_the_images_it_could_read(baked_dir, tmp_path, capsys):
    """Unreadable files in CALIB are skipped (a warning), and neither the metadata's calibration count nor
    the validation text counts them."""
    from surgery.core.images import list_images
    from exporters.onnx_int8 import HELD_OUT_EVERY, split_images

    calib = tmp_path / "calib"
    shutil.copytree(builtin_images(), calib)
    bad = {calib / f"zz_bad{i}.png" for i in range(4)}  # sorted last: the last is held out, three calibrate
    for i, f in enumerate(sorted(bad)):
        f.write_bytes(b"" if i % 2 else b"not an image")
    files = list_images(calib)
    held = files[HELD_OUT_EVERY - 1::HELD_OUT_EVERY]  # the rule, written out: every 4th file is held out
    calibrated = [f for f in files if f not in held]
    assert (sorted(split_images(calib)[1]), sorted(split_images(calib)[0])) == (sorted(held), sorted(calibrated))
    assert bad & set(held) and bad & set(calibrated)
    out = copy_baked(baked_dir, tmp_path / "out")
    code, _, err = cli(["export", out, "--int8", "--images", calib, "-q"], capsys)
    assert code == 0, err
    assert "unreadable image(s)" in err
    q = json.loads(read_onnx_metadata(out / "model_int8.onnx")["int8"])
    assert q["calibration_images"] == len(set(calibrated) - bad)
    parity = json.loads((out / "parity.json").read_text())["onnx_int8"]["model_int8.onnx"]
    assert parity["images"] == len(set(held) - bad)
    assert parity["validation_images"] == f"{len(set(held) - bad)} image(s) of {calib} not calibrated on"
