"""Bad input, untrusted checkpoints, interrupted runs, determinism, property-based parsing."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from surgery.cli import main
from surgery.core.errors import NeuronsFileError
from surgery.core.images import ImageBatches, list_images
from surgery.core.recipe import Recipe

from tests.helpers import cli as run


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


# ---- images ------------------------------------------------------------------------------------

@pytest.fixture
def messy_images(tmp_path, calib_dir) -> Path:
    d = tmp_path / "messy"
    (d / "sub").mkdir(parents=True)
    good = sorted(calib_dir.glob("*.png"))[:4]
    for p in good:
        shutil.copy(p, d / p.name)
    (d / "zero.jpg").write_bytes(b"")
    (d / "text.png").write_text("this is not an image")
    data = good[0].read_bytes()
    (d / "truncated.png").write_bytes(data[: len(data) // 2])
    (d / "notes.txt").write_text("ignored: not an image extension")
    rgb = np.asarray(Image.open(good[1]))
    Image.fromarray(rgb).convert("L").save(d / "sub" / "gray.png")
    Image.fromarray(rgb).convert("RGBA").save(d / "sub" / "rgba.png")
    Image.fromarray(rgb).convert("P").save(d / "sub" / "palette.png")
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(d / "sub" / "sixteen.png")
    Image.fromarray(rgb).resize((4000, 3000)).save(d / "sub" / "large.jpg", quality=70)
    return d


def test_unreadable_images_are_skipped_and_odd_modes_converted(messy_images, timm_organism):
    model, _ = timm_organism
    tf = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    files = list_images(messy_images)
    assert len(files) == 12  # .txt ignored, everything else listed
    batches = ImageBatches(files, tf, batch_size=4, progress=False)
    with pytest.warns(UserWarning, match="skipped 3 unreadable"):
        seen = [p.name for _, paths in batches for p in paths]
    assert sorted(p.name for p, _ in batches.skipped) == ["text.png", "truncated.png", "zero.jpg"]
    assert {"gray.png", "rgba.png", "palette.png", "sixteen.png", "large.jpg"} <= set(seen)
    assert len(seen) == 9


def test_find_counts_skipped_images(messy_images, organism_dir, tmp_path, capsys):
    out = tmp_path / "n.json"
    code, _, err = run(["find", organism_dir, "--images", messy_images, "--out", out, "-q"], capsys)
    assert code == 0, err
    assert "warning: skipped 3 unreadable image(s)" in err
    assert json.loads(out.read_text())["outliers"]["skipped_images"] == 3


def test_folder_where_nothing_is_readable(tmp_path, organism_dir, capsys):
    d = tmp_path / "junk"
    d.mkdir()
    (d / "a.png").write_text("nope")
    (d / "b.jpg").write_bytes(b"\xff\xd8\xff")
    code, _, err = run(["find", organism_dir, "--images", d, "--out", tmp_path / "n.json"], capsys)
    assert code == 3 and "none of the 2 image file(s) could be read" in err


# ---- models ------------------------------------------------------------------------------------

def _save_dir(model, arch: str, model_args: dict, path: Path, weights: str = "model.safetensors", obj=None) -> Path:
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"architecture": arch, "model_args": model_args,
                                                  "pretrained_cfg": {"input_size": [3, 64, 64], "crop_pct": 1.0}}))
    if weights.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / weights))
    elif weights:
        torch.save(obj if obj is not None else model.state_dict(), path / weights)
    return path


def test_non_vit_model_is_refused(tmp_path, calib_dir, capsys):
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=4)
    d = _save_dir(resnet, "resnet18", {"num_classes": 4}, tmp_path / "resnet")
    code, _, err = run(["find", d, "--images", calib_dir, "--out", tmp_path / "n.json"], capsys)
    assert code == 4 and "unsupported model type ResNet" in err and err.count("\n") == 1


def test_missing_and_mismatched_weights(tmp_path, calib_dir, capsys, timm_organism):
    model, _ = timm_organism
    args = dict(model.organism_source["model_args"])
    d = _save_dir(model, "vit_base_patch16_clip_224", args, tmp_path / "noweights", weights="")
    code, _, err = run(["find", d, "--images", calib_dir, "--out", tmp_path / "n.json"], capsys)
    assert code == 4 and "no weights file" in err
    d = _save_dir(model, "vit_base_patch16_clip_224", dict(args, depth=4), tmp_path / "mismatch")
    code, _, err = run(["find", d, "--images", calib_dir, "--out", tmp_path / "n.json"], capsys)
    assert code == 4 and "do not match" in err and err.count("\n") == 1


class _Evil:  # needs full unpickling (a class from this module)
    def __reduce__(self):
        return (dict, ())


def test_pickles_load_weights_only_and_unsafe_ones_need_a_flag(tmp_path, calib_dir, capsys, timm_organism):
    model, _ = timm_organism
    args = dict(model.organism_source["model_args"])
    ok = _save_dir(model, "vit_base_patch16_clip_224", args, tmp_path / "bin", weights="pytorch_model.bin")
    code, _, err = run(["find", ok, "--images", calib_dir, "--out", tmp_path / "n1.json", "-q"], capsys)
    assert code == 0, err
    state = dict(model.state_dict())
    state["__evil__"] = _Evil()
    bad = _save_dir(model, "vit_base_patch16_clip_224", args, tmp_path / "evil", weights="pytorch_model.bin",
                    obj={"state_dict": {k: v for k, v in state.items() if k != "__evil__"}, "x": _Evil()})
    code, _, err = run(["find", bad, "--images", calib_dir, "--out", tmp_path / "n2.json"], capsys)
    assert code == 9 and "--allow-unsafe-pickle" in err and not (tmp_path / "n2.json").exists()
    code, _, err = run(["find", bad, "--images", calib_dir, "--out", tmp_path / "n3.json", "-q",
                        "--allow-unsafe-pickle"], capsys)
    assert code == 0, err


def test_neurons_file_for_another_model(tmp_path, organism_dir, calib_dir, capsys):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"register_neurons": {"2": [3]},
                                 "provenance": {"depth": 24, "hidden_sizes": [4096]}}))
    code, _, err = run(["convert", organism_dir, "--neurons", other, "--out", tmp_path / "o"], capsys)
    assert code == 5 and "made for a model with 24 blocks" in err and not (tmp_path / "o").exists()


# ---- outputs -----------------------------------------------------------------------------------

def test_convert_never_touches_the_source_and_is_byte_deterministic(organism_dir, calib_dir, tmp_path, capsys):
    before = _digest(organism_dir)
    for name in ("a", "b"):
        code, _, err = run(["convert", organism_dir, "--images", calib_dir, "--out", tmp_path / name, "-q"], capsys)
        assert code == 0, err
    assert _digest(organism_dir) == before
    a, b = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert a["model.safetensors"] == b["model.safetensors"]
    assert a["neurons.json"] == b["neurons.json"] and a["config.json"] == b["config.json"]


def test_existing_output_is_kept_without_overwrite(organism_dir, calib_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run(["convert", organism_dir, "--images", calib_dir, "--out", out], capsys)
    assert code == 8 and (out / "keep.txt").read_text() == "mine"
    code, _, err = run(["convert", organism_dir, "--images", calib_dir, "--out", out, "--overwrite", "-q"], capsys)
    assert code == 0 and not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


@pytest.mark.parametrize("failure", ["interrupt", "crash", "parity"])
def test_failures_leave_no_partial_output(failure, organism_dir, calib_dir, tmp_path, capsys, monkeypatch):
    import surgery.pipeline as pipeline

    if failure == "interrupt":
        def boom(*a, **k):
            raise KeyboardInterrupt
        monkeypatch.setattr(pipeline, "run_check", boom)
        expected = 130
    elif failure == "crash":
        def boom(*a, **k):
            raise RuntimeError("disk on fire")
        monkeypatch.setattr(pipeline, "write_json", boom)
        expected = 1
    else:  # a bar nothing passes: no tolerance, and no allowance for float32's own error either
        monkeypatch.setattr("surgery.core.judge.KERNEL_FACTOR", 0.0)
        expected = 7
    extra = ["--tolerance", "1e-12"] if failure == "parity" else []
    code, _, err = run(["convert", organism_dir, "--images", calib_dir, "--out", tmp_path / "out", "-q", *extra],
                       capsys)
    assert code == expected, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # no OUT, no hidden partial folder


# ---- property-based ----------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10_000) | st.floats(allow_nan=True) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=4),
    max_leaves=12,
)


@given(st.dictionaries(st.sampled_from(["register_neurons", "num_registers", "scale", "mode", "x"]), json_values))
@settings(max_examples=300, deadline=None)
def test_neurons_parser_accepts_or_rejects_cleanly(doc):
    try:
        recipe = Recipe.from_dict(doc)
    except NeuronsFileError as e:
        assert "\n" not in str(e)
    else:
        assert recipe.num_neurons >= 1 and all(isinstance(u, int) for v in recipe.neurons.values() for u in v)


@given(st.dictionaries(st.integers(0, 40), st.lists(st.integers(0, 5000), min_size=1, max_size=6, unique=True),
                       min_size=1, max_size=5),
       st.integers(1, 4), st.floats(0.1, 4), st.sampled_from(["shared", "per_neuron"]))
@settings(max_examples=200, deadline=None)
def test_valid_neurons_documents_round_trip(neurons, r, scale, mode):
    doc = {"register_neurons": {str(k): v for k, v in neurons.items()}, "num_registers": r, "scale": scale,
           "mode": mode}
    recipe = Recipe.from_dict(json.loads(json.dumps(doc)))
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    assert {k: sorted(v) for k, v in neurons.items()} == {k: list(v) for k, v in recipe.neurons.items()}


@given(st.sampled_from(["--threshold", "--top-k", "--max-layer", "--batch-size", "--num-images", "--seed",
                        "--detect-layer"]), st.text(max_size=8))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_cli_arguments_never_crash(tmp_path, flag, value):
    try:
        code = main(["find", str(tmp_path / "no-model"), "--images", str(tmp_path / "no-images"),
                     "--out", str(tmp_path / "n.json"), "-q", flag, value])
    except SystemExit as e:  # argparse rejects the value
        assert e.code == 2
    else:
        assert code in (3, 4), code  # parsed: then the missing model/images is reported, never a crash


# ---- an ONNX input goes through the same output scheme; its external data is checked ----

@pytest.fixture(scope="module")
def onnx_source(tmp_path_factory):
    """An organism exported to ONNX by torch's exporter (what a user brings), with its neurons file."""
    from surgery.organisms.onnx_graphs import build_organism, export_source_onnx

    model, planting = build_organism("timm_clip")
    root = tmp_path_factory.mktemp("onnx_src")
    path = export_source_onnx(model, root / "src" / "model.onnx", exporter="legacy", opset=17)
    neurons = root / "n.json"
    neurons.write_text(json.dumps({"register_neurons": {str(k): v for k, v in planting.neurons.items()}}))
    return path, neurons


