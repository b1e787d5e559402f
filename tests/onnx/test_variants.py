"""ONNX variants: ONNX files as the hub ships them: precision variants and HF ONNX repo folders.

The variants are made from an organism's torch export by the tools that make them for the hub:
onnxruntime's `quantize_dynamic` (per-tensor uint8, per-channel int8), `MatMulNBitsQuantizer` (4-bit),
`onnxruntime.transformers.float16.convert_float_to_float16` (all-float16 and float32 I/O) and the
onnxruntime transformer optimizer before float16 conversion. Each rewritten variant is judged against the
hooked reference written into its own source graph (tolerance of its precision) and against the fp32 hooked
reference (within 4x the unbaked variant's own error against the unbaked fp32 model).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests.helpers import pixels_from
from tests.helpers.rule_reference import edit_post_activation
from surgery.backends import adapter_for
from surgery.cli import main
from surgery.core.images import builtin_images
from surgery.core.recipe import Recipe
from surgery.onnx_graph import convert_onnx, recognise
from surgery.core.images import split_batches
from surgery.onnx_graph.discover import measure_layout
from surgery.onnx_graph.linear import dequantized_rows
from surgery.onnx_graph import find_register_neurons_onnx
from surgery.organisms.onnx_graphs import build_organism, export_optimum_style, export_source_onnx, make_variant
from surgery.core.onnx_runtime import as_input
from surgery.onnx_graph.precision import precision_of
from surgery.onnx_graph.variants import judge_against_fp32


VARIANTS = {"fp16": "fp16", "fp16_io32": "fp16", "optimized_fp16": "fp16", "int8_per_tensor": "int8",
            "int8_per_channel": "int8", "q4": "q4", "q4_asym": "q4"}


@pytest.fixture(scope="module")
def organism(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    model, planting = build_organism("timm_clip")
    src = export_source_onnx(model, root / "model.onnx")
    tf = adapter_for(model).data_transform(model)
    batches = split_batches(pixels_from(builtin_images(), tf, 12), [1, 3, 8])
    return root, src, Recipe(neurons=planting.neurons), batches


@pytest.mark.parametrize("kind", sorted(VARIANTS))
def test_variant_converts_and_checks(organism, tmp_path, kind):
    root, src, recipe, batches = organism
    variant = make_variant(src, tmp_path / f"model_{kind}.onnx", kind)
    vit = recognise(variant)
    assert precision_of(vit, measure_layout(vit)) == VARIANTS[kind]
    res = convert_onnx(variant, tmp_path / "out", recipe, check_batches=batches)
    assert res.report.passed, res.report.summary()
    judged = judge_against_fp32(res.out, variant, src, batches, recipe)
    assert judged.passed, judged.summary()
    # the file keeps its precision, loads in onnxruntime under the source's input / output names and types
    sess, src_sess = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (res.out, variant))
    assert [(i.name, i.type) for i in sess.get_inputs()] == [(i.name, i.type) for i in src_sess.get_inputs()]
    assert [(o.name, o.type) for o in sess.get_outputs()] == [(o.name, o.type) for o in src_sess.get_outputs()]
    ops = {n.op_type for n in onnx.load(str(res.out)).graph.node}
    assert {"fp16": "Cast", "int8": "MatMulInteger", "q4": "MatMulNBits"}[VARIANTS[kind]] in ops
    baked = onnx.load(str(res.out))
    assert onnx.TensorProto.DOUBLE not in {i.data_type for i in baked.graph.initializer}  # no float64 anywhere
    assert not [n.name for n in baked.graph.node if n.op_type == "Cast"
                and onnx.helper.get_attribute_value(n.attribute[0]) == onnx.TensorProto.DOUBLE]


def test_a_wrong_bake_cannot_hide_under_quantization_noise(organism, tmp_path):
    """A variant baked with other units passes its own check (its recipe is self-consistent) but fails
    the judgement against the fp32 hooked reference with the right recipe."""
    root, src, recipe, batches = organism
    variant = make_variant(src, tmp_path / "model_quantized.onnx", "int8_per_tensor")
    wrong = Recipe(neurons={2: (5, 6), 3: (7,)})
    res = convert_onnx(variant, tmp_path / "out", wrong, check_batches=batches)
    assert res.report.passed
    judged = judge_against_fp32(res.out, variant, src, batches, recipe)
    assert not judged.passed, judged.summary()


def _rows_by_onnxruntime(path: Path, hidden: str, down: str, H: int) -> np.ndarray:
    """fc2 alone (onnx.utils.extract_model between its input and output), fed the identity: the weight
    rows the runtime computes with."""
    part = path.with_name(path.stem + "_fc2.onnx")
    onnx.utils.extract_model(str(path), str(part), [hidden], [down], check_model=False)
    sess = ort.InferenceSession(str(part), providers=["CPUExecutionProvider"])
    shape = sess.get_inputs()[0].shape  # a fixed token axis: the identity's rows go over a batch
    tokens = shape[1] if len(shape) == 3 and isinstance(shape[1], int) else H
    x = np.zeros((-(-H // tokens) * tokens, H), dtype=np.float32)
    x[np.arange(H), np.arange(H)] = 1
    y = sess.run(None, {hidden: x.reshape(-1, tokens, H)})[0]
    return y.reshape(-1, y.shape[-1])[:H]


def _fc2_int8_parts(proto: onnx.ModelProto, fc2: str) -> tuple[str, list[np.ndarray]]:
    """(name of the float tensor fc2's DynamicQuantizeLinear quantizes, [Wq, W zero point, scales]) of the
    MatMulInteger node named `fc2`, read straight from the file."""
    nodes = {n.name: n for n in proto.graph.node}
    producer = {o: n for n in proto.graph.node for o in n.output}
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    mm = nodes[fc2]
    dq = producer[mm.input[0]]
    assert dq.op_type == "DynamicQuantizeLinear"
    scale_mul = next(n for n in proto.graph.node if n.op_type == "Mul" and dq.output[1] in n.input)
    return dq.input[0], [inits[mm.input[1]], inits[mm.input[3]]] + [inits[v] for v in scale_mul.input if v in inits]


def _run_exposing(path: Path, names: list[str], pixels: np.ndarray) -> list[np.ndarray]:
    """The values `names` of the graph at `path` on `pixels` (made graph outputs of a copy)."""
    proto = onnx.load(str(path))
    del proto.graph.output[:]
    proto.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: as_input(sess, pixels)})


@pytest.mark.parametrize("kind", ["int8_per_tensor", "int8_per_channel", "q4", "q4_asym"])
def test_quantized_rows_are_dequantized_exactly_and_silenced(organism, tmp_path, kind):
    """4-bit: the fc2 rows a branch takes over are the weights the quantized graph computes with, and in the
    rewritten file those rows give exactly zero while every other row is unchanged. Dynamic INT8: no branch;
    fc2 is stored as it was and its (quantized) input is the rule applied to the source's post-activation
    tensor (register units zero on patch rows, signed max on the register row): the quantizer's range is
    taken over that whole tensor, as in the hooked reference."""
    root, src, recipe, batches = organism
    variant = make_variant(src, tmp_path / f"{kind}.onnx", kind)
    vit = recognise(variant)
    site = vit.mlps[2]
    H, hidden, down = site.width, site.hidden.name, site.down.name
    units = np.asarray(sorted(recipe.neurons[2]))
    runtime_rows = _rows_by_onnxruntime(variant, hidden, down, H)
    np.testing.assert_allclose(dequantized_rows(site.fc2, units), runtime_rows[units], rtol=1e-6, atol=1e-7)
    res = convert_onnx(variant, tmp_path / "out", recipe)
    keep = np.setdiff1d(np.arange(H), units)
    if kind.startswith("q4"):
        baked_rows = _rows_by_onnxruntime(res.out, hidden, down, H)
        assert not baked_rows[units].any()
        np.testing.assert_array_equal(baked_rows[keep], runtime_rows[keep])
        return
    src_in, src_parts = _fc2_int8_parts(onnx.load(str(variant)), site.fc2.name)
    fc2_in, parts = _fc2_int8_parts(onnx.load(str(res.out)), site.fc2.name)
    assert src_in == hidden and fc2_in != hidden  # fc2 now reads an edited tensor
    assert len(parts) == len(src_parts) == 3
    for a, b in zip(parts, src_parts):  # weights, zero points, scales: bit for bit as stored
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    p, R = measure_layout(vit).num_prefix, recipe.num_registers
    import torch

    h, got = _run_exposing(res.out, [hidden, fc2_in], batches[1].numpy())
    want = edit_post_activation(torch.from_numpy(h), units.tolist(), p, R, recipe.scale,
                                recipe.mode == "per_neuron").numpy()
    assert np.abs(h[:, p + R:, units]).max() > 0.1  # the units fire on patches: zeroing them is a real edit
    assert not got[:, p + R:, units].any()
    np.testing.assert_array_equal(got[:, :, keep], h[:, :, keep])
    # prefix and register rows: the units' activation recomputed in float32 from fc1's output
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _write_hf_repo(folder: Path, src: Path, kinds: dict[str, str]) -> None:
    from transformers import CLIPImageProcessor, CLIPVisionConfig

    (folder / "onnx").mkdir(parents=True)
    shutil.copy(src, folder / "onnx" / "model.onnx")
    for name, kind in kinds.items():
        make_variant(src, folder / "onnx" / name, kind)
    CLIPVisionConfig(image_size=64, patch_size=8, hidden_size=64, num_attention_heads=4, intermediate_size=256,
                     num_hidden_layers=6).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}, resample=3,
                       image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)


def test_hf_onnx_repo_folder_find_convert_check(organism, tmp_path, capsys):
    root, src, recipe, _ = organism
    repo = tmp_path / "repo"
    _write_hf_repo(repo, src, {"model_fp16.onnx": "fp16", "model_quantized.onnx": "int8_per_tensor",
                               "model_q4.onnx": "q4"})
    out = tmp_path / "out"
    assert main(["convert", str(repo), "--images", str(builtin_images()), "--out", str(out), "-q"]) == 0
    src_files = sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file())
    out_files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert out_files == sorted(src_files + ["neurons.json", "parity.json", "surgery.json"])
    for cfg in ("config.json", "preprocessor_config.json"):
        assert (out / cfg).read_bytes() == (repo / cfg).read_bytes()
    doc = json.loads((out / "neurons.json").read_text())
    assert doc["register_neurons"] == {str(k): list(v) for k, v in recipe.neurons.items()}  # found on model.onnx
    parity = json.loads((out / "parity.json").read_text())["onnx_folder"]
    assert parity["passed"] and set(parity["against_fp32"]) == {"onnx/model_fp16.onnx", "onnx/model_quantized.onnx",
                                                                "onnx/model_q4.onnx"}
    for name in sorted(p.name for p in (repo / "onnx").glob("*.onnx")):  # every file, by the source's names
        a = ort.InferenceSession(str(out / "onnx" / name), providers=["CPUExecutionProvider"])
        b = ort.InferenceSession(str(repo / "onnx" / name), providers=["CPUExecutionProvider"])
        assert [(i.name, i.type) for i in a.get_inputs()] == [(i.name, i.type) for i in b.get_inputs()]
        assert [(o.name, o.type) for o in a.get_outputs()] == [(o.name, o.type) for o in b.get_outputs()]
        meta = {p.key: p.value for p in onnx.load(str(out / "onnx" / name)).metadata_props}
        assert json.loads(meta["vit_surgery.recipe"]) == Recipe(neurons=recipe.neurons).to_dict()
    capsys.readouterr()
    assert main(["check", str(out), "--source", str(repo), "--images", str(builtin_images()), "-q"]) == 0


def test_folder_with_a_file_that_cannot_be_rewritten_is_refused_naming_it(organism, tmp_path, capsys):
    root, src, recipe, _ = organism
    repo = tmp_path / "repo"
    _write_hf_repo(repo, src, {"model_fp16.onnx": "fp16"})
    import torch

    cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    torch.onnx.export(cnn, (torch.zeros(2, 3, 16, 16),), str(repo / "onnx" / "text_model.onnx"), dynamo=False,
                      input_names=["x"])
    (tmp_path / "n.json").write_text(json.dumps({"register_neurons": {"2": [17]}}))
    code = main(["convert", str(repo), "--neurons", str(tmp_path / "n.json"), "--out", str(tmp_path / "o")])
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert code == 4 and len(err) == 1 and "onnx/text_model.onnx" in err[0] and "1 of 3" in err[0], err
    assert not (tmp_path / "o").exists()


def test_matmulnbits_with_float_zero_points_is_refused_naming_the_node(organism, tmp_path, capsys):
    root, src, recipe, _ = organism
    q4 = make_variant(src, tmp_path / "model_q4.onnx", "q4")
    m = onnx.load(str(q4))
    site_fc2 = recognise(q4).mlps[2].fc2.name
    node = next(n for n in m.graph.node if n.name == site_fc2)
    N = next(a.i for a in node.attribute if a.name == "N")
    K = next(a.i for a in node.attribute if a.name == "K")
    zp = onnx.numpy_helper.from_array(np.full((N * ((K + 31) // 32),), 8.25, dtype=np.float32), "float_zp")
    m.graph.initializer.append(zp)
    while len(node.input) < 3:
        node.input.append("")
    node.input.insert(3, "float_zp")
    bad = tmp_path / "bad.onnx"
    onnx.save(m, str(bad))
    (tmp_path / "n.json").write_text(json.dumps({"register_neurons": {"2": [17]}}))
    code = main(["convert", str(bad), "--neurons", str(tmp_path / "n.json"), "--out", str(tmp_path / "o")])
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert code == 4 and len(err) == 1 and site_fc2 in err[0] and "MatMulNBits" in err[0], err


def _vit_b_source(root: Path, shape: str) -> tuple[Path, Recipe]:
    """A ViT-B-size source (random weights) of `shape` and a recipe of ~10 units in blocks <= 5: timm CLIP
    ViT-B/16; HF DINOv2 with the SwiGLU FFN (width 768, 12 blocks, 2048 gated units, 224 px / 14); HF SigLIP
    base (224 px / 16) as optimum writes it."""
    folder = root / shape
    src = folder / "model.onnx"
    recipe = Recipe(neurons={1: (10, 200), 3: (5, 77, 1000), 5: (3, 31, 2000, 2047 if "swiglu" in shape else 3071)})
    if src.is_file():
        return src, recipe
    import torch

    torch.manual_seed(0)
    if shape == "vit_b":
        import timm

        export_source_onnx(timm.create_model("vit_base_patch16_clip_224", pretrained=False).eval(), src)
    elif shape == "dinov2_swiglu_b":
        from transformers import Dinov2Config, Dinov2Model

        model = Dinov2Model(Dinov2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                         image_size=224, patch_size=14, use_swiglu_ffn=True)).eval()
        export_source_onnx(model, src)
        model.config.save_pretrained(folder)
    else:
        from transformers import SiglipVisionConfig, SiglipVisionModel

        export_optimum_style(SiglipVisionModel(SiglipVisionConfig(image_size=224, patch_size=16)).eval(), folder)
    return src, recipe


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fp32", "fp16", "fp16_io32", "int8_per_tensor", "int8_per_channel", "q4"])
@pytest.mark.parametrize("shape", ["vit_b", "dinov2_swiglu_b", "siglip_b"])
def test_vit_b_variant(tmp_path_factory, shape, kind):
    """One ViT-B row per precision and graph shape (random weights). siglip_b with per-channel INT8 caught a
    float branch around fc2's dynamically quantized input (1.75e-2 on the register row: a register unit's
    patch value set the quantizer's range); the bake now edits that input in place (bake._edit_in_place)."""
    root = tmp_path_factory.getbasetemp() / "vitb_variants"
    src, recipe = _vit_b_source(root, shape)
    rng = np.random.default_rng(0)
    import torch

    batches = [torch.from_numpy(rng.standard_normal((b, 3, 224, 224)).astype(np.float32)) for b in (1, 3)]
    width = 768
    variant = src if kind == "fp32" else make_variant(src, src.parent / f"model_{kind}.onnx", kind, num_heads=12,
                                                      hidden_size=width)
    res = convert_onnx(variant, root / f"out_{shape}_{kind}", recipe, check_batches=batches, overwrite=True)
    assert res.report.passed, res.report.summary()
    if kind != "fp32":
        judged = judge_against_fp32(res.out, variant, src, batches, recipe)
        assert judged.passed, judged.summary()


# ---- gated (SwiGLU) MLP and HF SigLIP graph shapes, every precision variant ------------------------------

# shape: (organism, exporter, embedding width). hf_siglip_optimum: HF SigLIP as optimum's exporter writes it
# (pixel_values -> last_hidden_state, pooler_output; dynamic height / width; config.json next to it)
SHAPES = {"hf_dinov2_swiglu": ("hf_dinov2_swiglu", "dynamo", 64), "timm_swiglu": ("timm_swiglu", "legacy", 64),
          "hf_siglip_optimum": ("hf_siglip", "optimum", 96), "hf_clip": ("hf_clip", "dynamo", 64)}
_SHAPE_SOURCES: dict[str, tuple] = {}


@pytest.fixture(scope="module")
def shape_root(tmp_path_factory):
    return tmp_path_factory.mktemp("shapes")


def shape_source(root: Path, shape: str) -> tuple:
    """(fp32 source, planting, organism transform, batches, width); variants go next to the source, in the
    folder that holds its config.json (as in an HF ONNX repo)."""
    if shape not in _SHAPE_SOURCES:
        org, exporter, width = SHAPES[shape]
        model, planting = build_organism(org)
        folder = root / shape
        if exporter == "optimum":
            src = export_optimum_style(model, folder)
        else:
            src = export_source_onnx(model, folder / "model.onnx", exporter=exporter,
                                     opset=17 if exporter == "legacy" else 18)
            if hasattr(model, "config"):
                model.config.save_pretrained(folder)
        tf = adapter_for(model).data_transform(model)
        _SHAPE_SOURCES[shape] = (src, planting, tf, split_batches(pixels_from(builtin_images(), tf, 12), [1, 3, 8]), width)
    return _SHAPE_SOURCES[shape]


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_find_on_the_fp32_graph_recovers_the_planted_units(shape_root, shape):
    src, planting, tf, _, _ = shape_source(shape_root, shape)
    # the optimum layout brings its preprocessor_config.json: find reads it (no transform passed)
    found = find_register_neurons_onnx(src, builtin_images(), transform=None if "optimum" in shape else tf,
                                       progress=False)
    assert dict(found.recipe.neurons) == {k: tuple(v) for k, v in planting.neurons.items()}
    assert found.provenance["onnx"]["gated"] == ("swiglu" in shape)


# one file per precision in the default tier; the optimizer's fp16 and asymmetric 4-bit in the slow one
SHAPE_KINDS = ["fp32", "fp16", "fp16_io32", "int8_per_tensor", "int8_per_channel", "q4"]
SLOW_SHAPE_KINDS = sorted(set(VARIANTS) - set(SHAPE_KINDS))


@pytest.mark.parametrize("kind", SHAPE_KINDS + [pytest.param(k, marks=pytest.mark.slow) for k in SLOW_SHAPE_KINDS])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_shape_variant_converts_and_checks(shape_root, tmp_path, shape, kind):
    src, planting, _, batches, width = shape_source(shape_root, shape)
    recipe = Recipe(neurons=planting.neurons)
    variant = src if kind == "fp32" else make_variant(src, src.parent / f"model_{kind}.onnx", kind,
                                                      hidden_size=width)
    vit = recognise(variant)
    assert precision_of(vit, measure_layout(vit)) == VARIANTS.get(kind, "fp32")
    assert all(m.gated for m in vit.mlps) == ("swiglu" in shape)
    res = convert_onnx(variant, tmp_path / "out", recipe, check_batches=batches)
    assert res.report.passed, res.report.summary()
    if kind != "fp32":
        judged = judge_against_fp32(res.out, variant, src, batches, recipe)
        assert judged.passed, judged.summary()
    # same input / output names and types; token outputs carry the R registers, every other shape is the source's
    sess, src_sess = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (res.out, variant))
    assert [(i.name, i.type) for i in sess.get_inputs()] == [(i.name, i.type) for i in src_sess.get_inputs()]
    assert [(o.name, o.type) for o in sess.get_outputs()] == [(o.name, o.type) for o in src_sess.get_outputs()]
    x = batches[1].numpy()
    got = sess.run(None, {sess.get_inputs()[0].name: as_input(sess, x)})
    want = src_sess.run(None, {src_sess.get_inputs()[0].name: as_input(src_sess, x)})
    R = recipe.num_registers
    assert [g.shape for g in got] == [(w.shape[0], w.shape[1] + R, w.shape[2]) if w.ndim == 3 else w.shape
                                      for w in want]


