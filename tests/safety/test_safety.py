"""Nothing lost, nothing silently wrong (integrity, concurrency, signals, honest exit codes).

Each test here failed on the code before it was written (the behaviour it asserts did not exist).
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageFile
from safetensors.torch import load_file, save_file

from surgery.cli import main
from surgery.core.errors import NeuronsFileError, OutputExistsError
from surgery.core.images import ImageBatches, list_images, load_image
from surgery.core.outputs import atomic_output_dir, atomic_output_file, host_tag
from surgery.core.recipe import read_neurons_file
from tests.helpers import cli as run

CLI = [sys.executable, "-m", "surgery.cli"]
NEURONS = {"register_neurons": {"2": [17, 101], "3": [42]}}


def one_line(err: str) -> bool:
    return err.count("\n") == 1 and "Traceback" not in err


def _env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[2])
    return dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))


def _digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _tensor_span(path: Path, name: str) -> tuple[int, int]:
    """Absolute byte range of one tensor in a safetensors file (from the format's JSON header)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    start, end = header[name]["data_offsets"]
    return 8 + n + start, 8 + n + end


def _patch_tensor(path: Path, name: str, offset: int, data: bytes) -> None:
    start, end = _tensor_span(path, name)
    assert start + offset + len(data) <= end
    with open(path, "r+b") as f:
        f.seek(start + offset)
        f.write(data)


def _flip_middle(path: Path, name: str, count: int = 64) -> None:
    start, end = _tensor_span(path, name)
    middle = start + (end - start) // 2 - count // 2
    with open(path, "r+b") as f:
        f.seek(middle)
        data = f.read(count)
        f.seek(middle)
        f.write(bytes(b ^ 0xFF for b in data))


def _drop_integrity(out: Path) -> None:
    doc = json.loads((out / "surgery.json").read_text())
    doc.pop("integrity")
    (out / "surgery.json").write_text(json.dumps(doc))


@pytest.fixture
def neurons_file(tmp_path) -> Path:
    p = tmp_path / "n.json"
    p.write_text(json.dumps(NEURONS))
    return p


# ---- 1. check catches corrupted outputs --------------------------------------------------------

@pytest.mark.parametrize("tensor", ["blocks.0.attn.qkv.weight", "head.weight", "blocks.2.mlp.reg_fc2.weight",
                                    "blocks.2.mlp.fc2.weight"])
def test_check_fails_on_a_corrupted_tensor(tensor, baked_dir, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(baked_dir, out)
    recipe = json.loads((out / "surgery.json").read_text())["recipe"]["register_neurons"]
    if tensor == "blocks.2.mlp.fc2.weight":  # the zeroed column of register unit 17 (row 0 of fp32 [64, hidden])
        assert 17 in recipe["2"]
        _patch_tensor(out / "model.safetensors", tensor, 17 * 4, struct.pack("<f", 0.5))
    else:
        _flip_middle(out / "model.safetensors", tensor)
    code, _, err = run(["check", out, "-q", "--report", tmp_path / "p.json"], capsys)
    assert code == 11, err
    assert f"tensor {tensor} in model.safetensors differs from what convert wrote" in err and one_line(err)


def test_check_compares_against_the_recorded_source_not_itself(baked_dir, tmp_path, capsys):
    """Even with the hash record gone, a damaged weight is caught: the recorded source is on this machine."""
    out = tmp_path / "out"
    shutil.copytree(baked_dir, out)
    # 64 corrupted bytes as large values (small ones could sit inside the judge's fp32-noise room)
    _patch_tensor(out / "model.safetensors", "blocks.0.attn.qkv.weight", 4096, struct.pack("<16f", *[4.0] * 16))
    _drop_integrity(out)
    code, stdout, err = run(["check", out, "--report", tmp_path / "p.json"], capsys)
    assert code == 7, err
    assert "parity FAIL" in err and "compared against the source model" in stdout


def test_check_refuses_a_source_that_is_not_the_one(baked_dir, tmp_path, capsys):
    from surgery.demo import save_organism
    from surgery.organisms.vit import build_timm_organism

    other = save_organism(build_timm_organism(1, "clip")[0], tmp_path / "other")
    code, _, err = run(["check", baked_dir, "-q", "--source", other, "--report", tmp_path / "p.json"], capsys)
    assert code == 11 and "is not the model" in err and one_line(err)


def test_convert_records_tensor_hashes_and_the_source(baked_dir, organism_dir):
    from safetensors import safe_open

    doc = json.loads((baked_dir / "surgery.json").read_text())
    ident = doc["source_identity"]
    assert ident["path"] == str(Path(organism_dir).resolve())
    h = hashlib.sha256()  # independent of the code under test: the rule written out
    for name, t in sorted(load_file(str(organism_dir / "model.safetensors")).items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    assert ident["weights_sha256"] == h.hexdigest()
    tensors = doc["integrity"]["tensors"]["model.safetensors"]
    with safe_open(str(baked_dir / "model.safetensors"), "pt") as f:
        assert sorted(tensors) == sorted(f.keys())
        t = f.get_tensor("blocks.0.attn.qkv.weight")
    assert tensors["blocks.0.attn.qkv.weight"]["sha256"] == hashlib.sha256(t.numpy().tobytes()).hexdigest()
    assert doc["integrity"]["files"]["config.json"] == hashlib.sha256((baked_dir / "config.json").read_bytes()).hexdigest()


# ---- 2. concurrent writers: exactly one wins ---------------------------------------------------

@pytest.mark.parametrize("overwrite", [False, True])
def test_of_two_overlapping_writers_exactly_one_wins(tmp_path, overwrite):
    out = tmp_path / "out"
    if overwrite:
        out.mkdir()
        (out / "who").write_text("old")
    first, second = atomic_output_dir(out, overwrite), atomic_output_dir(out, overwrite)
    a, b = first.__enter__(), second.__enter__()
    (a / "who").write_text("a")
    (b / "who").write_text("b")
    first.__exit__(None, None, None)
    with pytest.raises(OutputExistsError, match="appeared while this run was writing"):
        second.__exit__(None, None, None)
    assert (out / "who").read_text() == "a" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_empty_folder_that_appears_meanwhile_is_not_replaced(tmp_path):
    out = tmp_path / "out"
    ctx = atomic_output_dir(out)
    (ctx.__enter__() / "model").write_text("x")
    out.mkdir()
    (tmp_path / "out" / ".keep").touch()
    os.remove(out / ".keep")  # still empty: a plain rename would silently replace it
    with pytest.raises(OutputExistsError):
        ctx.__exit__(None, None, None)
    assert out.is_dir() and list(out.iterdir()) == [] and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_file_that_appears_meanwhile_is_not_replaced(tmp_path):
    out = tmp_path / "n.json"
    ctx = atomic_output_file(out)
    ctx.__enter__().write_text("mine")
    out.write_text("theirs")
    with pytest.raises(OutputExistsError):
        ctx.__exit__(None, None, None)
    assert out.read_text() == "theirs" and [p.name for p in tmp_path.iterdir()] == ["n.json"]


@pytest.mark.slow  # the overlap is up to the scheduler; the tests above force it deterministically
def test_two_concurrent_converts_one_wins_the_other_exits_8(organism_dir, neurons_file, tmp_path):
    out = tmp_path / "out"
    cmd = CLI + ["convert", str(organism_dir), "--neurons", str(neurons_file), "--out", str(out), "-q"]
    procs = [subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=_env()) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(r for r, _ in results) == [0, 8], results
    assert "already exists" in results[0][1] + results[1][1] or "appeared" in results[0][1] + results[1][1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n.json", "out"]
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "surgery.json", "parity.json",
                                              "README.md"}


# ---- 3. the source is never the output ---------------------------------------------------------

@pytest.mark.parametrize("where", ["same", "inside", "contains"])
def test_output_may_not_be_contain_or_lie_inside_the_source(where, organism_dir, neurons_file, tmp_path, capsys):
    src = tmp_path / "models" / "src"
    shutil.copytree(organism_dir, src)
    before = _digests(tmp_path / "models")
    out = {"same": src, "inside": src / "baked", "contains": tmp_path / "models"}[where]
    code, _, err = run(["convert", src, "--neurons", neurons_file, "--out", out, "--overwrite", "-q"], capsys)
    assert code == 10 and "source" in err and one_line(err)
    assert _digests(tmp_path / "models") == before
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["src"]


# ---- 4. SIGTERM and processes that died --------------------------------------------------------

def test_sigterm_cleans_up_like_ctrl_c(organism_dir, calib_dir, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.Popen(CLI + ["convert", str(organism_dir), "--images", str(calib_dir), "--out",
                                   str(work / "out"), "-q"], stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.time() + 240
    while not any(p.name.startswith(".out.partial-") for p in work.iterdir()):
        assert proc.poll() is None and time.time() < deadline, "the run never started writing"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    err = proc.stderr.read()
    assert one_line(err) and "terminated" in err
    assert list(work.iterdir()) == []


def test_partial_outputs_of_dead_processes_are_removed(organism_dir, neurons_file, tmp_path, capsys):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".out.partial-{host_tag()}.{dead.pid}.0badf00d"
    live = tmp_path / f".out.partial-{host_tag()}.{os.getpid()}.0000cafe"
    old = tmp_path / ".out.partial-ab_c1234"  # made by an older vit-surgery: reported, not touched
    for d in (stale, live, old):
        d.mkdir()
        (d / "model.safetensors").write_text("complete-looking")
    code, _, err = run(["convert", organism_dir, "--neurons", neurons_file, "--out", tmp_path / "out", "-q"], capsys)
    assert code == 0, err
    assert not stale.exists() and live.exists() and old.exists()
    assert f"removed {stale}" in err and f"found {old}" in err


# ---- 5. neurons files ----------------------------------------------------------------------------

def test_duplicate_keys_and_deep_nesting_in_a_neurons_file(organism_dir, tmp_path, capsys):
    dup = tmp_path / "dup.json"
    dup.write_text('{"register_neurons": {"2": [17], "2": [101]}}')
    deep = tmp_path / "deep.json"
    deep.write_text('{"register_neurons": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(NeuronsFileError, match="'2' appears twice"):
        read_neurons_file(dup)
    for path, words in ((dup, "appears twice"), (deep, "nested too deeply")):
        code, _, err = run(["convert", organism_dir, "--neurons", path, "--out", tmp_path / "o"], capsys)
        assert code == 5 and words in err and one_line(err)
    assert not (tmp_path / "o").exists()


# ---- 6. NaN / Inf ------------------------------------------------------------------------------

@pytest.fixture
def nan_model(organism_dir, tmp_path) -> Path:
    d = tmp_path / "nan_model"
    d.mkdir()
    shutil.copy(organism_dir / "config.json", d)
    state = load_file(str(organism_dir / "model.safetensors"))
    state["blocks.1.mlp.fc2.weight"][3, 5] = float("nan")
    save_file(state, str(d / "model.safetensors"))
    return d


@pytest.mark.parametrize("command", ["find", "convert --no-check", "convert", "convert --images"])
def test_nan_weights_are_named_in_every_command(command, nan_model, neurons_file, calib_dir, tmp_path, capsys):
    name, *flags = command.split()
    args = [name, nan_model, "--out", tmp_path / "o", *flags]
    if name == "find" or "--images" in flags:
        args += [] if "--images" in flags else ["--images"]
        args += [calib_dir]
    else:
        args += ["--neurons", neurons_file]
    code, _, err = run(args, capsys)
    assert code == 4, err
    assert "blocks.1.mlp.fc2.weight contains 1 NaN" in err and one_line(err) and not (tmp_path / "o").exists()


def test_check_names_an_inf_weight_in_the_output(baked_dir, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(baked_dir, out)
    _patch_tensor(out / "model.safetensors", "blocks.4.mlp.fc2.weight", 8, struct.pack("<f", float("inf")))
    _drop_integrity(out)
    code, _, err = run(["check", out, "-q", "--report", tmp_path / "p.json"], capsys)
    assert code == 4 and "Traceback" not in err, err
    assert "no integrity record" in err.splitlines()[0]  # a warning, then the error
    assert "blocks.4.mlp.fc2.weight contains 0 NaN and 1 Inf" in err.splitlines()[1] and err.count("\n") == 2


# ---- also found: start-up, usage problems before loading, -q, reproducibility, permissions -----

def test_ctrl_c_during_startup_is_one_line(monkeypatch, capsys):
    cli = importlib.import_module("surgery.cli.main")  # the module (the package attribute `main` is the function)

    def interrupted():
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "build_parser", interrupted)
    code, _, err = run(["--help"], capsys)
    assert code == 130 and one_line(err)


@pytest.mark.parametrize("case, code, words", [
    ("device-cuda", 2, "no usable CUDA"),
    ("device-nonsense", 2, "not a torch device"),
    ("images-missing", 3, "image folder not found"),
    ("neurons-bad", 5, "not valid JSON"),
    ("out-file-overwrite", 10, "is a file, not a folder"),
    ("out-dangling-link", 10, "dangling symbolic link"),
    ("out-parent-is-a-file", 10, "is not a folder"),
    ("find-out-is-a-folder", 10, "is a folder; give a file path"),
    ("check-images-missing", 3, "image folder not found"),
])
def test_usage_problems_are_found_before_the_model_loads(case, code, words, organism_dir, calib_dir, baked_dir,
                                                         tmp_path, capsys, monkeypatch):
    importlib.import_module("surgery.cli.main")  # the CLI module loaded before the patches below

    def must_not_load(*a, **k):
        raise AssertionError("the model was loaded before a cheap check")
    monkeypatch.setattr("surgery.api.load_source", must_not_load)  # every verb loads through the dispatch
    if case == "device-cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    (tmp_path / "bad.json").write_text("{")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    convert = ["convert", organism_dir, "--images", calib_dir, "--out"]
    args = {
        "device-cuda": convert + [tmp_path / "o", "--device", "cuda"],
        "device-nonsense": convert + [tmp_path / "o", "--device", "gpu-please"],
        "images-missing": ["convert", organism_dir, "--images", tmp_path / "nope", "--out", tmp_path / "o"],
        "neurons-bad": ["convert", organism_dir, "--neurons", tmp_path / "bad.json", "--out", tmp_path / "o"],
        "out-file-overwrite": convert + [tmp_path / "afile", "--overwrite"],
        "out-dangling-link": convert + [tmp_path / "dangling"],
        "out-parent-is-a-file": convert + [tmp_path / "afile" / "o"],
        "find-out-is-a-folder": ["find", organism_dir, "--images", calib_dir, "--out", tmp_path / "adir", "--overwrite"],
        "check-images-missing": ["check", baked_dir, "--images", tmp_path / "nope"],
    }[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    got, _, err = run(args, capsys)
    assert got == code, err
    assert words in err and one_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write in read-only folders")
def test_read_only_output_folder_is_found_before_loading(organism_dir, calib_dir, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        code, _, err = run(["convert", organism_dir, "--images", calib_dir, "--out", ro / "o"], capsys)
    finally:
        ro.chmod(0o755)
    assert code == 10 and "no permission" in err and one_line(err)


def test_quiet_prints_no_summary(organism_dir, neurons_file, tmp_path, capsys):
    code, out, err = run(["convert", organism_dir, "--neurons", neurons_file, "--out", tmp_path / "a"], capsys)
    assert code == 0 and "parity PASS" in out
    code, out, err = run(["convert", organism_dir, "--neurons", neurons_file, "--out", tmp_path / "b", "-q"], capsys)
    assert code == 0 and out == "" and err == ""


def surgery_package_dir() -> Path:
    import surgery

    return Path(surgery.__file__).resolve().parent


def test_demo_outputs_are_byte_identical_across_processes(tmp_path, monkeypatch, capsys):
    """The demo (find, convert, check, report) in another process (its own hash seed) and in this one, both
    writing OUT at the same relative path: every file is the same, byte for byte."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    other = subprocess.Popen(CLI + ["demo", "--out", "demo_out", "-q"], cwd=tmp_path / "a",
                             env=dict(_env(), PYTHONHASHSEED="1"), stderr=subprocess.PIPE, text=True)
    monkeypatch.chdir(tmp_path / "b")
    assert main(["demo", "--out", "demo_out", "-q"]) == 0
    assert other.wait(timeout=600) == 0, other.stderr.read()
    a, b = _digests(tmp_path / "a" / "demo_out"), _digests(tmp_path / "b" / "demo_out")
    assert {"neurons.json", "baked/model.safetensors", "baked/surgery.json", "report/report.html"} <= set(a)
    assert a == b
    # the report uses the check's images and names no installed path; `check` finds the source
    demo = tmp_path / "b" / "demo_out"
    summary = json.loads((demo / "report" / "summary.json").read_text())
    parity = json.loads((demo / "baked" / "parity.json").read_text())["parity"]
    assert summary["num_images"] == parity["images"] and summary["images"] == "the built-in calibration images"
    assert str(Path(surgery_package_dir())) not in (demo / "report" / "report.html").read_text()
    assert json.loads((demo / "baked" / "surgery.json").read_text())["source_identity"]["path"] == "../source_model"
    assert main(["check", "demo_out/baked"]) == 0
    assert "compared against the source model" in capsys.readouterr().out


def _modes(root: Path) -> set[tuple[str, int]]:
    return {("dir" if p.is_dir() else "file", stat.S_IMODE(p.stat().st_mode)) for p in [root, *root.rglob("*")]}


def test_outputs_honour_the_umask_like_cp(organism_dir, neurons_file, calib_dir, tmp_path, capsys):
    old = os.umask(0o022)
    try:
        code, _, err = run(["convert", organism_dir, "--neurons", neurons_file, "--out", tmp_path / "out", "-q"],
                           capsys)
        assert code == 0, err
        code, _, err = run(["find", organism_dir, "--images", calib_dir, "--out", tmp_path / "n2.json", "-q"], capsys)
        assert code == 0, err
    finally:
        os.umask(old)
    assert _modes(tmp_path / "out") == {("dir", 0o755), ("file", 0o644)}
    assert stat.S_IMODE((tmp_path / "n2.json").stat().st_mode) == 0o644


# ---- images and model folders ------------------------------------------------------------------

def test_symlinked_image_subfolders_are_followed_once(calib_dir, tmp_path):
    root = tmp_path / "imgs"
    (root / "real").mkdir(parents=True)
    for p in sorted(calib_dir.glob("*.png"))[:3]:
        shutil.copy(p, root / "real" / p.name)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(sorted(calib_dir.glob("*.png"))[3], elsewhere / "x.png")
    (root / "linked").symlink_to(elsewhere, target_is_directory=True)
    (root / "real" / "loop").symlink_to(root, target_is_directory=True)  # a loop back to the top
    files = list_images(root)
    assert [p.relative_to(root).as_posix() for p in files] == sorted(
        ["linked/x.png"] + [f"real/{p.name}" for p in sorted(calib_dir.glob("*.png"))[:3]])


def test_huge_images_are_refused_before_decoding(tmp_path, timm_organism):
    import timm

    big = tmp_path / "big.png"
    Image.new("1", (12000, 12000)).save(big)  # 144 megapixels, a few kB on disk
    decoded = []  # refused from the header alone: the pixels are never decoded (no clock needed)
    original_load = ImageFile.ImageFile.load
    ImageFile.ImageFile.load = lambda self, *a, **k: decoded.append(self) or original_load(self, *a, **k)
    try:
        with pytest.raises(ValueError, match="too large to decode"):
            load_image(big)
    finally:
        ImageFile.ImageFile.load = original_load
    assert decoded == []
    model, _ = timm_organism
    tf = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    batches = ImageBatches([big], tf, progress=False)
    with pytest.warns(UserWarning, match="too large to decode"):
        assert list(batches) == []


def test_unknown_timm_architecture_is_named(organism_dir, calib_dir, tmp_path, capsys):
    d = tmp_path / "m"
    shutil.copytree(organism_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architecture"] = "vit_from_the_future_patch16"
    (d / "config.json").write_text(json.dumps(cfg))
    code, _, err = run(["find", d, "--images", calib_dir, "--out", tmp_path / "n.json"], capsys)
    assert code == 4 and "'vit_from_the_future_patch16'" in err and one_line(err)


# ==== nothing lost: the other commands ============================================================

def _tree(root: Path) -> dict[str, str]:
    """Every entry under `root` with its kind and, for files, its digest (a FIFO is never opened)."""
    out = {}
    for p in sorted(root.rglob("*")):
        name = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[name] = "link"
        elif stat.S_ISFIFO(p.lstat().st_mode):
            out[name] = "fifo"
        elif p.is_dir():
            out[name] = "dir"
        else:
            out[name] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _must_not_load(monkeypatch) -> None:
    import surgery.backends
    importlib.import_module("surgery.cli.main")  # the CLI module loaded before the patches below

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before a cheap check")
    monkeypatch.setattr("surgery.api.load_source", refuse)  # every verb loads through the dispatch
    monkeypatch.setattr(surgery.backends, "load_model", refuse)


@pytest.fixture
def world(organism_dir, baked_dir, calib_dir, tmp_path) -> dict[str, Path]:
    """Inputs of every kind inside tmp_path (so that what a run does to them can be seen)."""
    w = {"src": tmp_path / "src", "out": tmp_path / "out", "imgs": tmp_path / "imgs", "n": tmp_path / "n.json",
         "ds": tmp_path / "ds"}
    shutil.copytree(organism_dir, w["src"])
    shutil.copytree(baked_dir, w["out"])
    w["imgs"].mkdir()
    for p in sorted(calib_dir.glob("*.png"))[:6]:
        shutil.copy(p, w["imgs"] / p.name)
    for cls in ("a", "b"):
        shutil.copytree(w["imgs"], w["ds"] / cls)
    w["n"].write_text(json.dumps(NEURONS))
    return w


@pytest.mark.parametrize("case", [
    "inspect-out-is-the-source", "find-out-inside-the-source", "convert-out-is-the-images",
    "convert-out-contains-the-images", "convert-out-is-the-check-images", "convert-out-contains-the-neurons-file",
    "find-out-inside-the-images", "check-report-inside-out", "check-report-inside-the-source",
    "eval-json-inside-the-dataset", "inspect-out-inside-the-dataset",
])
def test_no_command_writes_onto_into_or_around_its_inputs(case, world, tmp_path, capsys, monkeypatch):
    w = world
    args = {
        "inspect-out-is-the-source": ["inspect", w["src"], "--neurons", w["n"], "--images", w["imgs"], "--out",
                                      w["src"], "--overwrite"],
        "find-out-inside-the-source": ["find", w["src"], "--images", w["imgs"], "--out",
                                       w["src"] / "model.safetensors", "--overwrite"],
        "convert-out-is-the-images": ["convert", w["src"], "--images", w["imgs"], "--out", w["imgs"], "--overwrite"],
        "convert-out-contains-the-images": ["convert", w["src"], "--images", w["imgs"], "--out", tmp_path,
                                            "--overwrite"],
        "convert-out-is-the-check-images": ["convert", w["src"], "--neurons", w["n"], "--check-images", w["imgs"],
                                            "--out", w["imgs"], "--overwrite"],
        "convert-out-contains-the-neurons-file": ["convert", w["src"], "--neurons", w["n"], "--out", tmp_path,
                                                  "--overwrite"],
        "find-out-inside-the-images": ["find", w["src"], "--images", w["imgs"], "--out", w["imgs"] / "n.json"],
        "check-report-inside-out": ["check", w["out"], "--report", w["out"] / "parity.json"],
        "check-report-inside-the-source": ["check", w["out"], "--source", w["src"], "--report",
                                           w["src"] / "config.json"],
        "eval-json-inside-the-dataset": ["eval", w["src"], w["out"], "--dataset", w["ds"], "--json",
                                         w["ds"] / "a" / "r.json"],
        "inspect-out-inside-the-dataset": ["inspect", w["out"], "--dataset", w["ds"], "--out", w["ds"] / "rep"],
    }[case]
    _must_not_load(monkeypatch)
    before = _tree(tmp_path)
    code, _, err = run(args, capsys)
    assert code == 10, err
    assert one_line(err) and ("is the" in err or "inside" in err or "contains" in err)
    assert _tree(tmp_path) == before


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("command", ["find", "find --overwrite", "convert --overwrite", "inspect --overwrite",
                                     "check --report"])
def test_special_files_are_never_replaced(command, world, tmp_path, capsys, monkeypatch):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    w = world
    name, *flags = command.split()
    args = {"find": ["find", w["src"], "--images", w["imgs"], "--out", fifo],
            "convert": ["convert", w["src"], "--neurons", w["n"], "--out", fifo],
            "inspect": ["inspect", w["out"], "--out", fifo],
            "check": ["check", w["out"], "--report", fifo]}[name]
    _must_not_load(monkeypatch)
    code, _, err = run(args + [f for f in flags if f != "--report"], capsys)
    assert code == 10, err
    assert "FIFO" in err and one_line(err)
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    with pytest.raises(Exception, match="FIFO"):  # the shared scheme itself refuses, for the Python API too
        with atomic_output_file(fifo, overwrite=True):
            pass
    assert stat.S_ISFIFO(fifo.lstat().st_mode)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("fmt, name", [("onnx", "model.onnx"), ("onnx", "model.onnx.data"),
                                       ("openvino", "openvino_model.xml"), ("openvino", "openvino_model.bin")])
def test_export_overwrite_never_replaces_a_special_file_inside_out(fmt, name, world, tmp_path, capsys):
    out = tmp_path / "exported"
    shutil.copytree(world["out"], out)
    fifo = out / name
    os.mkfifo(fifo)
    before = _tree(out)
    code, _, err = run(["export", out, "--format", fmt, "--overwrite", "-q"], capsys)
    assert code == 10 and "FIFO" in err and one_line(err), err
    assert stat.S_ISFIFO(fifo.lstat().st_mode) and _tree(out) == before


@pytest.mark.parametrize("command", ["find", "convert", "inspect", "demo"])
def test_a_missing_output_folder_is_not_created(command, world, tmp_path, capsys, monkeypatch):
    w = world
    out = tmp_path / "not" / "there"
    args = {"find": ["find", w["src"], "--images", w["imgs"], "--out", out],
            "convert": ["convert", w["src"], "--neurons", w["n"], "--out", out],
            "inspect": ["inspect", w["out"], "--out", out], "demo": ["demo", "--out", out]}[command]
    _must_not_load(monkeypatch)
    code, _, err = run(args, capsys)
    assert code == 10 and "does not exist" in err and one_line(err), err
    assert not (tmp_path / "not").exists()


# ---- silently wrong ---------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["check", "convert"])
@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf", "-inf"])
def test_tolerance_must_be_positive_and_finite(command, value, organism_dir, neurons_file, baked_dir, tmp_path,
                                               capsys):
    args = {"check": ["check", str(baked_dir)],
            "convert": ["convert", str(organism_dir), "--neurons", str(neurons_file), "--out", str(tmp_path / "o")]}
    with pytest.raises(SystemExit) as e:
        main(args[command] + [f"--tolerance={value}"])
    assert e.value.code == 2
    assert "must be a positive number" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_an_output_without_its_record_is_said_loudly_and_never_passes_alone(world, capsys):
    out = world["out"]
    (out / "surgery.json").unlink()
    before = _tree(out)
    code, stdout, err = run(["check", out, "-q"], capsys)
    assert code == 11, err
    assert "no surgery.json" in err and "--source" in err.splitlines()[-1]
    assert "PASS" not in stdout + err
    code, stdout, err = run(["check", out, "--source", world["src"]], capsys)  # with its source: checked
    assert code == 0, err
    assert "parity PASS" in stdout and "no surgery.json" in err
    assert _tree(out) == before  # check never writes into OUT (no parity.json rewritten)


def test_check_does_not_modify_out_even_when_it_is_read_only(world, capsys):
    out = world["out"]
    before = _tree(out)
    for p in [*out.rglob("*"), out]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        code, stdout, err = run(["check", out], capsys)
    finally:
        for p in [out, *out.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
    assert code == 0, err
    assert "parity PASS" in stdout and "wrote" not in stdout
    assert _tree(out) == before


@pytest.mark.parametrize("damage", ["config", "record-removed"])
def test_export_verifies_the_integrity_record_first(damage, world, capsys, monkeypatch):
    out = world["out"]
    if damage == "config":  # a config `check` rejects: export must not export it either
        cfg = json.loads((out / "config.json").read_text())
        cfg["model_args"]["num_registers_typo"] = 1
        (out / "config.json").write_text(json.dumps(cfg))
    else:
        _drop_integrity(out)
    _must_not_load(monkeypatch)
    code, _, err = run(["export", out, "--format", "onnx"], capsys)
    assert code == 11 and one_line(err), err
    assert not (out / "model.onnx").exists()


# ---- hangs and memory ---------------------------------------------------------------------------

def test_a_yaml_alias_bomb_in_a_model_card_is_not_expanded(tmp_path):
    from surgery.exporters.model_card import MAX_FRONT_MATTER_BYTES, _card_data_of

    lines = ["---", 'a: &a ["x","x","x","x","x","x","x","x","x"]']
    for i in range(1, 12):  # 9 ** 12 strings when expanded
        lines.append(f"{chr(97 + i)}: &{chr(97 + i)} [" + ",".join([f"*{chr(96 + i)}"] * 9) + "]")
    lines += ["license: *l", "---", "# card"]
    bomb = tmp_path / "bomb.md"
    bomb.write_text("\n".join(lines))
    assert _card_data_of(bomb) == {}
    huge = tmp_path / "huge.md"
    huge.write_text("---\nlicense: mit\nnote: " + "x" * (MAX_FRONT_MATTER_BYTES + 10) + "\n---\n")
    assert _card_data_of(huge) == {}
    good = tmp_path / "good.md"
    good.write_text("---\nlicense: apache-2.0\nbase_model: org/name\n---\n# card\n")
    assert _card_data_of(good) == {"license": "apache-2.0", "base_model": "org/name"}


@pytest.mark.parametrize("field", ["depth", "img_size"])
def test_an_absurd_config_is_refused_before_anything_is_built(field, world, tmp_path, capsys, monkeypatch):
    from surgery.backends import load_model
    from surgery.core.errors import OutOfMemoryRisk

    monkeypatch.delenv("VIT_SURGERY_SKIP_MEMORY_CHECK", raising=False)
    src = world["src"]
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_args"][field] = 100_000
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(OutOfMemoryRisk, match="stopped before building it"):  # the Python API: the loader
        load_model(str(src))
    _must_not_load(monkeypatch)
    code, _, err = run(["convert", src, "--neurons", world["n"], "--out", tmp_path / "o"], capsys)
    assert code == 13 and "config.json describes a model" in err and one_line(err)


# ---- exit codes: user and environment errors are never exit 1 -------------------------------------

def test_disk_full_is_an_environment_error_and_leaves_nothing(world, tmp_path, capsys, monkeypatch):
    import errno

    import surgery.core.output_format

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(surgery.core.output_format, "write_json", full)  # the one JSON writer
    code, _, err = run(["find", world["src"], "--images", world["imgs"], "--out", tmp_path / "n2.json", "-q"], capsys)
    assert code == 10 and "No space left on device" in err and one_line(err.splitlines()[-1] + "\n"), err
    assert not any(p.name.startswith((".n2.json", "n2.json")) for p in tmp_path.iterdir())


def test_output_names_too_long_or_not_utf8(world, tmp_path, capsys, monkeypatch):
    _must_not_load(monkeypatch)
    long_name = tmp_path / ("o" * 240)
    code, _, err = run(["convert", world["src"], "--neurons", world["n"], "--out", long_name], capsys)
    assert code == 10 and "too long" in err and one_line(err)
    odd = str(tmp_path / os.fsdecode(b"out-\xff"))
    code, _, err = run(["convert", world["src"], "--neurons", world["n"], "--out", odd], capsys)
    assert code == 10 and "not valid UTF-8" in err and one_line(err)
    assert not any(p.name.startswith(("o" * 20, "out-")) for p in tmp_path.iterdir() if p.name != "out")


def test_a_crafted_stale_temporary_name_neither_crashes_nor_blocks(tmp_path):
    crafted = tmp_path / f".o.json.partial-{host_tag()}.99999999999999999999.deadbeef"
    crafted.write_text("not ours")
    with pytest.warns(UserWarning, match="names no possible process"):
        with atomic_output_file(tmp_path / "o.json") as tmp:
            tmp.write_text("{}")
    assert (tmp_path / "o.json").read_text() == "{}" and crafted.exists()


@pytest.mark.parametrize("args, words", [
    (["--num-registers", "65"], "from 1 to 64"),
    (["--scale", "1e308"], "|scale| <= 1e6"),
    (["--tolerance", "-1"], "positive number"),
])
def test_limits_are_checked_up_front(args, words, organism_dir, neurons_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["convert", str(organism_dir), "--neurons", str(neurons_file), "--out", str(tmp_path / "o"), *args])
    assert e.value.code == 2 and words in capsys.readouterr().err


def test_a_neurons_file_with_an_absurd_scale_is_refused(organism_dir, tmp_path, capsys):
    bad = tmp_path / "n.json"
    bad.write_text(json.dumps({**NEURONS, "scale": 1e308}))
    code, _, err = run(["convert", organism_dir, "--neurons", bad, "--out", tmp_path / "o"], capsys)
    assert code == 5 and "scale" in err and one_line(err)


@pytest.mark.parametrize("flag", ["--detect-layer", "--max-layer"])
def test_layer_options_beyond_the_model_are_usage_errors(flag, organism_dir, calib_dir, tmp_path, capsys):
    code, _, err = run(["find", organism_dir, "--images", calib_dir, "--out", tmp_path / "n.json", flag, "99",
                        "-q"], capsys)
    assert code == 2 and "out of range" in err and one_line(err)


def test_a_non_numeric_mean_in_a_config_is_a_model_error(world, tmp_path, capsys):
    src = world["src"]
    cfg = json.loads((src / "config.json").read_text())
    cfg["pretrained_cfg"]["mean"] = ["red", "green", "blue"]
    (src / "config.json").write_text(json.dumps(cfg))
    code, _, err = run(["convert", src, "--neurons", world["n"], "--out", tmp_path / "o", "-q"], capsys)
    assert code == 4 and "mean must be numbers" in err and one_line(err)


def test_user_errors_found_from_the_arguments_answer_before_torch_is_imported(world, tmp_path):
    w = world
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    (tmp_path / "exists").mkdir()
    cases = [
        (["convert", tmp_path / "no_such_folder", "--neurons", w["n"], "--out", tmp_path / "o"], 4),
        (["find", f"local-dir:{tmp_path / 'nope'}", "--images", w["imgs"], "--out", tmp_path / "n.json"], 4),
        (["convert", w["src"], "--images", tmp_path / "no_imgs", "--out", tmp_path / "o"], 3),
        (["convert", w["src"], "--neurons", w["n"], "--out", tmp_path / "exists"], 8),
        (["find", w["src"], "--images", w["imgs"], "--out", fifo, "--overwrite"], 10),
        (["convert", w["src"], "--images", w["imgs"], "--out", w["imgs"], "--overwrite"], 10),
        (["convert", w["src"], "--neurons", w["n"], "--out", tmp_path / "a" / "b"], 10),
        (["check", tmp_path / "x.onnx"], 2),
        (["export", w["out"], "--format", "openvino", "--layout", "hf"], 2),
        (["check", tmp_path / "missing_out"], 4),
    ]
    script = ("import sys, json\nfrom surgery.cli import main\ncodes = [main(a) for a in json.loads(sys.argv[1])]\n"
              "print(json.dumps({'codes': codes, 'torch': 'torch' in sys.modules}))\n")
    proc = subprocess.run([sys.executable, "-c", script, json.dumps([[str(x) for x in a] for a, _ in cases])],
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["codes"] == [c for _, c in cases], proc.stderr
    assert got["torch"] is False
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == len(cases)


# ---- smaller promises -----------------------------------------------------------------------------

def test_help_names_every_model_form():
    from surgery.cli import build_parser

    for command in ("find", "convert"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
    text = subprocess.run(CLI + ["find", "--help"], capture_output=True, text=True, env=_env()).stdout
    assert ".onnx" in text and "dinov2:" in text
    text = subprocess.run(CLI + ["convert", "--help"], capture_output=True, text=True, env=_env()).stdout
    assert "MODEL" in text and ".onnx" in text and "hf:ORG/NAME" in text


def test_inspect_defaults_to_the_builtin_images_like_check():
    from surgery.cli import build_parser

    a = build_parser().parse_args(["inspect", "m", "--out", "r"])
    assert a.images is None


def test_the_report_names_no_installed_path(calib_dir):
    from surgery.report import _images_label

    assert _images_label(calib_dir, []) == "the built-in calibration images"
    assert _images_label(None, []) == "the built-in calibration images"
    assert _images_label("imgs", []) == "imgs"


def test_thin_evidence_is_said():
    from surgery.core.discovery import warn_thin_evidence

    with pytest.warns(UserWarning, match="only 1 of 16 image"):
        warn_thin_evidence(1, 16)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_thin_evidence(18, 24)


def test_a_pass_line_above_the_tolerance_shows_the_allowance():
    from surgery.core.parity import OutputError, ParityReport

    rep = ParityReport(1e-5, images=16)
    ok = OutputError("block2.residual", relative=9e-6, where=(12, 1), ratio=0.9, allowed=1e-5,
                     relative_at_where=9e-6, allowed_at_largest=1e-5)
    wide = OutputError("block4.residual", relative=3.4e-5, where=(3, 7), ratio=0.5, allowed=6.8e-5,
                       relative_at_where=3.4e-5, allowed_at_largest=6.8e-5)
    rep.outputs = {ok.name: ok, wide.name: wide}
    line = rep.summary()
    assert rep.passed and "largest anywhere 3.4e-05 in block4.residual, allowed there 6.8e-05" in line