def test_onnx_convert_uses_the_shared_output_scheme(onnx_source, tmp_path, capsys):
    import os
    import stat

    from surgery.core.outputs import host_tag

    src, neurons = onnx_source
    out = tmp_path / "out"
    stale = tmp_path / f".out.partial-{host_tag()}.{2 ** 22 - 1}.0badf00d"  # a process that cannot exist now
    stale.mkdir()
    old = os.umask(0o022)
    try:
        code, stdout, err = run(["convert", src, "--neurons", neurons, "--out", out], capsys)
    finally:
        os.umask(old)
    assert code == 0, err
    modes = {("dir" if p.is_dir() else "file", stat.S_IMODE(p.stat().st_mode)) for p in [out, *out.rglob("*")]}
    assert modes == {("dir", 0o755), ("file", 0o644)}
    text = (out / "parity.json").read_text()
    assert ".partial" not in text and "partial" not in stdout
    summary = json.loads(text)["onnx"]["summary"]
    assert f"{out / 'model.onnx'} vs the hooked reference on {src}" in summary
    assert err.count("no preprocessor_config.json") == 1  # said once, not once per pass
    assert not stale.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _external_copy(src: Path, folder: Path) -> Path:
    import onnx

    folder.mkdir()
    path = folder / "model.onnx"
    onnx.save_model(onnx.load(str(src)), str(path), save_as_external_data=True, location="model.onnx.data",
                    size_threshold=1024)
    return path


def _relocate(path: Path, location: str) -> None:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    for t in m.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(m, str(path))


@pytest.mark.parametrize("case, words", [("outside", "outside the model's folder"), ("missing", "missing"),
                                         ("short", "shorter than")])
def test_onnx_external_data_is_checked_before_it_is_read(case, words, onnx_source, tmp_path):
    import os
    import subprocess
    import sys

    src, neurons = onnx_source
    path = _external_copy(src, tmp_path / "m")
    if case == "outside":  # a FIFO: opening it would block, so a finished run proves it was never opened
        os.mkfifo(tmp_path / "secret")
        _relocate(path, "../secret")
    elif case == "missing":
        (path.parent / "model.onnx.data").unlink()
    else:
        data = path.parent / "model.onnx.data"
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "surgery.cli", "convert", str(path), "--neurons", str(neurons),
                           "--out", str(tmp_path / "o"), "-q"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 4, proc.stderr
    assert words in proc.stderr and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()