def test_hf_siglip_onnx_repo_folder(shape_root, tmp_path, capsys):
    """An HF ONNX repo of an HF SigLIP (config.json above onnx/): the head reads the register in every variant,
    as the baked HF model does, and each variant passes against the fp32 hooked reference."""
    src, planting, _, _, _ = shape_source(shape_root, "hf_siglip_optimum")
    repo = tmp_path / "repo"
    (repo / "onnx").mkdir(parents=True)
    for f in ("config.json", "preprocessor_config.json"):
        shutil.copy(src.parent / f, repo / f)
    shutil.copy(src, repo / "onnx" / "model.onnx")
    make_variant(src, repo / "onnx" / "model_quantized.onnx", "int8_per_tensor")
    out = tmp_path / "out"
    assert main(["convert", str(repo), "--images", str(builtin_images()), "--out", str(out), "-q"]) == 0
    doc = json.loads((out / "neurons.json").read_text())
    assert doc["register_neurons"] == {str(k): list(v) for k, v in planting.neurons.items()}
    assert json.loads((out / "parity.json").read_text())["onnx_folder"]["passed"]
    for name in ("model.onnx", "model_quantized.onnx"):
        meta = {p.key: p.value for p in onnx.load(str(out / "onnx" / name)).metadata_props}
        assert "reads the register" in meta["vit_surgery.graph_rewrite"], name
