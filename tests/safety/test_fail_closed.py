"""Every output verifiable: each ONNX / OpenVINO file an export writes into OUT is added to OUT's integrity
record, an ONNX input's output folder carries one too, and `check` exits 11 on any modified or unrecorded
deployment file before it computes anything (random bytes, the unbaked source graph, another bake, a
flipped bit, an edited preprocessor config)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from surgery.cli import main
from surgery.core.images import builtin_images
from surgery.core.integrity import file_sha256


def _run(args, capsys) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def _flip_bit(path: Path, offset_from_end: int = 1000) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def exported(baked_dir, tmp_path_factory):
    """The converted organism with model.onnx and model_quantized.onnx exported into it."""
    out = tmp_path_factory.mktemp("closed") / "out"
    shutil.copytree(baked_dir, out, ignore=shutil.ignore_patterns("*.onnx", "*.onnx.data"))
    assert main(["export", str(out), "-q"]) == 0
    assert main(["export", str(out), "--int8", "dynamic", "-q"]) == 0
    return out


def test_exports_are_recorded_and_check_passes(exported, capsys):
    files = json.loads((exported / "surgery.json").read_text())["integrity"]["files"]
    for name in ("model.onnx", "model_quantized.onnx"):
        assert files[name] == file_sha256(exported / name)
    code, err = _run(["check", exported, "-q"], capsys)
    assert code == 0, err


@pytest.mark.parametrize("damage", ["random_bytes", "flipped_bit", "another_valid_graph", "unrecorded_int8"])
def test_check_refuses_a_modified_or_unrecorded_export(exported, tmp_path, damage, capsys):
    out = tmp_path / "out"
    shutil.copytree(exported, out)
    if damage == "random_bytes":
        (out / "model_quantized.onnx").write_bytes(bytes(range(256)) * 64)
    elif damage == "flipped_bit":
        _flip_bit(out / "model.onnx")
    elif damage == "another_valid_graph":  # a whole, loadable graph (the float one) under the INT8 name
        shutil.copy(out / "model.onnx", out / "model_quantized.onnx")
    else:  # a file no export wrote, under a name check would validate
        shutil.copy(out / "model_quantized.onnx", out / "model_int8.onnx")
    code, err = _run(["check", out, "-q"], capsys)
    assert code == 11, err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.fixture(scope="module")
def onnx_output(tmp_path_factory):
    """An ONNX input (with its preprocessor config) converted with the planted neurons: (source, OUT)."""
    from transformers import CLIPImageProcessor

    from surgery.organisms.onnx_graphs import build_organism, export_source_onnx

    root = tmp_path_factory.mktemp("onnx_closed")
    model, planting = build_organism("timm_clip")
    (root / "src").mkdir()
    src = export_source_onnx(model, root / "src" / "model.onnx")
    CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}, resample=3,
                       image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(root / "src")
    neurons = root / "n.json"
    neurons.write_text(json.dumps({"register_neurons": {str(k): v for k, v in planting.neurons.items()}}))
    assert main(["convert", str(src), "--neurons", str(neurons), "--out", str(root / "out"), "-q"]) == 0
    return src, root / "out"


@pytest.mark.parametrize("damage", [None, "flipped_bit", "preprocessor", "deleted_record"])
def test_an_onnx_output_is_verified_before_it_is_compared(onnx_output, tmp_path, damage, capsys):
    src, converted = onnx_output
    out = tmp_path / "out"
    shutil.copytree(converted, out)
    if damage == "flipped_bit":
        _flip_bit(out / "model.onnx")
    elif damage == "preprocessor":
        doc = json.loads((out / "preprocessor_config.json").read_text())
        doc["image_mean"] = [0.5, 0.5, 0.5]
        (out / "preprocessor_config.json").write_text(json.dumps(doc))
    elif damage == "deleted_record":
        (out / "surgery.json").unlink()
    code, err = _run(["check", out / "model.onnx", "--source", src, "--images", builtin_images(), "-q"], capsys)
    if damage in (None, "deleted_record"):  # no record: the numbers alone judge it, and it says so
        assert code == 0, err
        assert ("no integrity record" in err) == (damage == "deleted_record")
    else:
        assert code == 11, err
        assert err.count("\n") == 1


def test_an_onnx_folder_whose_variant_is_another_model_does_not_convert(onnx_output, tmp_path, capsys):
    """onnx/model_fp16.onnx made from another model of the same shape: its error against model.onnx is
    no precision noise, so no bound derived from it may pass the bake."""
    from surgery.organisms.onnx_graphs import build_organism, export_source_onnx, make_variant

    src, converted = onnx_output
    repo = tmp_path / "repo"
    (repo / "onnx").mkdir(parents=True)
    shutil.copy(src, repo / "onnx" / "model.onnx")
    shutil.copy(src.parent / "preprocessor_config.json", repo / "preprocessor_config.json")
    other, _ = build_organism("timm_clip", seed=1)
    make_variant(export_source_onnx(other, tmp_path / "other.onnx"), repo / "onnx" / "model_fp16.onnx", "fp16")
    neurons = tmp_path / "n.json"
    neurons.write_text(json.dumps({"register_neurons": json.loads((converted / "surgery.json").read_text())
                                   ["recipe"]["register_neurons"]}))
    code, err = _run(["convert", repo, "--neurons", neurons, "--out", tmp_path / "out", "-q"], capsys)
    assert code == 7 and "model_fp16.onnx is not a precision variant of model.onnx" in err, err
    assert not (tmp_path / "out").exists()


def test_int8_on_few_images_does_not_claim_held_out_images(baked_dir, tmp_path, capsys):
    few = tmp_path / "few"
    few.mkdir()
    for f in sorted(builtin_images().glob("*.png"))[:3]:
        shutil.copy(f, few / f.name)
    out = tmp_path / "out"
    shutil.copytree(baked_dir, out, ignore=shutil.ignore_patterns("*.onnx", "*.onnx.data"))
    code = main(["export", str(out), "--int8", "static", "--images", str(few)])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    said = json.loads((out / "parity.json").read_text())["onnx_int8"]["model_int8.onnx"]["validation_images"]
    assert "the same it was calibrated on" in said and "not calibrated on" not in said
    assert "not calibrated on" not in stdout + (out / "README.md").read_text()
    import onnx
    import onnxruntime

    meta = json.loads({p.key: p.value for p in onnx.load(str(out / "model_int8.onnx"), load_external_data=False)
                       .metadata_props}["vit_surgery.int8"])
    assert meta["validated_with"].startswith(f"onnxruntime {onnxruntime.__version__}")
    assert "runtimes_not_supported" not in meta  # the same numbers in onnxruntime 1.18-1.32 (tests/onnx/test_int8.py)


@pytest.mark.slow  # two processes exporting at once (minutes on a shared machine)
def test_concurrent_int8_exports_into_one_out_one_wins(baked_dir, tmp_path):
    import os
    import subprocess
    import sys

    out = tmp_path / "out"
    shutil.copytree(baked_dir, out, ignore=shutil.ignore_patterns("*.onnx", "*.onnx.data"))
    cmd = [sys.executable, "-m", "surgery.cli", "export", str(out), "--int8", "dynamic", "-q"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    runs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    codes = sorted(r.wait(timeout=600) for r in runs)
    errs = [r.stderr.read() for r in runs]
    assert codes == [0, 8], errs
    files = json.loads((out / "surgery.json").read_text())["integrity"]["files"]
    assert files["model_quantized.onnx"] == file_sha256(out / "model_quantized.onnx")  # the winner's file


def test_source_weights_linked_from_out_are_refused(organism_dir, tmp_path, capsys):
    """`src/model.safetensors -> out/model.safetensors`: replacing OUT would replace the source's weights."""
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    shutil.copy(organism_dir / "config.json", src / "config.json")
    shutil.copy(organism_dir / "model.safetensors", out / "model.safetensors")
    (src / "model.safetensors").symlink_to(out / "model.safetensors")
    before = (out / "model.safetensors").read_bytes()
    neurons = tmp_path / "n.json"
    neurons.write_text(json.dumps({"register_neurons": {"2": [17]}}))
    code, err = _run(["convert", src, "--neurons", neurons, "--out", out, "--overwrite", "-q"], capsys)
    assert code == 10 and "through the link" in err and err.count("\n") == 1, err
    assert (out / "model.safetensors").read_bytes() == before and sorted(p.name for p in out.iterdir()) == \
        ["model.safetensors"]


