"""What a user meets on a first real model: evidence said aloud, one-line errors, progress, honest model
cards and metadata, and a Python API that takes what the CLI takes (ONNX included)."""
from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch

import surgery
from surgery.core.discovery import DiscoveryResult, select_top_k
from surgery.core.recipe import Recipe


def _result(cut_rule: str, images: int, with_outliers: int) -> DiscoveryResult:
    return DiscoveryResult(recipe=Recipe({2: [17, 101]}), ranking=[], cut=2, cut_rule=cut_rule, threshold={},
                           detect_layer=5, max_layer=3, layers=[],
                           counts={"images": images, "images_with_outliers": with_outliers})


def test_find_summary_says_when_it_fell_back_to_top_n_and_when_evidence_is_thin():
    k, rule = select_top_k([1.0] * 20, "auto")  # flat scores: no cut-off
    line = _result(rule, 2, 2).summary()
    assert "no clear cut-off" in line and f"top {k}" in line, line
    assert "thin evidence: only 2 calibration image(s)" in line, line
    k, rule = select_top_k([50.0, 48.0, 1.0, 0.9, 0.8], "auto")  # a clear gap after two units
    line = _result(rule, 32, 30).summary()
    assert k == 2 and "WARNING" not in line, line
    assert "only 3 of 32 image(s) had outlier tokens" in _result(rule, 32, 3).summary()


