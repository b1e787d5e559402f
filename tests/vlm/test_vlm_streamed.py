"""VLMs at the size people hold them: only the tower is built; everything else goes from file to file.

Structural, not timed: the safetensors reader (`ShardedCheckpoint.tensor`, the one place the streamed
VLM builds a tensor from the source's files) is recorded, so the tests see exactly which tensors were
built; every unchanged tensor of OUT is compared with the source's byte for byte by safetensors' own
reader; a hub-layout source (transformers' own `save_pretrained` in shards, tower renamed the way the
llava-hf repos store it) keeps its files, index and names. Size, time and peak memory of a 7B are in
benchmarks/bench_vlm_memory.py.
"""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from surgery.backends import load_model
from surgery.backends.hf import vlm_stream
from surgery.cli import main
from surgery.core import memory
from surgery.core.safetensors_io import ShardedCheckpoint
from surgery.organisms.vlm import build_llava_organism, build_llava_processor, save_hub_layout
from surgery.pipeline import parity_batches, run_check, run_convert
from tests.vlm.test_vlm import PLANTED, assert_only_the_tower_changed

LM = ("language_model.",)  # the stored names of the language model (hub and transformers layouts alike)


@pytest.fixture(scope="module")
def neurons_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("streamed_neurons") / "neurons.json"
    path.write_text(json.dumps({"register_neurons": {str(k): v for k, v in PLANTED.items()}}))
    return path


def save_llava(folder: Path, *, hub_names: bool) -> Path:
    model, planting = build_llava_organism(0)
    assert planting.neurons == PLANTED
    return save_hub_layout(model, build_llava_processor(), folder, max_shard_size="100KB", hub_names=hub_names)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, neurons_file):
    """layout -> (source, converted): transformers' shards with the hub's names, and with its own."""
    root = tmp_path_factory.mktemp("streamed")
    out = {}
    for layout in ("hub", "transformers"):
        src = save_llava(root / layout / "src", hub_names=layout == "hub")
        res = run_convert(load_model(str(src)), root / layout / "out", neurons=str(neurons_file), progress=False)
        assert res.report.passed, res.report.summary()
        out[layout] = (src, root / layout / "out")
    return out


@contextlib.contextmanager
def recorded_reads(monkeypatch):
    """Names the streamed reader builds as tensors, each with how many language-model units were
    materialised at that moment; transformers' own loading and safetensors' whole-file loading fail."""
    reads: list[tuple[str, int]] = []
    live = [0]
    tensor, enter, leave = ShardedCheckpoint.tensor, vlm_stream._Streamer.enter, vlm_stream._Streamer.leave

    def record(self, name):
        reads.append((name, live[0]))
        return tensor(self, name)

    def entered(self, module, args, kwargs):
        assert live[0] == 0, "a language-model unit entered while another one was materialised"
        live[0] += 1
        return enter(self, module, args, kwargs)

    def left(self, module, args, out):
        live[0] -= 1
        return leave(self, module, args, out)

    read_into = ShardedCheckpoint.read_into

    def record_into(self, name, out, staging=None, start_row=0):
        reads.append((name, live[0]))
        return read_into(self, name, out, staging, start_row)

    def refused(*_a, **_k):
        raise AssertionError("the whole checkpoint was loaded")

    import safetensors.torch
    import transformers

    monkeypatch.setattr(ShardedCheckpoint, "tensor", record)
    monkeypatch.setattr(ShardedCheckpoint, "read_into", record_into)
    monkeypatch.setattr(vlm_stream._Streamer, "enter", entered)
    monkeypatch.setattr(vlm_stream._Streamer, "leave", left)
    monkeypatch.setattr(safetensors.torch, "load_file", refused)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", refused)
    yield reads


