"""Hostile ONNX files refused from a bounded scan of their protobuf, before onnx_ir parses them (exit 4, one
line): nested control flow, a `Constant` whose external data lies outside the folder, an initializer whose
dims declare 2^40 elements it does not hold. Each is planted in a real exported organism graph, so without the
scan the file would be parsed (and, for the tensors, read) first."""
from __future__ import annotations

import json
import os
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from surgery.cli import main
from surgery.core.images import builtin_images
from surgery.onnx_graph import prescan
from surgery.onnx_graph.prescan import MAX_SUBGRAPH_DEPTH, MAX_SUBGRAPHS, prescan_onnx


@pytest.fixture(scope="module")
def organism_onnx(tmp_path_factory) -> tuple[onnx.ModelProto, Path]:
    from surgery.organisms.onnx_graphs import build_organism, export_source_onnx

    model, planting = build_organism("timm_clip")
    root = tmp_path_factory.mktemp("prescan")
    path = export_source_onnx(model, root / "src" / "model.onnx", exporter="legacy", opset=17)
    neurons = root / "n.json"
    neurons.write_text(json.dumps({"register_neurons": {str(k): v for k, v in planting.neurons.items()}}))
    return onnx.load(str(path)), neurons


def _nested_if(depth: int, name: str = "n") -> onnx.NodeProto:
    """An If whose two branches each hold an If ... : `depth` levels of subgraphs (2^depth - 1 Ifs)."""
    def branch(level: int, tag: str) -> onnx.GraphProto:
        out = helper.make_tensor_value_info(f"{name}_{tag}_o", TensorProto.FLOAT, [1])
        if level == 1:
            body = helper.make_node("Constant", [], [out.name], value_floats=[0.0])
        else:
            body = _nested_if_node(level - 1, tag, out.name)
        return helper.make_graph([body], f"{name}_{tag}", [], [out])

    def _nested_if_node(level: int, tag: str, output: str) -> onnx.NodeProto:
        return helper.make_node("If", [f"{name}_cond"], [output], then_branch=branch(level, tag + "t"),
                                else_branch=branch(level, tag + "e"))

    return _nested_if_node(depth, "", f"{name}_out")


def _depth(graph: onnx.GraphProto) -> int:
    """Subgraph nesting of `graph`, counted straight from the proto (the reference the scan must agree with)."""
    inner = [_depth(a.g) for n in graph.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]
    return 1 + max(inner, default=0)