@pytest.mark.parametrize("edit", ["deep_config", "deep_processor", "huge_head", "huge_pinpoint", "bad_pinpoint"])
def test_hostile_configs_are_refused_early_with_their_code(hf_clip_folder, tmp_path, edit, capsys, monkeypatch):
    """Refused from the files alone (no model built, no image resized): deep JSON and a bad pinpoint exit 4,
    a head or tile that could not be held here exits 13."""
    src = tmp_path / "src"
    shutil.copytree(hf_clip_folder, src)
    cfg = json.loads((src / "config.json").read_text())
    deep = "[" * 100_000 + "]" * 100_000
    if edit == "deep_config":
        (src / "config.json").write_text(deep)
    elif edit == "deep_processor":
        (src / "preprocessor_config.json").write_text('{"a": ' + deep + "}")
    elif edit == "huge_head":
        cfg["num_classes"] = 10 ** 12
    else:
        cfg["image_grid_pinpoints"] = [[64, 64], [3_000_000, 3_000_000] if edit == "huge_pinpoint" else [0, 64]]
    if not edit.startswith("deep"):
        (src / "config.json").write_text(json.dumps(cfg))
    code, err = _run(["find", src, "--images", builtin_images(), "--out", tmp_path / "n.json", "-q"], capsys)
    assert code == {"huge_head": 13, "huge_pinpoint": 13}.get(edit, 4), err
    assert err.count("\n") == 1 and "Traceback" not in err and "internal error" not in err, err


