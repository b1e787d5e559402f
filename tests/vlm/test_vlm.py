"""Vision-language models: LLaVA with a CLIP tower (strategies `default` / `full`, one feature layer or a
list) and with a SigLIP tower (no CLS: every tower token is an image feature), LLaVA-NeXT (any-resolution
tiles), LLaVA-OneVision (tiles, SigLIP tower) and PaliGemma (SigLIP tower, Gemma).

Tiny VLMs (planted tower organism + 2-layer Llama + a local WordLevel tokenizer + LlavaProcessor) are
written by transformers' own `save_pretrained` and served through folders and a fake offline hub cache.
The judge here is independent of the code under test: the *unmodified* VLM, loaded by transformers
alone, runs in float64 with the rule of tests/helpers/rule_reference.py hooked into its tower and the register
row dropped in front of the projector by a test-side hook; the converted folder, loaded the way users
load it (`AutoModelForImageTextToText.from_pretrained(OUT, trust_remote_code=True)`), must give the same
logits on inputs made by the folder's own processor.
"""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers.rule_reference import per_vector_relative, rule_reference
from surgery.backends import load_model
from surgery.backends.hf.adapter import HF_CLIP
from surgery.backends.hf.dinov3_siglip import HF_SIGLIP
from surgery.cli import main
from surgery.core.images import builtin_images
from surgery.organisms.vit import write_organism_images
from surgery.organisms.families import write_fake_hub_repo
from surgery.organisms.vlm import (build_llava_next_organism, build_llava_next_processor,
                                   build_llava_onevision_organism, build_llava_onevision_processor, build_llava_organism,
                                   build_llava_processor, build_paligemma_organism, save_vlm_organism)
from surgery.pipeline import run_convert

PLANTED = {2: [17, 101], 3: [42]}
TOWER = "model.vision_tower."  # state-dict names of the tower's tensors
PROMPT = "USER: <image> what is in the image ? ASSISTANT:"
# (tower, strategy, vision_feature_layer); "next-": LLaVA-NeXT, "onevision-": LLaVA-OneVision (both with
# any-resolution tiles)
CASES = {"clip-default": ("clip", "default", -2), "clip-full-layers": ("clip", "full", [-2, -5]),
         "siglip-full": ("siglip", "full", -1), "next-clip-default": ("clip", "default", -2),
         "next-siglip-full": ("siglip", "full", -1), "onevision-siglip-full": ("siglip", "full", -1),
         "paligemma": ("siglip", "full", None)}
TILED = ("next-", "onevision-")


def save_case(root: Path, tower: str, strategy: str, layer, *, dtype=torch.float32, next_: bool = False,
              paligemma: bool = False, onevision: bool = False) -> Path:
    if paligemma:
        model, processor, planting = build_paligemma_organism(0)
    elif onevision:
        model, planting = build_llava_onevision_organism(0, tower=tower, strategy=strategy, feature_layer=layer)
        processor = build_llava_onevision_processor(strategy, cls_token=tower == "clip")
    elif next_:
        model, planting = build_llava_next_organism(0, strategy=strategy, feature_layer=layer, tower=tower)
        processor = build_llava_next_processor(strategy, cls_token=tower == "clip")
    else:
        model, planting = build_llava_organism(0, strategy=strategy, feature_layer=layer, tower=tower)
        processor = build_llava_processor(strategy, cls_token=tower == "clip")
    assert planting.neurons == PLANTED
    return save_vlm_organism(model.to(dtype), processor, root)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_organism_images(tmp_path_factory.mktemp("vlm_images"), count=4, seed=3)


