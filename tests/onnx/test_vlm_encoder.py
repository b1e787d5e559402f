"""A VLM's `vision_encoder.onnx` as onnx-community / transformers.js ship it, as the MODEL.

Source files: the *unbaked* LLaVA organism (planted HF CLIP tower, 2-layer Llama; PaliGemma: planted HF
SigLIP tower, every token, 2-layer Gemma) exported by torch
through the wrapper of vit-surgery's own vision-encoder export: input `pixel_values`, output
`image_features` (the hidden state of `vision_feature_layer`, an intermediate block here, the select
strategy applied, through the multimodal projector). The judge is independent of the code under test:
the stock VLM in float64 with the rule of tests/helpers/rule_reference.py hooked into its tower and the register
row dropped in front of the projector by a test-side hook (as tests/vlm/test_vlm.py judges the PyTorch
conversion). The register must leave `image_features`: the language model sees the source's token count.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from tests.helpers import pixels_from
from tests.helpers.rule_reference import per_vector_relative, rule_reference
from surgery.backends.hf.adapter import HF_CLIP
from surgery.backends.hf.dinov3_siglip import HF_SIGLIP
from surgery.cli import main
from surgery.core.images import builtin_images
from surgery.core.images import split_batches
from surgery.organisms.onnx_graphs import export_vision_encoder_source, export_vlm_language_side, make_variant
from surgery.organisms.vlm import build_llava_organism, build_llava_processor, build_paligemma_organism

PLANTED = {2: [17, 101], 3: [42]}
# (vision_feature_select_strategy, vision_feature_layer, torch exporter, language model width); at width 64
# (the tower's) the projector Linear -> GELU -> Linear is 64 -> 64 -> 64, shaped like a block's MLP
# strategy "paligemma": PaliGemma (SigLIP tower, no CLS, its last_hidden_state through one Linear)
CASES = {"default-2-dynamo": ("default", -2, "dynamo", 48), "full-layers-legacy": ("full", [-2, -5], "legacy", 48),
         "default-2-square-projector": ("default", -2, "dynamo", 64),
         "paligemma-dynamo": ("paligemma", None, "dynamo", 48)}


def _sessions(*paths: Path) -> list[ort.InferenceSession]:
    return [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in paths]


def _io(sess: ort.InferenceSession) -> tuple[list, list]:
    return ([(i.name, i.type, i.shape) for i in sess.get_inputs()],
            [(o.name, o.type, o.shape) for o in sess.get_outputs()])


def _write_source(folder: Path, strategy: str, layer, exporter: str, width: int = 48) -> tuple[torch.nn.Module, Path]:
    """folder/vision_encoder.onnx + preprocessor_config.json (the processor's image processor, as hub repos ship it)."""
    if strategy == "paligemma":
        vlm, processor, planting = build_paligemma_organism(0)
    else:
        vlm, planting = build_llava_organism(0, strategy=strategy, feature_layer=layer, text_hidden_size=width)
        processor = build_llava_processor(strategy)
    assert planting.neurons == PLANTED
    path = export_vision_encoder_source(vlm, folder / "vision_encoder.onnx", exporter=exporter)
    processor.image_processor.save_pretrained(folder)
    return vlm, path


def _independent_image_features(vlm, strategy: str, layer, pixels: torch.Tensor) -> torch.Tensor:
    """The projector's output of the stock VLM (float64) with the rule hooked into its tower and the
    register row removed in front of the projector (right after CLS: feature row 1 under `full`, row 0
    once `default` dropped CLS)."""
    import copy

    stock = copy.deepcopy(vlm).double()
    row = 1 if strategy == "full" else 0  # PaliGemma: no CLS, the register is row 0

    def drop(_m, args):
        x = args[0]
        return (torch.cat([x[:, :row], x[:, row + 1:]], dim=1),) + tuple(args[1:])

    projected = []
    hooks = [stock.model.multi_modal_projector.register_forward_pre_hook(drop),
             stock.model.multi_modal_projector.register_forward_hook(lambda _m, _a, o: projected.append(o))]
    try:
        family = HF_SIGLIP if strategy == "paligemma" else HF_CLIP
        with torch.no_grad(), rule_reference(stock.model.vision_tower, PLANTED, family=family):
            if strategy == "paligemma":
                stock.model.get_image_features(pixel_values=pixels.double())
            else:
                stock.model.get_image_features(pixel_values=pixels.double(), vision_feature_layer=layer,
                                               vision_feature_select_strategy=strategy)
    finally:
        for h in hooks:
            h.remove()
    return projected[0]


@pytest.mark.parametrize("case", list(CASES))
def test_vision_encoder_find_convert_check(case, tmp_path, capsys):
    strategy, layer, exporter, width = CASES[case]
    vlm, src = _write_source(tmp_path / "src", strategy, layer, exporter, width)
    images = builtin_images()
    assert main(["find", str(src), "--images", str(images), "--out", str(tmp_path / "n.json"), "-q"]) == 0
    found = json.loads((tmp_path / "n.json").read_text())["register_neurons"]
    assert {int(k): v for k, v in found.items()} == PLANTED  # exactly the planted units
    out = tmp_path / "out"
    assert main(["convert", str(src), "--neurons", str(tmp_path / "n.json"), "--check-images", str(images),
                 "--out", str(out), "-q"]) == 0
    parity = json.loads((out / "parity.json").read_text())["onnx"]
    assert parity["passed"] and parity["batch_sizes"][:2] == [1, 3]
    baked, source = _sessions(out / "model.onnx", src)
    assert _io(baked) == _io(source)  # same names, types and shapes: the decoder side is unchanged
    # against the independent reference, on the folder's own preprocessing
    import timm.data

    from surgery.onnx_graph import recognise
    from surgery.onnx_graph.discover import preprocess_config

    cfg, origin = preprocess_config(recognise(src))
    assert origin.endswith("preprocessor_config.json")
    tf = timm.data.create_transform(input_size=tuple(cfg["input_size"]), interpolation=cfg["interpolation"],
                                    mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), crop_pct=cfg["crop_pct"])
    for x in split_batches(pixels_from(images, tf, 11), [1, 2, 8]):
        got = baked.run(["image_features"], {"pixel_values": x.numpy()})[0]
        want = _independent_image_features(vlm, strategy, layer, x)
        assert got.shape == tuple(want.shape) == (len(x), source.get_outputs()[0].shape[1], width)
        assert float(per_vector_relative(torch.from_numpy(got), want).max()) < 1e-5
    capsys.readouterr()
    assert main(["check", str(out / "model.onnx"), "--source", str(src), "--images", str(images), "-q"]) == 0