@pytest.mark.parametrize("typo, meant", [("open-clip:ViT-B-16/x", "open_clip:"), ("hf_hub:org/name", "hf-hub:")])
def test_a_prefix_typo_lists_the_valid_prefixes(typo, meant, tmp_path, capsys, calib_dir):
    from surgery.cli.main import main

    code = main(["find", typo, "--images", str(calib_dir), "--out", str(tmp_path / "n.json"), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 4 and len(err) == 1, err
    assert f"did you mean {meant!r}" in err[0] and "valid prefixes: open_clip:, hf:, hf-hub:, local-dir:, dinov2:" in err[0]


def test_an_unreachable_hub_is_one_line(tmp_path, calib_dir):
    """No network here: huggingface_hub retries five times; none of its retry lines reach the user."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path), "HF_HUB_CACHE": str(tmp_path / "hub"),
           "HF_HUB_DISABLE_TELEMETRY": "1", "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "surgery.cli", "find", "hf-hub:timm/vit_tiny_patch16_224.augreg_in21k",
                           "--images", str(calib_dir), "--out", str(tmp_path / "n.json"), "-q"],
                          capture_output=True, text=True, env=env, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 4 and len(lines) == 1 and "could not get the pretrained weights" in lines[0], proc.stderr


def test_progress_is_logging_by_default_callbacks_on_request_and_lines_off_a_terminal(capsys, caplog):
    from surgery.core import progress

    seen = []
    with caplog.at_level(logging.INFO, logger="surgery"):
        with progress.reporting(progress.for_api(lambda *a: seen.append(a))):
            for _ in progress.iterate([1, 2, 3], "float64 check", unit="image"):
                pass
    assert seen == [("float64 check", 0, 3), ("float64 check", 1, 3), ("float64 check", 2, 3), ("float64 check", 3, 3)]
    assert "float64 check (3 images)" in caplog.text and capsys.readouterr().err == ""  # the API prints nothing
    with progress.reporting(progress.Progress("auto")):  # pytest's stderr is no terminal: one line
        with progress.stage("writing timm weights"):
            pass
    err = capsys.readouterr().err
    assert err.startswith("vit-surgery: writing timm weights: done in ") and err.count("\n") == 1, err
    with pytest.raises(RuntimeError), progress.reporting(progress.Progress("auto")):
        with progress.stage("loading x"):
            raise RuntimeError("a failed stage prints nothing: its error is the one line")
    assert capsys.readouterr().err == ""
    with progress.reporting(progress.Progress("log")):  # -q
        with progress.stage("writing timm weights"):
            progress.say("said")
    assert capsys.readouterr().err == ""


def test_the_cli_prints_one_line_per_finished_stage_off_a_terminal(organism_dir, calib_dir, tmp_path, capsys,
                                                                  monkeypatch):
    from surgery.cli.main import main

    monkeypatch.setenv("VIT_SURGERY_PROGRESS", "lines")
    assert main(["find", str(organism_dir), "--images", str(calib_dir), "--out", str(tmp_path / "n.json")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert [line.split(":")[1].strip() for line in err] == [f"loading {organism_dir}", "calibrating (24 images)"], err
    assert all(" done in " in line for line in err)
    assert main(["find", str(organism_dir), "--images", str(calib_dir), "--out", str(tmp_path / "m.json"), "-q"]) == 0
    assert capsys.readouterr().err == ""


def test_api_verbs_take_what_the_cli_takes_onnx_included(tmp_path, calib_dir):
    """surgery.find / convert / check on an .onnx file, and bake in memory."""
    from transformers import CLIPImageProcessor

    from surgery.organisms.onnx_graphs import build_organism, export_source_onnx

    model, _ = build_organism("timm_clip")
    src = export_source_onnx(model, tmp_path / "src" / "model.onnx")
    CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}, resample=3,
                       image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(src.parent)
    found = surgery.find(str(src), calib_dir, out=tmp_path / "n.json")
    assert json.loads((tmp_path / "n.json").read_text())["register_neurons"] == {
        str(k): list(v) for k, v in found.recipe.neurons.items()}
    res = surgery.convert(str(src), tmp_path / "out", neurons=str(tmp_path / "n.json"))
    assert res.passed and (tmp_path / "out" / "model.onnx").is_file()
    checked = surgery.check(tmp_path / "out" / "model.onnx", source=str(src))
    assert checked.passed, checked.summary_lines()
    with pytest.raises(surgery.SurgeryError, match="apply to PyTorch models"):
        surgery.convert(str(src), tmp_path / "o2", neurons=str(tmp_path / "n.json"), to="timm")


def test_bake_in_memory_returns_the_fixed_model(timm_organism, calib_dir):
    from surgery.backends import adapter_for
    from surgery.core.reference import hooked_reference

    model, planting = timm_organism
    before = {k: v.clone() for k, v in model.state_dict().items()}
    baked = surgery.bake(model, planting.neurons)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the input is left as it is
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        with hooked_reference(model, Recipe(planting.neurons), adapter=adapter_for(model)):
            want = model.forward_features(x)
        got = baked.forward_features(x)
    assert baked.num_prefix_tokens == model.num_prefix_tokens + 1
    rel = (got[:, [0] + list(range(2, got.shape[1]))] - want[:, [0] + list(range(2, want.shape[1]))]).norm() / want.norm()
    assert float(rel) < 1e-5
    found = surgery.bake(model, images=calib_dir)  # neurons found on the images first
    assert found.surgery_recipe.neurons == Recipe(planting.neurons).neurons


def test_to_timm_of_a_local_open_clip_folder_claims_no_hub_origin(tmp_path):
    from huggingface_hub import ModelCard

    import surgery.organisms.families as fams

    clip, planting = fams.build_open_clip_organism(0)
    src = fams.save_open_clip_organism(clip, tmp_path / "oc")
    out = tmp_path / "out"
    surgery.convert(str(src), out, neurons=_neurons_file(tmp_path, planting), to="timm", check=False)
    card = ModelCard.load(out / "README.md").data.to_dict()
    config = json.loads((out / "config.json").read_text())
    assert card.get("base_model") is None, card
    assert "hf_hub_id" not in config.get("pretrained_cfg", {}), config


def _neurons_file(tmp_path, planting) -> str:
    path = tmp_path / "n.json"
    path.write_text(json.dumps({"register_neurons": {str(k): v for k, v in planting.neurons.items()}}))
    return str(path)