@pytest.fixture(scope="module")
def neurons_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("vlm_neurons") / "neurons.json"
    path.write_text(json.dumps({"register_neurons": {str(k): v for k, v in PLANTED.items()}}))
    return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory, neurons_file):
    """case -> (source folder, converted folder), converted with the planted neurons."""
    root = tmp_path_factory.mktemp("vlm")
    out = {}
    for name, (tower, strategy, layer) in CASES.items():
        src = save_case(root / name / "src", tower, strategy, layer, next_=name.startswith("next-"),
                        paligemma=name == "paligemma", onevision=name.startswith("onevision-"))
        res = run_convert(load_model(str(src)), root / name / "out", neurons=str(neurons_file), progress=False)
        assert res.report.passed, res.report.summary()
        out[name] = (src, root / name / "out")
    return out


def processor_inputs(folder: Path, images: list[Path], stretch: bool = False) -> dict:
    """The folder's own processor on the images (`stretch`: each a different aspect ratio, so LLaVA-NeXT
    picks different tile grids and unpads differently within one batch)."""
    from PIL import Image
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(folder)
    pics = [Image.open(p).convert("RGB") for p in images]
    if stretch:
        pics = [im.resize((64 + 32 * (i % 3), 64 + 32 * (i // 3 % 2))) for i, im in enumerate(pics)]
    return dict(proc(images=pics, text=[PROMPT] * len(pics), return_tensors="pt", padding=True))


@contextlib.contextmanager
def independent_reference(vlm, tower_kind: str, strategy: str):
    """The rule on the stock VLM's tower (tests/helpers/rule_reference.py) and, in front of the projector, the
    register row removed: the register sits right after the tower's CLS (CLIP) or first (SigLIP), so it
    is feature row 0 when the VLM drops CLS (`default`) or there is no CLS, row 1 under `full` with CLS."""
    tower = vlm.model.vision_tower
    fam = HF_CLIP if tower_kind == "clip" else HF_SIGLIP
    row = 1 if (tower_kind == "clip" and strategy == "full") else 0

    def drop(_m, args):
        x = args[0]
        return (torch.cat([x[:, :row], x[:, row + 1:]], dim=1),) + tuple(args[1:])

    handle = vlm.model.multi_modal_projector.register_forward_pre_hook(drop)
    try:
        with rule_reference(tower, PLANTED, family=fam):
            yield vlm
    finally:
        handle.remove()


def forward_hooks(model: torch.nn.Module) -> dict[tuple[str, str], str]:
    """(module name, pre / post) -> the hook functions' names, for every module holding a forward (pre-)hook."""
    found = {}
    for name, module in model.named_modules():
        for kind, hooks in (("pre", module._forward_pre_hooks), ("post", module._forward_hooks)):
            if hooks:
                found[(name, kind)] = ",".join(sorted(getattr(h, "__name__", repr(h)) for h in hooks.values()))
    return found


@pytest.mark.parametrize("case", list(CASES))
def test_converted_vlm_matches_the_independent_reference(case, converted, images):
    from transformers import AutoModelForImageTextToText

    tower, strategy, layer = CASES[case]
    src, out = converted[case]
    stretch = case.startswith(TILED)
    inputs = processor_inputs(out, images, stretch)
    inputs["pixel_values"] = inputs["pixel_values"].double()
    baked = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True, dtype=torch.float64).eval()
    stock = AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float64).eval()  # transformers alone
    assert type(baked).__name__ == f"VitSurgery{type(stock).__name__}"
    # the register rows leave the tower's outputs through its class, in the module graph: no hook at all
    assert forward_hooks(baked) == {}
    assert type(baked.model.vision_tower).__name__ == f"RegisterDropping{type(stock.model.vision_tower).__name__}"
    with torch.no_grad():
        got = baked(**inputs).logits
        plain = stock(**inputs).logits
        with independent_reference(stock, tower, strategy):
            want = stock(**inputs).logits
    assert float(per_vector_relative(got, want).max()) < 1e-9
    # after a forward, only the hooks transformers 5 itself installs to record hidden states (the stock VLM's too)
    assert set(forward_hooks(baked).values()) <= {"output_capturing_hook"}
    assert set(forward_hooks(baked).values()) == set(forward_hooks(stock).values())
    assert float(per_vector_relative(plain, want).max()) > 1e-3  # the fix changes what the LM sees
    # same placeholders as the source's processor: nothing downstream of the tower changed
    assert torch.equal(inputs["input_ids"], processor_inputs(src, images, stretch)["input_ids"])


def stored_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's safetensors files under its stored name (safetensors' own reading)."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def assert_only_the_tower_changed(src: Path, out: Path, tower_prefix: str) -> int:
    """OUT has the source's files (and index) and tensor names outside the tower; each of those tensors
    is the source's byte for byte (dtype, shape, bytes); at least one tower tensor changed. Returns the
    number of unchanged tensors."""
    source, written = stored_tensors(src), stored_tensors(out)
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in src.glob("*.safetensors"))
    assert (out / "model.safetensors.index.json").exists() == (src / "model.safetensors.index.json").exists()
    outside = [k for k in source if not k.startswith(tower_prefix)]
    assert outside and set(outside) <= set(written)
    for k in outside:
        a, b = source[k], written[k]
        assert a.dtype == b.dtype and a.shape == b.shape, k
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), k
    assert not set(written) - set(source) - {k for k in written if k.startswith(tower_prefix)}
    assert any(not torch.equal(written[k], v) for k, v in source.items() if k.startswith(tower_prefix) and k in written)
    if (src / "model.safetensors.index.json").exists():
        index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
        assert set(index) == set(written)  # the branch's new tensors are named in the index
        for name, file in index.items():
            assert name in stored_tensors_in(out / file)
    return len(outside)