VARIANTS = {"vision_encoder_fp16.onnx": "fp16", "vision_encoder_quantized.onnx": "int8_per_tensor",
            "vision_encoder_q4.onnx": "q4"}


@pytest.fixture(scope="module")
def vlm_repo(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """An HF-layout ONNX VLM repo: config / processor files by save_pretrained, onnx/vision_encoder.onnx and
    its variants (made by onnxruntime's tools), onnx/embed_tokens.onnx and onnx/decoder_model_merged.onnx."""
    repo = tmp_path_factory.mktemp("vlm_repo")
    vlm, src = _write_source(repo / "onnx", "default", -2, "dynamo")
    (repo / "onnx" / "preprocessor_config.json").replace(repo / "preprocessor_config.json")
    for name, kind in VARIANTS.items():
        make_variant(src, repo / "onnx" / name, kind)
    export_vlm_language_side(vlm, repo / "onnx")
    vlm.config.save_pretrained(repo)
    vlm.generation_config.save_pretrained(repo)
    build_llava_processor("default").tokenizer.save_pretrained(repo)
    return repo, vlm


def test_vlm_onnx_folder_converts_every_vision_file_and_copies_the_language_side(vlm_repo, tmp_path, capsys, caplog):
    import logging

    repo, vlm = vlm_repo
    out = tmp_path / "out"
    caplog.set_level(logging.INFO, logger="surgery")  # each step's line is logged (printed only with progress on)
    assert main(["convert", str(repo), "--images", str(builtin_images()), "--out", str(out)]) == 0
    assert "copied onnx/decoder_model_merged.onnx unchanged" in caplog.text
    src_files = sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file())
    out_files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert out_files == sorted(src_files + ["neurons.json", "parity.json", "surgery.json"])
    doc = json.loads((out / "neurons.json").read_text())
    assert {int(k): v for k, v in doc["register_neurons"].items()} == PLANTED  # found on vision_encoder.onnx
    for name in ("embed_tokens.onnx", "decoder_model_merged.onnx", "config.json", "preprocessor_config.json",
                 "tokenizer.json"):
        rel = f"onnx/{name}" if name.endswith(".onnx") else name
        assert (out / rel).read_bytes() == (repo / rel).read_bytes(), rel
    parity = json.loads((out / "parity.json").read_text())["onnx_folder"]
    assert parity["passed"]
    assert set(parity["files"]) == {"onnx/vision_encoder.onnx"} | {f"onnx/{n}" for n in VARIANTS}
    assert set(parity["against_fp32"]) == {f"onnx/{n}" for n in VARIANTS}
    assert parity["copied_unchanged"] == {"onnx/decoder_model_merged.onnx": True, "onnx/embed_tokens.onnx": True}
    # every ONNX file of the folder loads in onnxruntime by the source's input / output names, types, shapes
    for p in sorted((repo / "onnx").glob("*.onnx")):
        a, b = _sessions(out / "onnx" / p.name, p)
        assert _io(a) == _io(b), p.name
    # and the rewritten fp32 encoder feeds the language side what the independent reference projects
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32))
    enc, = _sessions(out / "onnx" / "vision_encoder.onnx")
    got = enc.run(["image_features"], {"pixel_values": x.numpy()})[0]
    assert float(per_vector_relative(torch.from_numpy(got), _independent_image_features(vlm, "default", -2, x)).max()) < 1e-5
    assert main(["check", str(out), "--source", str(repo), "--images", str(builtin_images()), "-q"]) == 0