def test_convert_builds_only_the_tower_and_streams_the_language_model(tmp_path, neurons_file, monkeypatch):
    """Loading and writing build exactly the tensors outside the language model (tower, projector); the
    judge then reads the language model's tensors one unit (a projection, a norm, the embeddings, the head)
    at a time, into one reused region the size of the largest unit."""
    src = save_llava(tmp_path / "src", hub_names=True)
    stored = ShardedCheckpoint.open(lambda n: src / n if (src / n).is_file() else None).names()
    outside = {n for n in stored if not n.startswith(LM)}
    assert outside and len(outside) < len(stored)
    with recorded_reads(monkeypatch) as reads:
        loaded = load_model(str(src))
        run_convert(loaded, tmp_path / "out", neurons=str(neurons_file), progress=False, check=False)
        assert {n for n, _ in reads} == outside  # nothing of the language model was built
        reads.clear()
        reloaded = load_model(str(tmp_path / "out"))
        batches = parity_batches(reloaded, None, 2, 2, 0, False)
        report, _ = run_check(reloaded, batches, source=loaded.model)
    assert report.passed, report.summary()
    lm_reads = [(n, live) for n, live in reads if n.startswith(LM)]
    assert {n for n, _ in lm_reads} == set(stored) - outside  # the judge ran the whole language model ...
    assert all(live == 1 for _, live in lm_reads)  # ... each tensor inside its own unit's forward only
    largest = max(sum(p.numel() for p in m.parameters()) for _, m in vlm_stream._stream_units(reloaded.model))
    assert vlm_stream._ARENA.weights[torch.device("cpu")].numel() == largest  # not a whole decoder layer


def test_large_projections_and_embedding_tables_are_read_in_pieces(sharded, monkeypatch):
    """A projection over CHUNK_ELEMENTS runs in chunks of its output rows and an embedding table over it
    reads only the rows of the ids asked for (a 7B's head and embeddings, 0.5-2 GB each in float32): the
    logits are those of the whole-matrix run, and no more than a chunk is ever in memory."""
    _src, out = sharded["hub"]
    whole_model = load_model(str(out))
    pixels = parity_batches(whole_model, None, 2, 2, 0, False)[0]
    with torch.inference_mode():
        whole, _ = whole_model.adapter.forward_both(whole_model.model, pixels)
    limit = 512  # the organism's head and token table (20 x 48) are over it, its norms (48) under
    monkeypatch.setattr(vlm_stream, "CHUNK_ELEMENTS", limit)
    monkeypatch.setattr(vlm_stream, "_ARENA", vlm_stream._Arena())
    pieces_model = load_model(str(out))
    units = vlm_stream._stream_units(pieces_model.model)
    chunked = [m for _, m in units if vlm_stream._is_chunked_linear(m)]
    by_rows = [m for _, m in units if vlm_stream._is_row_embedding(m)]
    assert pieces_model.model.lm_head in chunked and by_rows  # the head and the token embeddings at least
    with torch.inference_mode():
        pieces, _ = pieces_model.adapter.forward_both(pieces_model.model, pixels)
    torch.testing.assert_close(pieces, whole, rtol=1e-5, atol=1e-6)
    small = max(sum(p.numel() for p in m.parameters()) for _, m in units if m not in chunked and m not in by_rows)
    tokens = pixels.shape[0] * 4096  # far more than the judged prompt's distinct ids
    width = max(m.weight.shape[1] for m in chunked + by_rows)
    assert vlm_stream._ARENA.weights[torch.device("cpu")].numel() <= max(small, limit + width, tokens * width)
    assert vlm_stream._ARENA.weights[torch.device("cpu")].numel() < max(m.weight.numel() for m in chunked + by_rows)


@pytest.mark.parametrize("layout", ["hub", "transformers"])
def test_sharded_source_keeps_its_files_names_and_bytes(layout, sharded):
    src, out = sharded[layout]
    assert len(list(src.glob("*.safetensors"))) > 3  # really sharded
    assert_only_the_tower_changed(src, out, "vision_tower.")
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    tower = "vision_tower.vision_model." if layout == "hub" else "vision_tower."
    branch = [n for n in index if ".reg_fc" in n]  # the register branch's new tensors, named like the tower's
    assert branch and all(n.startswith(tower) for n in branch)
    if layout == "hub":
        assert not any(n.startswith("vision_tower.encoder.") for n in index)  # legacy names kept, not mixed