def stored_tensors_in(path: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("case", list(CASES))
def test_only_the_tower_changed_and_the_folder_is_whole(case, converted):
    """transformers' own save_pretrained names (a single model.safetensors): kept, unchanged byte for byte."""
    src, out = converted[case]
    count = assert_only_the_tower_changed(src, out, "vision_tower.")
    for name in ("processor_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "generation_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    doc = json.loads((out / "surgery.json").read_text())
    assert doc["unchanged_tensors"]["count"] == count
    card = (out / "README.md").read_text()
    assert "pipeline_tag: image-text-to-text" in card and "AutoModelForImageTextToText" in card
    parity = json.loads((out / "parity.json").read_text())["parity"]
    assert {o["name"] for o in parity["outputs"]} >= {"image_features", "logits"}


def test_every_vlm_family_is_converted_here(converted):
    """Each adapter of each VLM family record (surgery/backends/hf/family.py) is the one a converted case
    loads with: a VLM family registered without a case above fails."""
    from surgery.backends.hf.family import vlm_families

    names = {load_model(str(out)).adapter.name for _, out in converted.values()}
    assert names == {a.name for f in vlm_families() for a in f.adapters}


def test_batched_generate_and_check(converted, images, capsys):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    _, out = converted["clip-default"]
    model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True).eval()
    inputs = processor_inputs(out, images[:3])
    gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert gen.shape == (3, inputs["input_ids"].shape[1] + 3)
    one = model.generate(**processor_inputs(out, images[1:2]), max_new_tokens=3, do_sample=False)
    assert torch.equal(one[0, -3:], gen[1, -3:])  # batch size does not matter
    AutoProcessor.from_pretrained(out).batch_decode(gen[:, -3:])
    code = main(["check", str(out)])
    stdout, err = capsys.readouterr()
    assert code == 0 and "parity PASS" in stdout, err


@pytest.mark.parametrize("case", ["clip-default", "next-clip-default", "paligemma"])
def test_stock_transformers_refuses_a_converted_vlm(case, converted, images):
    """No stock loader path returns the VLM with its register units zeroed: the VLM class (any kwargs), the
    auto classes, `pipeline` and the tower class on the folder all raise; the processor and tokenizer load
    without remote code; the remote-code class loads in float16."""
    import transformers
    from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    from surgery.backends.hf.stock_refusal import STOCK_REFUSAL

    src, out = converted[case]
    stock = getattr(transformers, json.loads((out / "config.json").read_text())["vit_surgery"]["base_class"])
    tower = {"clip": transformers.CLIPVisionModel, "siglip": transformers.SiglipVisionModel}[CASES[case][0]]
    loads = [lambda: AutoModelForImageTextToText.from_pretrained(out), lambda: AutoModel.from_pretrained(out),
             lambda: transformers.AutoConfig.from_pretrained(out), lambda: tower.from_pretrained(out),
             lambda: transformers.pipeline("image-text-to-text", model=str(out))]
    for kwargs in ({}, {"attn_implementation": "sdpa"}, {"attn_implementation": "eager"}, {"dtype": torch.float16},
                   {"ignore_mismatched_sizes": True}):
        loads.append(lambda kw=kwargs: stock.from_pretrained(out, **kw))
    for load in loads:
        with pytest.raises(ValueError) as info:
            load()
        assert STOCK_REFUSAL in str(info.value)
    AutoProcessor.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True, dtype=torch.float16).eval()
    assert type(model).__name__ == f"VitSurgery{stock.__name__}" and model.dtype == torch.float16
    inputs = processor_inputs(out, images[:1], case.startswith(TILED))
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.float16)
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits.float()).all()