def _write(proto: onnx.ModelProto, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    path.write_bytes(proto.SerializeToString())  # as is: onnx.save would not check it either
    return path


def _convert(path: Path, neurons: Path, out: Path, capsys, monkeypatch) -> tuple[int, str]:
    import onnx_ir

    def never(*a, **k):
        raise AssertionError("onnx_ir.load reached: the file was parsed before it was refused")

    monkeypatch.setattr(onnx_ir, "load", never)
    code = main(["convert", str(path), "--neurons", str(neurons), "--out", str(out), "-q"])
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and "internal error" not in err, err
    assert not out.exists()
    return code, err


def test_nested_control_flow_is_refused_before_the_graph_is_parsed(organism_onnx, tmp_path, capsys, monkeypatch):
    proto, neurons = organism_onnx
    hostile = onnx.ModelProto.FromString(proto.SerializeToString())
    hostile.graph.node.append(_nested_if(MAX_SUBGRAPH_DEPTH + 1))
    assert _depth(hostile.graph) - 1 == MAX_SUBGRAPH_DEPTH + 1  # subgraph levels below the main graph
    code, err = _convert(_write(hostile, tmp_path / "deep"), neurons, tmp_path / "out", capsys, monkeypatch)
    assert code == 4, err
    assert f"subgraphs nested more than {MAX_SUBGRAPH_DEPTH} deep" in err and "before the graph is parsed" in err


def test_the_nesting_rule_is_a_depth_and_a_count_not_a_file_size(tmp_path, monkeypatch):
    """At the depth limit a file passes the scan (recognise() then refuses its control flow by name); one level
    more is refused however small the file; so is a flat graph of more subgraphs than the count limit."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    cond = helper.make_tensor_value_info("n_cond", TensorProto.BOOL, [])
    for depth, refused in ((MAX_SUBGRAPH_DEPTH, False), (MAX_SUBGRAPH_DEPTH + 1, True)):
        graph = helper.make_graph([_nested_if(depth)], "g", [x, cond], [x])
        path = _write(helper.make_model(graph), tmp_path / str(depth))
        assert _depth(graph) - 1 == depth
        if refused:
            with pytest.raises(Exception, match="nested more than"):
                prescan_onnx(path)
        else:
            prescan_onnx(path)
    monkeypatch.setattr(prescan, "MAX_SUBGRAPHS", 6)
    flat = helper.make_graph([_nested_if(1, f"i{k}") for k in range(3)] +
                             [helper.make_node("Identity", ["x"], ["y"])], "g", [x, cond], [x])
    prescan_onnx(_write(helper.make_model(flat), tmp_path / "six"))  # 3 Ifs x 2 branches = 6 subgraphs
    flat.node.append(_nested_if(1, "i3"))
    with pytest.raises(Exception, match="more than 6 subgraphs"):
        prescan_onnx(_write(helper.make_model(flat), tmp_path / "eight"))
    assert MAX_SUBGRAPHS >= 1024  # the real limit leaves room for a merged decoder's If branches


def test_a_constant_with_external_data_outside_the_folder_is_refused_unopened(organism_onnx, tmp_path, capsys,
                                                                               monkeypatch):
    if not hasattr(os, "mkfifo"):
        pytest.skip("needs FIFOs")
    proto, neurons = organism_onnx
    hostile = onnx.ModelProto.FromString(proto.SerializeToString())
    value = TensorProto(name="stolen", data_type=TensorProto.FLOAT, dims=[4], data_location=TensorProto.EXTERNAL)
    value.external_data.add(key="location", value="../secret")
    hostile.graph.node.insert(0, helper.make_node("Constant", [], ["stolen"], value=value))
    os.mkfifo(tmp_path / "secret")  # opening it would block: a finished run proves it was never opened
    code, err = _convert(_write(hostile, tmp_path / "m"), neurons, tmp_path / "out", capsys, monkeypatch)
    assert code == 4, err
    assert "tensor stolen points at external data '../secret' outside the model's folder" in err


@pytest.mark.parametrize("where", ["initializer", "constant"])
def test_a_tensor_declaring_2_40_elements_it_does_not_hold_is_refused_before_allocation(
        organism_onnx, tmp_path, capsys, monkeypatch, where):
    proto, neurons = organism_onnx
    hostile = onnx.ModelProto.FromString(proto.SerializeToString())
    huge = TensorProto(name="huge", data_type=TensorProto.FLOAT, dims=[2**20, 2**20], raw_data=b"\0" * 16)
    if where == "initializer":
        hostile.graph.initializer.append(huge)
    else:
        hostile.graph.node.insert(0, helper.make_node("Constant", [], ["huge"], value=huge))
    code, err = _convert(_write(hostile, tmp_path / "m"), neurons, tmp_path / "out", capsys, monkeypatch)
    assert code == 4, err
    assert f"tensor huge declares {2**40} elements (dims [1048576, 1048576]) but holds data for 4" in err


def test_the_scan_passes_the_untouched_organism(organism_onnx, tmp_path):
    proto, _ = organism_onnx
    prescan_onnx(_write(proto, tmp_path / "ok"))


def test_a_vision_encoder_that_fails_in_onnxruntime_at_another_batch_size_is_exit_4(tmp_path, capsys):
    """A vision_encoder.onnx that runs at batch 1 only (its output reshaped to a fixed batch of 1): convert
    runs it at batch 2 to count its tokens; onnxruntime's failure is the model's (exit 4, one line naming the
    batch), not an internal error."""
    import numpy as np
    import onnxruntime as ort

    from surgery.organisms.onnx_graphs import export_vision_encoder_source
    from surgery.organisms.vlm import build_llava_organism

    vlm, planting = build_llava_organism(0, strategy="default", feature_layer=-2, text_hidden_size=48)
    src = export_vision_encoder_source(vlm, tmp_path / "src" / "vision_encoder.onnx", exporter="legacy")
    proto = onnx.load(str(src))
    sess = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    shape = sess.get_inputs()[0].shape
    features = sess.run(["image_features"], {sess.get_inputs()[0].name: np.zeros([1, *shape[1:]], np.float32)})[0]
    out = proto.graph.output[0]
    assert out.name == "image_features"
    out.name = "features_any_batch"
    for node in proto.graph.node:
        node.output[:] = ["features_any_batch" if o == "image_features" else o for o in node.output]
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.array(features.shape, np.int64), "batch_of_one"))
    proto.graph.node.append(helper.make_node("Reshape", ["features_any_batch", "batch_of_one"], ["image_features"]))
    proto.graph.output.append(helper.make_tensor_value_info("image_features", TensorProto.FLOAT, None))
    del proto.graph.output[0]
    path = _write(proto, tmp_path / "one")
    neurons = tmp_path / "n.json"
    neurons.write_text(json.dumps({"register_neurons": {str(k): v for k, v in planting.neurons.items()}}))
    capsys.readouterr()
    code = main(["convert", str(path), "--neurons", str(neurons), "--out", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 4, err
    warning, err = err.splitlines()  # the warning that no preprocessor_config.json is there, then the error
    assert warning.startswith("vit-surgery: warning:") and err.startswith("vit-surgery: error:")
    assert "internal error" not in err and "Traceback" not in capsys.readouterr().err
    assert "onnxruntime cannot run it on a batch of 2 image(s) of [3, 64, 64] (Reshape node: " in err
    assert "requested shape:{1," in err
    assert not (tmp_path / "out").exists()


def test_onnx_ir_warnings_stay_off_stderr_in_a_normal_run(organism_onnx, tmp_path):
    """An unnamed initializer makes onnx_ir log a warning while parsing (it drops the tensor, which nothing
    reads): a normal run keeps its stderr to vit-surgery's own lines; -v shows the library's warnings."""
    import subprocess
    import sys

    proto, neurons = organism_onnx
    odd = onnx.ModelProto.FromString(proto.SerializeToString())
    odd.graph.initializer.append(TensorProto(data_type=TensorProto.FLOAT, dims=[1], float_data=[0.0]))
    path = _write(odd, tmp_path / "m")
    for verbose, shown in (([], False), (["-v"], True)):
        out = tmp_path / f"n{len(verbose)}.json"
        proc = subprocess.run([sys.executable, "-m", "surgery.cli", "find", str(path), "--out", str(out), "--images", str(builtin_images()),
                               "--num-images", "4", *verbose], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert ("Initializer tensor must have a name" in proc.stderr) is shown, proc.stderr