def test_sharded_hub_layout_output_loads_in_float16(sharded):
    """`AutoModelForImageTextToText.from_pretrained(OUT, trust_remote_code=True, dtype=torch.float16)` on the
    sharded output with the hub's names: nothing missing or unexpected, the language model is the source's."""
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    src, out = sharded["hub"]
    model, info = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True, dtype=torch.float16,
                                                              output_loading_info=True)
    assert type(model).__name__ == "VitSurgeryLlavaForConditionalGeneration"
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert next(model.parameters()).dtype == torch.float16
    stored = {}
    for f in sorted(src.glob("*.safetensors")):
        stored.update(load_file(str(f)))
    want = stored["language_model.model.layers.1.mlp.down_proj.weight"].to(torch.float16)
    assert torch.equal(model.model.language_model.layers[1].mlp.down_proj.weight, want)
    name = "vision_tower.vision_model.encoder.layers.2.mlp.reg_fc2.weight"  # a tensor the bake added
    shard = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"][name]
    assert torch.equal(model.model.vision_tower.encoder.layers[2].mlp.reg_fc2.weight,
                       load_file(str(out / shard))[name].to(torch.float16))


@pytest.mark.parametrize("kwargs", [{"device_map": "cpu"}, {"device_map": "auto"}, {"low_cpu_mem_usage": True}])
def test_sharded_output_loads_through_accelerates_device_map(sharded, kwargs):
    """The big-model loading paths people use for a 7B (accelerate's `device_map`, `low_cpu_mem_usage`) build
    the vit-surgery class with every stored tensor in place, the register branch included, and no hook
    left on a meta tensor."""
    pytest.importorskip("accelerate")
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    _src, out = sharded["hub"]
    model, info = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True, dtype=torch.float16,
                                                              output_loading_info=True, **kwargs)
    assert type(model).__name__ == "VitSurgeryLlavaForConditionalGeneration"
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not any(p.device.type == "meta" for p in model.parameters())
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    name = "vision_tower.vision_model.encoder.layers.2.mlp.reg_fc2.weight"
    assert torch.equal(model.model.vision_tower.encoder.layers[2].mlp.reg_fc2.weight,
                       load_file(str(out / index[name]))[name].to(torch.float16))
    token = next(n for n in index if n.endswith("register_tokens"))
    buf = dict(model.named_buffers())
    assert any(k.endswith("register_tokens") for k in buf), sorted(buf)[:5]
    assert token


def _scale(folder: Path, suffix: str, factor: float) -> str:
    """Multiply the first stored tensor whose name ends with `suffix` by `factor`, in place."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    name = next(n for n in sorted(index) if n.endswith(suffix))
    path = folder / index[name]
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    tensors[name] = tensors[name] * factor
    save_file(tensors, str(path), metadata=meta)
    return name


@pytest.fixture(scope="module")
def judged(sharded):
    """The source, its correct output and the batches the streamed judge runs on."""
    src, out = sharded["hub"]
    good = load_model(str(out))
    return load_model(str(src)), good, parity_batches(good, None, 2, 2, 0, False)


def test_the_streamed_judge_passes_a_correct_bake(judged):
    source, good, batches = judged
    report, _ = run_check(good, batches, source=source.model)
    assert report.passed, report.summary()
    assert {"image_features", "logits"} <= set(report.outputs)


@pytest.mark.parametrize("tamper, first, also", [
    ("mlp.reg_fc2.weight", "block2.residual", ()),  # the register branch x 1.05: its own block fails
    ("layers.3.mlp.fc2.weight", "block3.residual", ("image_features", "logits")),  # the image the LM sees
])
def test_a_wrong_bake_fails_the_streamed_judge(tamper, first, also, sharded, judged, tmp_path):
    """A tower off by 5 % fails where it starts; where it changes the image features, the streamed
    language model's logits (float32, one layer at a time) fail too."""
    source, _, batches = judged
    bad = tmp_path / "bad"
    shutil.copytree(sharded["hub"][1], bad)
    _scale(bad, tamper, 1.05)
    report, _ = run_check(load_model(str(bad)), batches, source=source.model)
    assert not report.passed
    failed = [e.name for e in report.failures()]
    assert failed[0] == first and set(also) <= set(failed), report.summary()