@pytest.mark.parametrize("case", ["next-siglip-full", "onevision-siglip-full"])
def test_find_on_a_tiled_vlm_recovers_the_planted_units(case, converted, tmp_path, capsys):
    """Discovery through the VLM's own tiling processor (each tile an image to the tower)."""
    src, _ = converted[case]
    code = main(["find", str(src), "--images", str(builtin_images()), "--out", str(tmp_path / "n.json"), "-q"])
    assert code == 0, capsys.readouterr().err
    found = json.loads((tmp_path / "n.json").read_text())["register_neurons"]
    assert {int(k): sorted(v) for k, v in found.items()} == PLANTED


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    return cache


def test_find_and_convert_from_the_hub_in_float16(fake_hub, tmp_path, capsys):
    """Discovery on the tower alone, with the VLM's own processor, finds the planted units; a float16
    checkpoint is written in float16 and generates. (bfloat16: the standalone HF CLIP organism's own
    bfloat16 convert misses the judge's half-precision allowance on CPU, VLM or not.)"""
    from transformers import AutoModelForImageTextToText

    src = save_case(tmp_path / "src", "clip", "default", -2, dtype=torch.float16)
    write_fake_hub_repo(fake_hub, "vit-surgery-test/llava", {p.name: p for p in src.iterdir()})
    code = main(["find", "hf:vit-surgery-test/llava", "--images", str(builtin_images()), "--out",
                 str(tmp_path / "n.json"), "-q"])
    _, err = capsys.readouterr()
    assert code == 0, err
    found = json.loads((tmp_path / "n.json").read_text())["register_neurons"]
    assert {int(k): v for k, v in found.items()} == PLANTED
    code = main(["convert", "hf:vit-surgery-test/llava", "--neurons", str(tmp_path / "n.json"),
                 "--out", str(tmp_path / "out"), "-q"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float16"
    assert_only_the_tower_changed(src, tmp_path / "out", "vision_tower.")
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "out", trust_remote_code=True, dtype="auto")
    assert next(model.parameters()).dtype == torch.float16
    inputs = processor_inputs(tmp_path / "out", list(builtin_images().glob("*.png"))[:2])
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.float16)
    assert model.generate(**inputs, max_new_tokens=2, do_sample=False).shape[0] == 2


def _bad_strategy(src: Path) -> None:
    cfg = json.loads((src / "config.json").read_text())
    cfg["vision_feature_select_strategy"] = "spatial_pool"
    (src / "config.json").write_text(json.dumps(cfg))


