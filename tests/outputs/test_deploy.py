"""Deploy as-is: an instant CLI, hub-ready model cards, the HF ONNX layout, OpenVINO, the one-call API,
and clear refusals. References are computed here from the libraries themselves (timm, transformers,
openvino, onnxruntime, huggingface_hub's card parser) and the hooked reference, not from the exporters."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch

import surgery
from surgery.backends import adapter_for
from surgery.organisms.vit import build_timm_organism
from surgery.core.images import builtin_images
from surgery.organisms.families import build_hf_clip_organism, build_hf_dinov2_organism, save_hf_organism

from tests.helpers import cli, pixels_from, rel
from surgery.organisms.families import write_fake_hub_repo

HEAVY = ("torch", "timm", "transformers", "open_clip", "onnx", "onnxruntime", "openvino", "matplotlib", "numpy")


# ---- (1) an instant CLI --------------------------------------------------------------------------

@pytest.mark.parametrize("args,code", [(["--help"], 0), (["--version"], 0), (["export", "--help"], 0),
                                       ([], 2), (["convert"], 2), (["frobnicate"], 2),
                                       (["export", "x", "--format", "tflite"], 2)])
def test_help_version_and_usage_errors_answer_at_once(args, code):
    # What makes the answer instant is asserted without a clock (no heavy import:
    # test_parsing_imports_no_heavy_library); the wall-clock bound is in the slow tier below.
    proc = subprocess.run([sys.executable, "-m", "surgery.cli", *args], capture_output=True, text=True)
    assert proc.returncode == code, proc.stderr
    if code == 2:
        assert "Traceback" not in proc.stderr and proc.stderr.strip().splitlines()[-1].startswith("vit-surgery")


@pytest.mark.slow  # a time threshold: depends on the machine's load
def test_help_answers_within_a_second_and_a_half():
    # Importing torch alone takes 1-3 s here; the CLI without it answers in ~0.1 s.
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "surgery.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and time.perf_counter() - start < 1.5


def test_parsing_imports_no_heavy_library():
    script = ("import sys, contextlib, io\nimport surgery.cli as c\n"
              "for argv in (['--help'], ['export', '--help'], ['convert', 'm', '--out', 'o', '--bogus']):\n"
              "    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
              "        try:\n            c.main(argv)\n        except SystemExit:\n            pass\n"
              f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_import_surgery_is_light_and_still_registers_with_timm(baked_dir):
    light = subprocess.run([sys.executable, "-c", f"import sys, surgery; print(sorted(m for m in sys.modules if "
                            f"m.split('.')[0] in {HEAVY!r}))"], capture_output=True, text=True)
    assert light.returncode == 0 and light.stdout.strip() == "[]", light.stderr
    for order in ("import surgery, timm", "import timm, surgery"):  # each needs a fresh interpreter
        code = f"{order}\nm = timm.create_model('local-dir:{baked_dir}', pretrained=True)\nprint(m.num_prefix_tokens)"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert proc.returncode == 0 and proc.stdout.strip() == "2", (order, proc.stderr[-500:])


# ---- (5) the one-call Python API, (2) model cards ------------------------------------------------

@pytest.fixture(scope="module")
def api_converted(tmp_path_factory):
    """surgery.convert on an in-memory timm organism whose pretrained config names a hub repo and a license."""
    model, planting = build_timm_organism(0, "clip")
    model.pretrained_cfg = dict(model.pretrained_cfg, hf_hub_id="vit-surgery-test/organism", license="mit")
    out = tmp_path_factory.mktemp("api") / "out"
    res = surgery.convert(model, out, images=builtin_images())
    return out, res, model, planting


def test_convert_in_memory_model_and_load_it_back(api_converted, calib_dir):
    out, res, model, planting = api_converted
    assert {k: list(v) for k, v in res.recipe.neurons.items()} == planting.neurons
    assert res.report.passed and res.effect["after"]["outlier_share"] == 0.0
    baked = surgery.load(out)
    assert type(baked).__name__ == "VisionTransformer" and baked.num_prefix_tokens == 2
    x = pixels_from(calib_dir, timm.data.create_transform(**timm.data.resolve_data_config({}, model=baked)), 5)
    with torch.no_grad():
        ref = timm.create_model(f"local-dir:{out}", pretrained=True).eval().forward_features(x)
        with surgery.hooked_reference(model.eval(), surgery.Recipe(planting.neurons), adapter=adapter_for(model.eval())):
            hooked = model.forward_features(x)
        got = baked.forward_features(x)
    assert torch.equal(got, ref)
    assert hooked.shape == got.shape and rel(got, hooked) < 1e-5  # the reference appends its register too


def test_api_mirrors_cli_errors(api_converted, organism_dir, tmp_path):
    out = api_converted[0]
    with pytest.raises(surgery.SurgeryError, match="pass overwrite to replace it") as e:
        surgery.convert(str(organism_dir), out, neurons="unused.json")
    assert e.value.exit_code == 8
    with pytest.raises(surgery.SurgeryError, match="not both"):
        surgery.convert(str(organism_dir), tmp_path / "o", neurons="n.json", images=builtin_images())
    with pytest.raises(surgery.SurgeryError, match="not a vit-surgery output|no baked"):
        surgery.load(organism_dir)
    assert not (tmp_path / "o").exists()


def _card(folder: Path):
    from huggingface_hub import ModelCard

    return ModelCard.load(folder / "README.md")


def test_timm_model_card(api_converted):
    out = api_converted[0]
    card = _card(out)
    d = card.data.to_dict()
    assert d["library_name"] == "timm" and d["license"] == "mit"
    assert d["base_model"] == "vit-surgery-test/organism"
    assert "test-time-registers" in d["tags"] and d["pipeline_tag"] == "image-feature-extraction"
    parity = json.loads((out / "parity.json").read_text())
    assert f"{parity['parity']['worst']['relative']:.2e}" in card.text
    before = parity["effect"]["before"]["outlier_share"]
    assert f"{100 * before:.2f} %" in card.text and "0.00 %" in card.text
    assert '"2": [17, 101]' in card.text and 'timm.create_model("hf-hub:' in card.text


def test_hf_model_card_copies_license_from_the_source_card(tmp_path, monkeypatch):
    from huggingface_hub import ModelCard, ModelCardData
    import huggingface_hub.constants as hc

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    model, planting = build_hf_dinov2_organism(0)
    src = save_hf_organism(model, tmp_path / "src")
    ModelCard(f"---\n{ModelCardData(license='cc-by-nc-4.0', library_name='transformers').to_yaml()}\n---\n# src\n"
              ).save(src / "README.md")
    write_fake_hub_repo(cache, "vit-surgery-test/dinov2", {p.name: p for p in src.iterdir()})
    nf = tmp_path / "n.json"
    nf.write_text(json.dumps({"register_neurons": {str(k): v for k, v in planting.neurons.items()}}))
    out = tmp_path / "out"
    surgery.convert("hf:vit-surgery-test/dinov2", out, neurons=nf)
    d = _card(out).data.to_dict()
    assert d["library_name"] == "transformers" and d["license"] == "cc-by-nc-4.0"
    assert d["base_model"] == "vit-surgery-test/dinov2" and "test-time-registers" in d["tags"]
    text = _card(out).text
    assert "AutoModel.from_pretrained" in text and "last_hidden_state" in text  # usage + the exporter's notes


def test_open_clip_model_card(tmp_path):
    from surgery.organisms.families import build_open_clip_organism, save_open_clip_organism

    model, planting = build_open_clip_organism(0)
    src = save_open_clip_organism(model, tmp_path / "src")
    nf = tmp_path / "n.json"
    nf.write_text(json.dumps({"register_neurons": {str(k): v for k, v in planting.neurons.items()}}))
    surgery.convert(f"open_clip:local-dir:{src}", tmp_path / "out", neurons=nf, check=False)  # the timm card
    # test checks the parity / effect numbers; this one the open_clip specifics
    card = _card(tmp_path / "out")
    d = card.data.to_dict()
    assert d["library_name"] == "open_clip" and d["pipeline_tag"] == "zero-shot-image-classification"
    assert "test-time-registers" in d["tags"] and "surgery.open_clip_load" in card.text
    clip = surgery.load(tmp_path / "out")
    assert type(clip).__name__ in ("CLIP", "CustomTextCLIP") and hasattr(clip, "encode_text")


# ---- (4) OpenVINO ----------------------------------------------------------------------------------

def test_openvino_export_matches_pytorch_and_the_hooked_reference(baked_dir, organism_dir, timm_organism, tmp_path,
                                                                   capsys, calib_dir):
    import openvino as ov

    out = tmp_path / "out"
    shutil.copytree(baked_dir, out)
    code, stdout, err = cli(["export", out, "--format", "openvino", "-q"], capsys)
    assert code == 0, err
    assert (out / "openvino_model.xml").is_file() and (out / "openvino_model.bin").is_file()
    assert "openvino PASS" in stdout
    assert json.loads((out / "parity.json").read_text())["openvino"]["passed"] is True
    core = ov.Core()
    ir = core.read_model(str(out / "openvino_model.xml"))
    assert ir.input(0).get_partial_shape()[0].is_dynamic
    compiled = core.compile_model(ir, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    baked = surgery.load(out)
    x = pixels_from(calib_dir, timm.data.create_transform(**timm.data.resolve_data_config({}, model=baked)), 3)
    res = {o.get_any_name(): torch.from_numpy(v) for o, v in compiled(x.numpy()).items()}
    model, planting = timm_organism
    with torch.no_grad():
        tokens = baked.forward_features(x)
        pooled = baked.forward_head(tokens)
        with surgery.hooked_reference(model.eval(), surgery.Recipe(planting.neurons), adapter=adapter_for(model.eval())):
            hooked = model.forward_features(x)
    assert res["tokens"].shape == tokens.shape == (3, 66, 64)  # batch 3: not the export batch (2)
    reg = 1
    others = [i for i in range(tokens.shape[1]) if i != reg]
    assert rel(res["tokens"][:, others], tokens[:, others]) < 1e-5
    assert rel(res["tokens"][:, others], hooked[:, others]) < 1e-5
    assert rel(res["tokens"][:, reg], tokens[:, reg]) < 1e-4  # the stated OpenVINO tolerance
    assert rel(res["tokens"][:, reg], hooked[:, reg]) < 1e-4
    assert rel(res["pooled"], pooled) < 1e-5
    code, _, err = cli(["export", out, "--format", "openvino", "-q"], capsys)
    assert code == 8 and "--overwrite" in err


# ---- (3) the HF ONNX layout -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_layout")
    outs = {}
    for kind, (model, planting) in {"dinov2": build_hf_dinov2_organism(0),
                                    "clip_model": build_hf_clip_organism(0, full_clip=True)}.items():
        nf = root / f"{kind}.json"
        nf.write_text(json.dumps({"register_neurons": {str(k): v for k, v in planting.neurons.items()}}))
        outs[kind] = surgery.convert(model, root / kind, neurons=nf).out
    return outs


@pytest.mark.parametrize("kind", ["dinov2", "clip_model"])
def test_hf_layout_loads_with_transformers_config_processor_and_onnxruntime(hf_converted, kind, capsys):
    """What optimum's ORTModelForFeatureExtraction and transformers.js do with the folder: AutoConfig for the
    model type (with trust_remote_code: the folder's config is closed to the stock classes), AutoImageProcessor
    for the inputs, onnx/model.onnx run by onnxruntime by output name."""
    import onnxruntime as ort
    from PIL import Image
    from transformers import AutoConfig, AutoImageProcessor

    out = hf_converted[kind]
    code, stdout, err = cli(["export", out, "--format", "onnx", "--layout", "hf", "-q"], capsys)
    assert code == 0, err
    assert (out / "onnx" / "model.onnx").is_file() and not (out / "onnx" / "model_fp16.onnx").exists()
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        AutoConfig.from_pretrained(out)
    cfg = AutoConfig.from_pretrained(out, trust_remote_code=True)
    assert cfg.model_type == {"dinov2": "dinov2", "clip_model": "clip"}[kind]
    processor = AutoImageProcessor.from_pretrained(out)
    images = [Image.open(p).convert("RGB") for p in sorted(builtin_images().glob("*.png"))[:3]]
    x = processor(images=images, return_tensors="pt")["pixel_values"]
    sess = ort.InferenceSession(str(out / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["pixel_values"]
    assert isinstance(sess.get_inputs()[0].shape[0], str)  # dynamic batch
    want_names = {"last_hidden_state", "pooler_output"} | ({"image_embeds"} if kind == "clip_model" else set())
    assert {o.name for o in sess.get_outputs()} == want_names
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"pixel_values": x.numpy()})))
    model = surgery.load(out)
    vision = model.vision_model if kind == "clip_model" else model
    with torch.no_grad():
        ref = vision(pixel_values=x)
        assert rel(torch.from_numpy(got["last_hidden_state"]), ref.last_hidden_state) < 1e-5
        assert rel(torch.from_numpy(got["pooler_output"]), ref.pooler_output) < 1e-5
        if kind == "clip_model":
            embeds = model.visual_projection(ref.pooler_output)  # CLIP's image embedding
            assert rel(torch.from_numpy(got["image_embeds"]), embeds) < 1e-5
    assert got["last_hidden_state"].shape[0] == 3 and json.loads((out / "parity.json").read_text())[
        "onnx_hf_layout"]["model.onnx"]["passed"]


def test_hf_layout_refuses_timm_folders(baked_dir, capsys):
    code, _, err = cli(["export", baked_dir, "--layout", "hf", "-q"], capsys)
    assert code == 4 and "--layout plain" in err and len(err.strip().splitlines()) == 1


# ---- (6) bad input ----------------------------------------------------------------------------------

def test_export_refuses_a_folder_that_is_not_a_vit_surgery_output(organism_dir, tmp_path, capsys):
    for target in (organism_dir, tmp_path):
        for fmt in ("onnx", "openvino"):
            code, _, err = cli(["export", target, "--format", fmt], capsys)
            assert code == 4 and "not a vit-surgery output" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli(["export", tmp_path / "missing"], capsys)
    assert code == 4 and "not found" in err
    assert list(tmp_path.iterdir()) == []


def test_unknown_format_is_a_usage_error(baked_dir):
    proc = subprocess.run([sys.executable, "-m", "surgery.cli", "export", str(baked_dir), "--format", "tflite"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice: 'tflite'" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_openvino_names_the_extra(baked_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(baked_dir, out)
    monkeypatch.setitem(sys.modules, "openvino", None)  # what an environment without the package looks like
    code, _, err = cli(["export", out, "--format", "openvino"], capsys)
    assert code == 12 and 'pip install "vit-surgery[openvino]"' in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in baked_dir.iterdir())