def test_a_vlm_whose_text_model_cannot_fit_is_refused_before_reading(sharded, tmp_path, neurons_file, monkeypatch,
                                                                     capsys):
    """The text_config counts: a text model whose judged logits alone (a 2^28-token vocabulary) exceed 16 GiB
    cannot be streamed; exit 13, one line, before any file of the checkpoint is opened. The same folder with
    its own small text model is within the estimate, and so is a text model of width 65536 (streamed in
    pieces, its weights are never whole in memory)."""
    src = tmp_path / "src"
    shutil.copytree(sharded["hub"][0], src)
    cfg = json.loads((src / "config.json").read_text())
    monkeypatch.setattr(memory, "available_bytes", lambda: 16 * memory.GiB)
    memory.require_config_fits(str(src), cfg, streamed=True)  # the real one fits
    wide = json.loads(json.dumps(cfg))
    wide["text_config"].update(hidden_size=65536, intermediate_size=262144, num_hidden_layers=2)
    memory.require_config_fits(str(src), wide, streamed=True)
    cfg["text_config"].update(vocab_size=1 << 28)
    (src / "config.json").write_text(json.dumps(cfg))
    opened = []
    init = ShardedCheckpoint.__init__
    monkeypatch.setattr(ShardedCheckpoint, "__init__", lambda self, *a, **k: (opened.append(a), init(self, *a, **k)))
    monkeypatch.delenv("VIT_SURGERY_SKIP_MEMORY_CHECK", raising=False)
    code = main(["convert", str(src), "--neurons", str(neurons_file), "--out", str(tmp_path / "out"), "-q"])
    _, err = capsys.readouterr()
    assert code == 13 and err.count("\n") == 1 and "VLM" in err and "Traceback" not in err, err
    assert not opened and not (tmp_path / "out").exists()


def test_check_and_export_work_on_a_sharded_hub_layout_output(sharded, capsys):
    """`check` (integrity of every shard, the streamed judge) and `export --layout hf` (vision_encoder.onnx:
    the tower and projector only) on the sharded output with the hub's names."""
    _, out = sharded["hub"]
    code = main(["check", str(out)])
    stdout, err = capsys.readouterr()
    assert code == 0 and "parity PASS" in stdout, err
    code = main(["export", str(out), "--format", "onnx", "--layout", "hf", "-q"])
    _, err = capsys.readouterr()
    assert code == 0, err
    assert (out / "onnx" / "vision_encoder.onnx").is_file()


def test_inspect_refuses_up_front_when_the_language_models_attention_cannot_fit(sharded, tmp_path, monkeypatch,
                                                                                 capsys):
    """inspect's language-model attention section: exit 13 naming --no-lm-attention before any image is
    measured when a batch's attention maps cannot fit; with --no-lm-attention the rest of the report runs."""
    _, out = sharded["hub"]
    monkeypatch.setattr(memory, "available_bytes", lambda: 64 << 20)  # the tiny VLM fits, 4096 images' maps do not
    monkeypatch.delenv("VIT_SURGERY_SKIP_MEMORY_CHECK", raising=False)
    code = main(["inspect", str(out), "--out", str(tmp_path / "rep"), "--num-images", "2", "--show", "1", "-q",
                 "--batch-size", "4096"])
    _, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if not line.startswith("vit-surgery: warning:")]  # thin evidence
    assert code == 13 and len(errors) == 1 and "--no-lm-attention" in errors[0], err
    assert not (tmp_path / "rep").exists()
    monkeypatch.setattr(memory, "available_bytes", lambda: None)
    code = main(["inspect", str(out), "--out", str(tmp_path / "rep"), "--num-images", "2", "--show", "1", "-q",
                 "--no-lm-attention"])
    _, err = capsys.readouterr()
    assert code == 0, err
    assert "lm_attention" not in json.loads((tmp_path / "rep" / "summary.json").read_text())