def _unsupported_tower(root: Path) -> Path:
    from transformers import Dinov2Config, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    cfg = LlavaConfig(vision_config=Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                 intermediate_size=64, image_size=32, patch_size=8).to_dict(),
                      text_config=LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                              num_attention_heads=2).to_dict(), image_token_id=4)
    LlavaForConditionalGeneration(cfg).save_pretrained(root)
    build_llava_processor().save_pretrained(root)
    return root


@pytest.mark.parametrize("kind, words", [("strategy", "vision_feature_select_strategy"),
                                         ("processor", "no image processor"),
                                         ("tower", "vision tower is a 'dinov2'"),
                                         ("onevision-clip", "LlavaOnevisionForConditionalGeneration with a "
                                                            "CLIPVisionModel tower")])
def test_bad_vlms_are_refused_in_one_line(kind, words, converted, tmp_path, neurons_file, capsys):
    if kind == "tower":
        src = _unsupported_tower(tmp_path / "src")
    elif kind == "onevision-clip":  # released OneVision models have SigLIP towers; no other is baked
        model, _ = build_llava_onevision_organism(0, tower="clip", strategy="default", feature_layer=-2)
        src = save_vlm_organism(model, build_llava_onevision_processor("default", cls_token=True), tmp_path / "src")
    else:
        src = tmp_path / "src"
        shutil.copytree(converted["clip-default"][0], src)
        if kind == "strategy":
            _bad_strategy(src)
        else:
            for name in ("processor_config.json", "preprocessor_config.json"):
                (src / name).unlink(missing_ok=True)
    out = tmp_path / "out"
    capsys.readouterr()  # the fixture's own save_pretrained chatter
    code = main(["convert", str(src), "--neurons", str(neurons_file), "--out", str(out), "-q"])
    _, err = capsys.readouterr()
    assert code == 4 and err.count("\n") == 1 and words in err and "Traceback" not in err, err
    assert not out.exists()


@pytest.mark.parametrize("case", ["clip-default", "next-clip-default", "onevision-siglip-full"])
def test_inspect_shows_the_language_models_attention_to_the_image(case, converted, images, tmp_path, capsys):
    _, out = converted[case]
    code = main(["inspect", str(out), "--images", str(images[0].parent), "--out", str(tmp_path / "rep"),
                 "--num-images", "4", "--show", "2", "-q"])
    _, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    lm = summary["lm_attention"]
    for side in ("original", "baked"):
        assert 0 < lm[side]["image_attention_share"] <= 1 and 0 < lm[side]["top1pct_image_attention_share"] <= 1
    assert (tmp_path / "rep" / "lm_attention_maps.png").is_file()
    assert "last text token" in (tmp_path / "rep" / "report.html").read_text()


def test_a_tiled_vlms_figures_show_each_images_whole_image_tile():
    """LLaVA-NeXT / OneVision give the tower several tiles per image, tile 0 the whole image: image i's maps
    are row i * tiles of the tower's outputs, its picture tile 0."""
    import numpy as np

    from surgery.report.measure import _keep_shown, _Sums

    B, tiles, n = 3, 5, 4
    rows = torch.arange(B * tiles, dtype=torch.float32)[:, None].expand(B * tiles, n)  # row r holds r
    side = {"norms": rows, "attn": rows, "mask": rows > 0, "register_attn": rows[:, 0]}
    pixels = torch.stack([torch.full((tiles, 3, 2, 2), i / B) for i in range(B)])
    pixels[:, 1:] = 1.0  # only tile 0 is the whole image
    identity = (np.zeros((3, 1, 1)), np.ones((3, 1, 1)))  # un-normalising leaves the values as they are
    sums = _Sums(depth=1)
    _keep_shown(sums, [f"img{i}.png" for i in range(B)], pixels, {"original": side}, show=B, stats_px=identity)
    for i, item in enumerate(sums.shown):
        assert item["original"]["norms"].tolist() == [i * tiles] * n and item["original"]["register_attn"] == i * tiles
        assert item["pixels"].shape == (2, 2, 3) and np.allclose(item["pixels"], i / B)


