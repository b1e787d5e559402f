"""User errors around sources: NaN/Inf weights, a --source that is not OUT's source, a head mismatch.
Each is one line on stderr with its documented exit code, never an internal error."""
from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file, save_file

from surgery.cli import main
from surgery.demo import save_organism
from surgery.organisms.vit import build_timm_organism


def run(args, capsys) -> tuple[int, str]:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    return code, err


def _edit_surgery_json(out, drop: str) -> None:
    doc = json.loads((out / "surgery.json").read_text())
    doc.pop(drop)
    (out / "surgery.json").write_text(json.dumps(doc))


def _one_line(err: str) -> None:
    assert "\n" not in err
    assert "internal error" not in err and "Traceback" not in err


def test_nan_weights_are_refused(organism_dir, tmp_path, capsys):
    import shutil

    bad = tmp_path / "nan"
    shutil.copytree(organism_dir, bad)
    sd = load_file(str(bad / "model.safetensors"))
    sd["blocks.1.mlp.fc1.weight"][3, 5] = float("nan")
    save_file(sd, str(bad / "model.safetensors"))
    nf = tmp_path / "n.json"
    nf.write_text(json.dumps({"register_neurons": {"2": [17]}}))
    code, err = run(["convert", bad, "--neurons", nf, "--out", tmp_path / "out", "-q"], capsys)
    assert code == 4
    _one_line(err)
    assert "NaN" in err and "blocks.1.mlp.fc1.weight" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("other", ["head", "depth"])
def test_check_against_another_source_is_a_user_error(baked_dir, tmp_path, capsys, other):
    """Without a recorded source identity (older outputs), a structurally different --source is exit 7;
    with one, tests/safety/test_safety.py shows it is refused as not OUT's source (exit 11) before any forward."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(baked_dir, out)
    _edit_surgery_json(out, "source_identity")
    model, _ = build_timm_organism(1, "clip", num_classes=7) if other == "head" else (None, None)
    if other == "depth":
        import timm

        src = build_timm_organism(0, "clip")[0].organism_source
        args = dict(src["model_args"], depth=4)
        model = timm.create_model(src["architecture"], pretrained=False, pretrained_cfg_overlay=src["pretrained_cfg"],
                                  **args)
        model.organism_source = dict(src, model_args=args)
    folder = save_organism(model, tmp_path / "other")
    code, err = run(["check", out, "--source", folder, "-q", "--num-images", "2", "--report", tmp_path / "p.json"],
                    capsys)
    assert code == 7
    _one_line(err)
    assert ("shape" in err and "(2, 7)" in err) if other == "head" else "blocks 4" in err


def test_output_with_another_head_is_a_user_error(organism_dir, tmp_path, capsys):
    """The baked folder's weights edited to a different head size than its config: refused on load."""
    import shutil

    nf = tmp_path / "n.json"
    nf.write_text(json.dumps({"register_neurons": {"2": [17]}}))
    out = tmp_path / "out"
    assert main(["convert", str(organism_dir), "--neurons", str(nf), "--out", str(out), "-q"]) == 0
    capsys.readouterr()
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    sd = load_file(str(broken / "model.safetensors"))
    sd["head.weight"], sd["head.bias"] = sd["head.weight"][:5], sd["head.bias"][:5]
    save_file(sd, str(broken / "model.safetensors"))
    _edit_surgery_json(broken, "integrity")  # else the hash check refuses it first (exit 11, tests/safety/test_safety.py)
    code, err = run(["check", broken, "-q", "--num-images", "2"], capsys)
    assert code == 4
    warning, err = err.split("\n", 1)
    assert "no integrity record" in warning
    _one_line(err)
    assert "do not match" in err and "head.weight" in err


@pytest.mark.parametrize("kind", ["empty", "fifo", "garbage", "fifo_in_folder"])
@pytest.mark.parametrize("command", ["find", "convert"])
def test_an_onnx_input_that_is_no_onnx_file_is_refused_saying_what_it_is(tmp_path, calib_dir, capsys, kind, command):
    """An empty file parses as an empty graph and a FIFO would block the reader: each is named for what it
    is (exit 4), nothing is written."""
    import os

    if "fifo" in kind and not hasattr(os, "mkfifo"):
        pytest.skip("needs FIFOs")
    model = tmp_path / "model.onnx"
    expect = {"empty": "empty file, not an ONNX model", "garbage": "not a readable ONNX model",
              "fifo": "not a regular file (a FIFO", "fifo_in_folder": "is a special file (FIFO"}[kind]
    if kind == "empty":
        model.write_bytes(b"")
    elif kind == "garbage":
        model.write_bytes(b"\x08\x07 not a protobuf")
    else:
        if kind == "fifo_in_folder":
            (tmp_path / "repo" / "onnx").mkdir(parents=True)
            model = tmp_path / "repo" / "onnx" / "model.onnx"
        os.mkfifo(model)
    arg = tmp_path / "repo" if kind == "fifo_in_folder" else model
    out = tmp_path / ("n.json" if command == "find" else "out")
    tail = ["--out", out]
    code, err = run([command, arg, "--images", calib_dir, *tail], capsys)
    assert code == 4, err
    _one_line(err)
    assert expect in err
    assert not out.exists()