def test_a_changed_language_side_file_fails_the_folder_check(vlm_repo, tmp_path, capsys):
    import shutil

    repo, _ = vlm_repo
    out = tmp_path / "out"
    (tmp_path / "n.json").write_text(json.dumps({"register_neurons": {str(k): v for k, v in PLANTED.items()}}))
    assert main(["convert", str(repo), "--neurons", str(tmp_path / "n.json"), "--out", str(out), "--no-check",
                 "-q"]) == 0
    shutil.copy(repo / "onnx" / "embed_tokens.onnx", out / "onnx" / "decoder_model_merged.onnx")
    capsys.readouterr()
    code = main(["check", str(out), "--source", str(repo), "--images", str(builtin_images()), "-q"])
    err = capsys.readouterr().err  # the integrity record names it first
    assert code == 11 and "onnx/decoder_model_merged.onnx differs from what convert wrote" in err, err
    (out / "surgery.json").unlink()  # without the record, the comparison with the source still finds it
    code = main(["check", str(out), "--source", str(repo), "--images", str(builtin_images()), "-q"])
    err = capsys.readouterr().err
    assert code == 7 and "onnx/decoder_model_merged.onnx: differs from the source" in err, err


@pytest.mark.slow
def test_real_size_llava_vision_encoder(tmp_path):
    """LLaVA-1.5's tower size (CLIP ViT-L/14-336, feature layer -2, strategy default) + its projector, random
    weights: the rewritten vision_encoder.onnx passes its check and keeps the 576 image features."""
    from surgery.core.recipe import Recipe
    from surgery.onnx_graph import convert_onnx
    from surgery.organisms.vlm import build_llava_real_size

    vlm, _ = build_llava_real_size(0)
    src = export_vision_encoder_source(vlm, tmp_path / "src" / "vision_encoder.onnx")
    rng = np.random.default_rng(0)
    batches = [torch.from_numpy(rng.standard_normal((b, 3, 336, 336)).astype(np.float32)) for b in (1, 2)]
    recipe = Recipe(neurons={1: (10, 200), 3: (5, 77, 1000), 5: (3, 31, 2000, 3000, 4000)})
    res = convert_onnx(src, tmp_path / "out", recipe, check_batches=batches)
    assert res.report.passed, res.report.summary()
    baked, source = _sessions(res.out, src)
    assert _io(baked) == _io(source) and source.get_outputs()[0].shape[1] == 576