def test_a_float16_vlm_is_judged_in_float32_against_its_own_float32_error(tmp_path, neurons_file):
    """A float16 hub-layout source: the output holds the source's weights exactly and is judged computing in
    float32, each output allowed the unmodified model's own float32 error (x 4); a tower off by 5 % still
    fails, in the image features and the streamed language model's logits."""
    model, _ = build_llava_organism(0)
    src = save_hub_layout(model.to(torch.float16), build_llava_processor(), tmp_path / "src", max_shard_size="100KB")
    loaded = load_model(str(src))
    # the source's tower stays in its stored float16 (half the memory) and computes in float32 block by block:
    # discovery on it finds exactly the planted units, as on the float32 organism
    assert {p.dtype for p in loaded.model.model.vision_tower.parameters()} == {torch.float16}
    assert loaded.model.surgery_compute_dtype == torch.float32
    from surgery.core.images import builtin_images

    found = tmp_path / "found.json"
    assert main(["find", str(src), "--images", str(builtin_images()), "--out", str(found), "-q"]) == 0
    assert {int(k): sorted(v) for k, v in json.loads(found.read_text())["register_neurons"].items()} == PLANTED
    res = run_convert(loaded, tmp_path / "out", neurons=str(neurons_file), progress=False)
    assert res.report.passed, res.report.summary()
    assert {t.dtype for t in assert_tensors(tmp_path / "out").values() if t.is_floating_point()} == {torch.float16}
    # the judged model is the one users load: buffers the model builds in float32 (the rotary `inv_freq`)
    # are not rounded to the stored dtype (at 7B a float16 inv_freq alone moves the logits by ~1e-2)
    from transformers import AutoModelForImageTextToText

    judged = load_model(str(tmp_path / "out"))
    users = AutoModelForImageTextToText.from_pretrained(tmp_path / "out", trust_remote_code=True, dtype=torch.float16)
    rotary = [n for n, _ in users.named_buffers() if n.endswith("inv_freq")]
    assert rotary
    for name in rotary:
        mine, theirs = judged.model.get_buffer(name), users.get_buffer(name)
        assert mine.dtype == theirs.dtype == torch.float32 and torch.equal(mine, theirs), name
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "out", bad)
    _scale(bad, "layers.3.mlp.fc2.weight", 1.05)
    wrong = load_model(str(bad))
    assert getattr(wrong.model, "surgery_compute_dtype", None) == torch.float32
    report, _ = run_check(wrong, parity_batches(wrong, None, 2, 2, 0, False), source=load_model(str(src)).model)
    failed = {e.name for e in report.failures()}
    assert not report.passed and {"image_features", "logits"} <= failed, report.summary()


def assert_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from tests.vlm.test_vlm import stored_tensors

    return stored_tensors(folder)


def test_a_010_vlm_folder_loads_with_its_branches_folded_back(sharded, tmp_path):
    """A converted VLM folder in vit-surgery 0.1.0's layout (each split MLP's fc1 rows in `reg_fc1`, zero in fc1:
    tests/core/test_legacy_layout.py) loads through the streamed reader as the folder written now."""
    from safetensors.torch import load_file, save_file

    _, out = sharded["hub"]
    legacy = tmp_path / "legacy"
    shutil.copytree(out, legacy)
    index_path = legacy / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    wmap = index["weight_map"]
    mlps = sorted(n[: -len("reg_fc2.weight")] for n in wmap if n.endswith(".mlp.reg_fc2.weight"))
    assert mlps
    shards: dict[str, dict[str, torch.Tensor]] = {}

    def shard_of(name: str) -> dict[str, torch.Tensor]:
        f = wmap[name]
        if f not in shards:
            shards[f] = load_file(str(legacy / f))
        return shards[f]

    for mlp in mlps:
        units = shard_of(mlp + "units")[mlp + "units"]
        for leaf in ("weight", "bias"):
            fc1 = shard_of(mlp + "fc1." + leaf)[mlp + "fc1." + leaf]
            branch = fc1[units].clone()
            fc1[units] = 0
            shard_of(mlp + "fc1." + leaf)[mlp + "reg_fc1." + leaf] = branch
            wmap[mlp + "reg_fc1." + leaf] = wmap[mlp + "fc1." + leaf]
    for f, tensors in shards.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(legacy / f), metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))

    now, then = load_model(str(out)), load_model(str(legacy))
    now_sd, then_sd = now.model.state_dict(), then.model.state_dict()
    resident = [k for k, v in now_sd.items() if v.device.type != "meta"]
    assert any(k.endswith("mlp.fc1.weight") for k in resident)
    for k in resident:
        assert torch.equal(then_sd[k], now_sd[k]), k
    assert not any("reg_fc1" in k for k in then_sd)