@pytest.mark.parametrize("case", ["clip-full-layers", "paligemma"])
def test_vision_encoder_onnx_matches_the_independent_reference(case, converted, images, capsys):
    """onnx/vision_encoder.onnx gives the projector's output of the independent reference: one row per
    <image> placeholder (register removed), run by onnxruntime on the folder's own processor output."""
    import onnxruntime as ort
    from transformers import AutoModelForImageTextToText

    tower, strategy, _ = CASES[case]
    src, out = converted[case]
    for fmt in ("onnx", "openvino"):  # the whole-model layouts are refused: a VLM exports its vision encoder
        code = main(["export", str(out), "--format", fmt, "-q"])
        _, err = capsys.readouterr()
        assert code == 4 and "--layout hf" in err and err.count("\n") == 1, err
    code = main(["export", str(out), "--format", "onnx", "--layout", "hf", "-q"])
    _, err = capsys.readouterr()
    assert code == 0, err
    inputs = processor_inputs(out, images[:3])
    session = ort.InferenceSession(str(out / "onnx" / "vision_encoder.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(["image_features"], {"pixel_values": inputs["pixel_values"].numpy()})[0]
    stock = AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float64).eval()
    placeholders = int((inputs["input_ids"][0] == stock.config.image_token_id).sum())
    assert got.shape[:2] == (3, placeholders)
    projected = []
    hook = stock.model.multi_modal_projector.register_forward_hook(lambda _m, _a, o: projected.append(o))
    with torch.no_grad(), independent_reference(stock, tower, strategy):
        stock(**{**inputs, "pixel_values": inputs["pixel_values"].double()})
    hook.remove()
    assert float(per_vector_relative(torch.from_numpy(got), projected[0]).max()) < 1e-5
    assert "vision_encoder.onnx" in json.loads((out / "parity.json").read_text())["onnx_hf_layout"]


def test_llava_next_vision_encoder_onnx_is_refused_in_one_line(converted, capsys):
    """LLaVA-NeXT packs its tiles' features (unpadding, newline rows) outside a pixel_values graph."""
    _, out = converted["next-clip-default"]
    code = main(["export", str(out), "--format", "onnx", "--layout", "hf", "-q"])
    _, err = capsys.readouterr()
    assert code == 4 and "LlavaNextForConditionalGeneration" in err and err.count("\n") == 1, err
    assert not (out / "onnx").exists()


@pytest.mark.slow
def test_real_size_llava_converts_and_generates(tmp_path):
    """CLIP ViT-L/14-336 tower (LLaVA-1.5's) + 2-layer Llama: convert (CLI, its own parity check), reload the
    whole VLM with transformers and generate. Prints time and peak memory (benchmarks/RESULTS.md)."""
    import resource
    import subprocess
    import sys
    import time

    from transformers import AutoModelForImageTextToText

    from surgery.organisms.vlm import build_llava_real_size

    model, processor = build_llava_real_size(0)
    src = save_vlm_organism(model, processor, tmp_path / "src")
    del model
    nf = tmp_path / "n.json"
    nf.write_text(json.dumps({"register_neurons": {"10": [1, 2, 3], "12": [7]}}))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "surgery.cli", "convert", str(src), "--neurons", str(nf),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    assert proc.returncode == 0, proc.stderr
    assert "parity PASS" in proc.stdout
    print(f"real-size LLaVA convert: {seconds:.0f} s, peak RSS {peak:.0f} MiB; {proc.stdout.strip()}")
    baked = AutoModelForImageTextToText.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    inputs = processor_inputs(tmp_path / "out", list(builtin_images().glob("*.png"))[:2])
    assert inputs["input_ids"].shape[1] > 576  # 576 image tokens per image, as in the source
    assert baked.generate(**inputs, max_new_tokens=2, do_sample=False).shape[0] == 2