@pytest.fixture(scope="module")
def hf_clip_folder(tmp_path_factory):
    from surgery.organisms.families import build_hf_clip_organism

    model, _ = build_hf_clip_organism(0)
    folder = tmp_path_factory.mktemp("hf_clip") / "src"
    model.save_pretrained(folder)
    from transformers import CLIPImageProcessor

    CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llava_folder(tmp_path_factory):
    from surgery.organisms.vlm import build_llava_organism, build_llava_processor, save_vlm_organism

    model, _ = build_llava_organism(0, strategy="default", feature_layer=-2, tower="clip")
    return save_vlm_organism(model, build_llava_processor("default", cls_token=True),
                             tmp_path_factory.mktemp("llava") / "src")


BAD_VLM_VALUES = {
    "image_token_huge": ("config.json", lambda d: d.update(image_token_id=10 ** 9)),
    "image_token_negative": ("config.json", lambda d: d.update(image_token_id=-5)),
    "model_type_list": ("config.json", lambda d: d.update(model_type=["llava"])),
    "vision_config_string": ("config.json", lambda d: d.update(vision_config="clip")),
    "mean_text": ("processor", lambda d: d.update(image_mean=["a", "b", "c"])),
    "mean_two": ("processor", lambda d: d.update(image_mean=[0.5, 0.5])),
    "std_zero": ("processor", lambda d: d.update(image_std=[0, 0, 0])),
    "resample_99": ("processor", lambda d: d.update(resample=99)),
    "size_negative": ("processor", lambda d: d.update(size={"shortest_edge": -64})),
    "crop_not_the_towers": ("processor", lambda d: d.update(crop_size={"height": 48, "width": 48})),
}


@pytest.mark.parametrize("case", sorted(BAD_VLM_VALUES))
def test_bad_vlm_config_and_processor_values_exit_4(llava_folder, tmp_path, case, capsys):
    src = tmp_path / "src"
    shutil.copytree(llava_folder, src)
    where, edit = BAD_VLM_VALUES[case]
    path = src / ("config.json" if where == "config.json" else "processor_config.json")
    doc = json.loads(path.read_text())
    edit(doc if where == "config.json" else doc["image_processor"])
    path.write_text(json.dumps(doc))
    code, err = _run(["find", src, "--images", builtin_images(), "--out", tmp_path / "n.json", "-q"], capsys)
    assert code == 4, err
    assert err.count("\n") == 1 and "internal error" not in err, err


@pytest.mark.parametrize("entry", ["dangling_link", "fifo", "link_loop"])
def test_an_onnx_folder_with_an_unreadable_entry_is_refused_first(onnx_output, tmp_path, entry, capsys):
    import os

    src, converted = onnx_output
    repo = tmp_path / "repo"
    (repo / "onnx").mkdir(parents=True)
    shutil.copy(src, repo / "onnx" / "model.onnx")
    if entry == "dangling_link":
        (repo / "tokenizer.json").symlink_to(tmp_path / "missing.json")
    elif entry == "fifo":
        os.mkfifo(repo / "tokenizer.json")
    else:
        (repo / "a.json").symlink_to(repo / "b.json")
        (repo / "b.json").symlink_to(repo / "a.json")
    neurons = tmp_path / "n.json"
    neurons.write_text(json.dumps({"register_neurons": json.loads((converted / "surgery.json").read_text())
                                   ["recipe"]["register_neurons"]}))
    code, err = _run(["convert", repo, "--neurons", neurons, "--out", tmp_path / "out", "-q"], capsys)
    assert code == 4 and err.count("\n") == 1 and "repo" in err, err
    assert not (tmp_path / "out").exists()


def test_export_hf_layout_refuses_an_onnx_path_that_is_not_a_folder(baked_dir, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(baked_dir, out, ignore=shutil.ignore_patterns("*.onnx", "*.onnx.data"))
    (out / "onnx").write_text("in the way")
    code, err = _run(["export", out, "--format", "onnx", "--layout", "hf", "-q"], capsys)
    assert code == 10 and "is in the way" in err and err.count("\n") == 1, err


def test_int8_of_a_vlm_is_refused_in_one_line(llava_folder, tmp_path, capsys):
    from surgery.organisms.vlm import build_llava_organism

    _, planting = build_llava_organism(0, strategy="default", feature_layer=-2, tower="clip")
    neurons = tmp_path / "n.json"
    neurons.write_text(json.dumps({"register_neurons": {str(k): v for k, v in planting.neurons.items()}}))
    assert main(["convert", str(llava_folder), "--neurons", str(neurons), "--out", str(tmp_path / "out"), "-q"]) == 0
    code, err = _run(["export", tmp_path / "out", "--format", "onnx", "--layout", "hf", "--int8", "dynamic"], capsys)
    assert code == 4 and "no --int8" in err and err.count("\n") == 1, err


def test_one_line_errors_keep_what_the_library_said():
    from surgery.core.errors import first_line

    strict = ValueError("Validation error for field 'vision_feature_layer':\n    TypeError: Field expected int, got str")
    assert first_line(strict) == "Validation error for field 'vision_feature_layer': TypeError: Field expected int, got str"
    assert first_line(RuntimeError("3 keys missing. Please look at the above report!")) == "3 keys missing."
    assert first_line(ValueError("")) == "ValueError"
