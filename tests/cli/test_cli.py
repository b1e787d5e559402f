"""CLI: each command, its files, and one-line errors with documented exit codes."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import timm
import torch

from surgery.core.safetensors_io import read_metadata
from surgery.cli import main
from surgery.core.images import builtin_images

from tests.helpers import CLI, cli as run, offline_env
from surgery.organisms.families import write_fake_hub_repo


def test_find_writes_neurons_json(organism_dir, calib_dir, tmp_path, capsys, timm_organism):
    out = tmp_path / "neurons.json"
    code, stdout, err = run(["find", organism_dir, "--images", calib_dir, "--out", out], capsys)
    assert code == 0, err
    doc = json.loads(out.read_text())
    assert doc["register_neurons"] == {str(k): v for k, v in timm_organism[1].neurons.items()}
    assert doc["threshold"]["mode"] == "auto" and doc["detect_layer"] == 5
    assert doc["outliers"]["images_with_outliers"] == 18 and doc["outliers"]["images"] == 24
    assert len(doc["layer_norms"]) == 6 and doc["scores"][0]["score"] > doc["scores"][3]["score"]
    assert doc["provenance"]["model"] == str(organism_dir) and len(doc["provenance"]["image_files"]) == 24
    assert "found 3 register neuron(s)" in stdout
    code, _, err = run(["find", organism_dir, "--images", calib_dir, "--out", out, "-q"], capsys)
    assert code == 8 and "--overwrite" in err


def test_convert_with_neurons_then_check(organism_dir, tmp_path, capsys, timm_organism, monkeypatch):
    neurons = tmp_path / "n.json"
    neurons.write_text(json.dumps({"register_neurons": {"2": [17, 101], "3": [42]}}))
    out = tmp_path / "out"
    code, stdout, err = run(["convert", organism_dir, "--neurons", neurons, "--out", out, "-q"], capsys)
    assert code == 0, err
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "surgery.json", "parity.json", "README.md"}
    parity = json.loads((out / "parity.json").read_text())
    assert parity["parity"]["passed"] and parity["parity"]["worst"]["error_over_allowed"] <= 1.0
    assert parity["effect"]["after"]["outlier_share"] == 0.0
    meta = read_metadata(out / "model.safetensors")
    assert meta["recipe"]["register_neurons"] == {"2": [17, 101], "3": [42]}
    assert meta["source_model"] == str(organism_dir) and meta["tool_version"]
    assert json.loads((out / "surgery.json").read_text())["token_layout"]["register_indices"] == [1]
    code, stdout, err = run(["check", out, "--report", tmp_path / "p.json"], capsys)
    assert code == 0, err
    assert "parity PASS" in stdout
    code, stdout, err = run(["check", out, "-q", "--source", organism_dir, "--report", tmp_path / "p2.json"], capsys)
    assert code == 0, err
    # the tolerance is a floor: a correct float32 bake is never held to less than what float32 kernels
    # do to the hooked reference itself on this machine (judge.kernel_allowance)
    code, stdout, err = run(["check", out, "--tolerance", "1e-12", "--report", tmp_path / "p3.json"], capsys)
    assert code == 0 and "parity PASS" in stdout and "x the error the hooked reference itself makes" in stdout, err
    # without that term, the same bake fails at 1e-12: the FAIL line says the reference's own error
    # and names --tolerance
    # without --tolerance, check judges with the tolerance convert recorded in OUT/parity.json
    doc = json.loads((out / "parity.json").read_text())
    doc["parity"]["tolerance"] = 2e-5
    (out / "parity.json").write_text(json.dumps(doc))
    code, stdout, err = run(["check", out, "--report", tmp_path / "p5.json"], capsys)
    assert code == 0 and "tolerance 2e-05, as recorded in out/parity.json" in stdout, err
    assert json.loads((tmp_path / "p5.json").read_text())["parity"]["tolerance"] == 2e-5
    monkeypatch.setattr("surgery.core.judge.KERNEL_FACTOR", 0.0)
    code, stdout, err = run(["check", out, "-q", "--tolerance", "1e-12", "--report", tmp_path / "p4.json"], capsys)
    assert code == 7 and "parity FAIL" in err, err
    assert "the hooked reference itself in float32 is off by" in err and "--tolerance" in err


def test_baked_folder_is_a_timm_local_dir(baked_dir, calib_dir):
    import surgery  # noqa: F401

    model = timm.create_model(f"local-dir:{baked_dir}", pretrained=True).eval()
    assert model.num_prefix_tokens == 2 and type(model).__name__ == "VisionTransformer"
    x = torch.randn(2, 3, 64, 64)
    assert model.forward_features(x).shape == (2, 66, 64)


def test_plain_timm_refuses_a_baked_folder(baked_dir):
    code = f"import timm; timm.create_model('local-dir:{baked_dir}', pretrained=True)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0 and "Unknown model (vit_surgery_baked)" in proc.stderr


def test_hf_hub_name_through_a_fake_offline_cache(organism_dir, tmp_path):
    cache = tmp_path / "hub"
    write_fake_hub_repo(cache, "vit-surgery/organism-clip", {
        "config.json": organism_dir / "config.json", "model.safetensors": organism_dir / "model.safetensors"})
    out = tmp_path / "out"
    proc = subprocess.run(CLI + ["convert", "hf-hub:vit-surgery/organism-clip", "--images", str(builtin_images()),
                                 "--out", str(out)], capture_output=True, text=True, env=offline_env(cache))
    assert proc.returncode == 0, proc.stderr
    assert "parity PASS" in proc.stdout
    surgery_doc = json.loads((out / "surgery.json").read_text())
    assert surgery_doc["source_model"] == "hf-hub:vit-surgery/organism-clip"
    assert surgery_doc["recipe"]["register_neurons"] == {"2": [17, 101], "3": [42]}
    proc = subprocess.run(CLI + ["find", "hf-hub:vit-surgery/missing", "--images", str(builtin_images()),
                                 "--out", str(tmp_path / "n.json")], capture_output=True, text=True,
                          env=offline_env(cache))
    assert proc.returncode == 4 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


@pytest.mark.parametrize("args, code, words", [
    (["find", "{model}", "--images", "{tmp}/nope", "--out", "{tmp}/n.json"], 3, "image folder not found"),
    (["find", "{model}", "--images", "{tmp}/empty", "--out", "{tmp}/n.json"], 3, "no image files"),
    (["find", "no_such_model_xyz", "--images", "{calib}", "--out", "{tmp}/n.json"], 4, "unknown model"),
    (["find", "{tmp}/nothere/model", "--images", "{calib}", "--out", "{tmp}/n.json"], 4, "not found"),
    (["convert", "{model}", "--neurons", "{tmp}/bad.json", "--out", "{tmp}/o"], 5, "not valid JSON"),
    (["convert", "{model}", "--neurons", "{tmp}/range.json", "--out", "{tmp}/o"], 5, "out of range"),
    (["convert", "{model}", "--neurons", "{tmp}/block.json", "--out", "{tmp}/o"], 5, "does not exist"),
    (["convert", "{model}", "--neurons", "{tmp}/missing.json", "--out", "{tmp}/o"], 5, "not found"),
    (["find", "{model}", "--images", "{calib}", "--out", "{tmp}/n.json", "--threshold", "1e6"], 6, "no outlier tokens"),
    (["check", "{model}"], 4, "carries no baked"),
])
def test_clear_errors(args, code, words, organism_dir, calib_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "range.json").write_text(json.dumps({"register_neurons": {"2": [9999]}}))
    (tmp_path / "block.json").write_text(json.dumps({"register_neurons": {"40": [1]}}))
    fmt = {"model": organism_dir, "tmp": tmp_path, "calib": calib_dir}
    got, out, err = run([a.format(**fmt) for a in args], capsys)
    assert got == code, err
    assert words in err
    assert err.startswith("vit-surgery: error:") and err.count("\n") == 1
    assert not (tmp_path / "o").exists() and not (tmp_path / "n.json").exists()


def test_no_outliers_error_suggests_a_threshold(organism_dir, calib_dir, tmp_path, capsys):
    code, _, err = run(["find", organism_dir, "--images", calib_dir, "--out", tmp_path / "n.json",
                        "--threshold", "5000"], capsys)
    assert code == 6
    assert "median" in err and "p99" in err and "try --threshold" in err


def test_bad_arguments_exit_2(organism_dir, calib_dir, tmp_path, capsys):
    for bad in (["--threshold", "-3"], ["--top-k", "0"], ["--batch-size", "zero"], ["--threshold", "nan"]):
        with pytest.raises(SystemExit) as e:
            main(["find", str(organism_dir), "--images", str(calib_dir), "--out", str(tmp_path / "n.json"), *bad])
        assert e.value.code == 2
    capsys.readouterr()


def test_convert_warns_when_outliers_remain(organism_dir, tmp_path, capsys):
    neurons = tmp_path / "n.json"
    neurons.write_text(json.dumps({"register_neurons": {"3": [42]}}))  # misses the dark-patch units of block 2
    code, stdout, err = run(["convert", organism_dir, "--neurons", neurons, "--out", tmp_path / "o", "-q"], capsys)
    assert code == 0, err
    assert "still outliers after baking" in err
