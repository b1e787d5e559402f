"""The outputs in the clients people use, as those clients use them.

- transformers: no stock loader path (AutoModel, AutoConfig, the concrete class, `pipeline`, whatever the
  keyword arguments) returns a model from an HF output folder: each raises with the stock-refusal text;
  AutoImageProcessor works without remote code and the remote-code classes load the baked model (also
  with those keyword arguments, and again after `save_pretrained`).
- onnxruntime: ONNX exports (plain and HF layout) hold no float64 tensor (onnxruntime 1.30 fuses a
  float64 QuickGELU into `com.microsoft.QuickGelu`, float kernels only) and run at every graph
  optimisation level with the installed onnxruntime, equal to the validated level-ALL outputs; slow
  tier: the same in every onnxruntime of `ORT_VERSIONS` (tests/helpers/client_envs.py) (a cached venv each) and in
  transformers.js 4.x under node (default session options).
- OpenVINO: the IR of an HF folder has HF's output names (what optimum-intel's
  OVModelForFeatureExtraction reads).
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import surgery
from surgery.backends import load_model
from surgery.backends.hf.stock_refusal import STOCK_REFUSAL

from tests.helpers.client_envs import ORT_RUNNER, ORT_VERSIONS, TJS_RUNNER, ort_python, transformers_js_dir
from tests.helpers.client_envs import run_levels as _run_levels

LEVELS = ("disable", "basic", "extended", "all")


def _neurons_file(planting, path: Path) -> Path:
    path.write_text(json.dumps({"register_neurons": {str(k): v for k, v in planting.neurons.items()}}))
    return path


def _hf_folder(kind: str, root: Path) -> Path:
    from surgery.organisms.eva import build_hf_siglip_organism
    from surgery.organisms.families import build_hf_clip_organism, build_hf_dinov2_organism

    model, planting = {"clip": lambda: build_hf_clip_organism(0),  # CLIPVisionModel, hidden_act quick_gelu
                       "clip_model": lambda: build_hf_clip_organism(0, full_clip=True),
                       "dinov2": lambda: build_hf_dinov2_organism(0),
                       "siglip": lambda: build_hf_siglip_organism(0)}[kind]()  # siglip: gelu_pytorch_tanh
    return surgery.convert(model, root / kind, neurons=_neurons_file(planting, root / f"{kind}.json")).out


def _folder_family(kind: str, root: Path) -> Path:
    """A converted timm / open_clip organism folder."""
    import surgery.organisms.families as fams
    from surgery.demo import save_organism
    from surgery.organisms.vit import build_timm_organism
    from surgery.organisms.eva import build_eva_organism

    if kind == "open_clip_quickgelu":
        model, planting = fams.build_open_clip_organism(0, quick_gelu=True)
        src = fams.save_open_clip_organism(model, root / f"{kind}-src")
    else:
        model, planting = {"timm_clip": lambda: build_timm_organism(0, "clip"),
                           "eva_swiglu": lambda: build_eva_organism(0, "dinov3_swiglu")}[kind]()
        src = save_organism(model, root / f"{kind}-src")
    return surgery.convert(str(src), root / kind, neurons=_neurons_file(planting, root / f"{kind}.json")).out


def _export(kind: str, root: Path) -> Path:
    """The validated ONNX export of a family's organism: HF folders in the HF layout, others plain."""
    from surgery.core.output_format import ONNX_FILE
    from surgery.exporters.onnx_publish import export_and_validate
    from surgery.exporters.onnx_hf_layout import export_hf_layout

    if kind.startswith("hf_"):
        out = _hf_folder(kind[3:], root)
        report, onnx_dir = export_hf_layout(out, loaded=load_model(str(out)), progress=False)
        assert report.passed, report.summary()
        return onnx_dir / "model.onnx"
    out = _folder_family(kind, root)
    report = export_and_validate(out, loaded=load_model(str(out)), progress=False)
    assert report.passed, report.summary()
    return out / ONNX_FILE


# QuickGELU in both layouts by default (the reported failure); every other family in the slow tier.
DEFAULT_EXPORTS = ("open_clip_quickgelu", "hf_clip")
SLOW_EXPORTS = ("timm_clip", "eva_swiglu", "hf_dinov2", "hf_siglip")
_exported: dict[str, Path] = {}


def exported(kind: str, tmp_path_factory) -> Path:
    if kind not in _exported:
        _exported[kind] = _export(kind, tmp_path_factory.mktemp(kind))
    return _exported[kind]


def _pixels(path: Path, n: int = 3) -> np.ndarray:
    import onnx

    dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    c, h, w = (d.dim_value for d in dims[1:])
    return np.random.default_rng(0).standard_normal((n, c, h, w)).astype(np.float32)


def float64_tensors(path: Path) -> list[str]:
    """Every tensor of the graph whose element type is float64: initializers, Constant values, Cast
    targets and (after shape inference) every intermediate value."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    g, dbl = model.graph, onnx.TensorProto.DOUBLE
    found = [f"initializer {t.name}" for t in g.initializer if t.data_type == dbl]
    for n in g.node:
        for a in n.attribute:
            if (n.op_type == "Cast" and a.name == "to" and a.i == dbl) or (a.type == a.TENSOR and a.t.data_type == dbl):
                found.append(f"{n.op_type} {n.name}")
    found += [f"value {v.name}" for v in list(g.value_info) + list(g.output) + list(g.input)
              if v.type.tensor_type.elem_type == dbl]
    return found


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / max(np.linalg.norm(b.astype(np.float64)), 1e-30))


def _check_levels(kind: str, path: Path) -> None:
    assert float64_tensors(path) == [], kind
    x = _pixels(path)
    runs = _run_levels(path, x)  # level ALL is what export validated against the float64 reference
    for level in LEVELS:
        for name, value in runs[level].items():
            assert _rel(value, runs["all"][name]) < 1e-5, (kind, level, name)


@pytest.mark.parametrize("kind", DEFAULT_EXPORTS)
def test_onnx_export_has_no_float64_and_runs_at_every_optimisation_level(kind, tmp_path_factory):
    _check_levels(kind, exported(kind, tmp_path_factory))


@pytest.mark.slow
@pytest.mark.parametrize("kind", SLOW_EXPORTS)
def test_onnx_export_of_every_family_runs_at_every_optimisation_level(kind, tmp_path_factory):
    _check_levels(kind, exported(kind, tmp_path_factory))


@pytest.mark.slow
@pytest.mark.parametrize("version", ORT_VERSIONS)
def test_onnxruntime_version_matrix(version, tmp_path_factory):
    """Every family's export in onnxruntime `version` (a cached venv), at every level, equals the
    installed onnxruntime's validated level-ALL outputs."""
    py = ort_python(version)
    work = tmp_path_factory.mktemp(f"ort-{version}")
    jobs, want = [], {}
    for kind in DEFAULT_EXPORTS + SLOW_EXPORTS:
        path = exported(kind, tmp_path_factory)
        x = _pixels(path)
        np.save(work / f"{kind}-in.npy", x)
        want[kind] = _run_levels(path, x)["all"]
        jobs.append({"model": str(path), "input": str(work / f"{kind}-in.npy"), "output": str(work / f"{kind}.npz")})
    done = subprocess.run([str(py), "-c", ORT_RUNNER, json.dumps(jobs)], capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == version
    for kind in want:
        got = np.load(work / f"{kind}.npz")
        for level in LEVELS:
            for name, value in want[kind].items():
                assert _rel(got[f"{level}/{name}"], value) < 1e-5, (version, kind, level, name)


@pytest.mark.slow
def test_transformers_js_loads_the_hf_layout_of_a_quickgelu_clip(tmp_path_factory, tmp_path):
    """transformers.js 4.x (onnxruntime-node, optimisation "all" by default) loads onnx/model.onnx of a
    QuickGELU CLIP folder and returns what onnxruntime-python returns."""
    project = transformers_js_dir()
    path = exported("hf_clip", tmp_path_factory)
    folder = path.parent.parent
    x = _pixels(path)
    (tmp_path / "x.bin").write_bytes(x.astype("<f4").tobytes())
    (project / "run.mjs").write_text(TJS_RUNNER)
    done = subprocess.run(["node", "run.mjs", str(folder), str(tmp_path / "x.bin"), json.dumps(list(x.shape)),
                           str(tmp_path / "out.json")], cwd=project, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1].startswith("4.")
    got = json.loads((tmp_path / "out.json").read_text())
    want = _run_levels(path, x)["all"]
    for name in ("last_hidden_state", "pooler_output"):
        value = np.asarray(got[name]["data"], dtype=np.float32).reshape(got[name]["dims"])
        assert _rel(value, want[name]) < 1e-5, name


# transformers.js `dtype` -> the file it loads from onnx/, and the onnxruntime tool that makes it for the hub
TJS_VARIANTS = {"fp32": ("model.onnx", None), "fp16": ("model_fp16.onnx", "fp16_io32"),
                "q8": ("model_quantized.onnx", "int8_per_tensor"), "q4": ("model_q4.onnx", "q4")}


@pytest.mark.slow
def test_transformers_js_picks_every_rewritten_variant_of_an_onnx_repo_by_dtype(tmp_path):
    """An HF SigLIP ONNX repo as optimum writes it, with the fp16 / quantized / q4 files onnxruntime's tools
    make for the hub, converted by the graph rewrite: transformers.js loads each file of OUT by its `dtype`
    option and returns what onnxruntime-python returns on that file, the register token included."""
    import shutil

    import onnxruntime as ort

    from surgery.cli import main
    from surgery.organisms.onnx_graphs import build_organism, export_optimum_style, make_variant

    project = transformers_js_dir()
    model, planting = build_organism("hf_siglip")
    src = export_optimum_style(model, tmp_path / "export")
    repo = tmp_path / "repo"
    (repo / "onnx").mkdir(parents=True)
    for f in ("config.json", "preprocessor_config.json"):
        shutil.copy(src.parent / f, repo / f)
    shutil.copy(src, repo / "onnx" / "model.onnx")
    for name, kind in TJS_VARIANTS.values():
        if kind:
            make_variant(src, repo / "onnx" / name, kind)
    out = tmp_path / "models" / "out"  # transformers.js resolves a model by name under its localModelPath
    out.parent.mkdir()
    nf = _neurons_file(planting, tmp_path / "n.json")
    assert main(["convert", str(repo), "--neurons", str(nf), "--out", str(out), "-q"]) == 0
    size = int(model.config.image_size)
    x = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
    (tmp_path / "x.bin").write_bytes(x.astype("<f4").tobytes())
    (project / "run.mjs").write_text(TJS_RUNNER)
    tokens = (size // int(model.config.patch_size)) ** 2
    for dtype, (name, _) in TJS_VARIANTS.items():
        done = subprocess.run(["node", "run.mjs", str(out), str(tmp_path / "x.bin"), json.dumps(list(x.shape)),
                               str(tmp_path / f"{dtype}.json"), dtype], cwd=project, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, (dtype, done.stderr[-2000:])
        got = json.loads((tmp_path / f"{dtype}.json").read_text())
        sess = ort.InferenceSession(str(out / "onnx" / name), providers=["CPUExecutionProvider"])
        want = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"pixel_values": x})))
        assert set(got) == set(want) == {"last_hidden_state", "pooler_output"}, (dtype, set(got))
        assert got["last_hidden_state"]["dims"] == [2, tokens + 1, want["last_hidden_state"].shape[2]], dtype
        for k, w in want.items():  # the same file in another onnxruntime build: kernels may differ a little
            value = np.asarray(got[k]["data"], dtype=np.float32).reshape(got[k]["dims"])
            assert _rel(value, w) < (1e-5 if dtype == "fp32" else 2e-3), (dtype, k, _rel(value, w))


# ---- transformers without remote code ------------------------------------------------------------

HF_KINDS = ("clip", "clip_model", "dinov2", "siglip")


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-refusal")
    return {kind: _hf_folder(kind, root) for kind in HF_KINDS}


# keyword arguments people pass to from_pretrained; none may turn the refusal into a model
STOCK_KWARGS = ({}, {"attn_implementation": "eager"}, {"attn_implementation": "sdpa"}, {"dtype": torch.float16},
                {"ignore_mismatched_sizes": True}, {"num_labels": 2, "id2label": {0: "a", 1: "b"}})


def stock_loads(out: Path, stock_class) -> dict:
    """Every stock transformers way to get a model (or its config) from folder `out`, by name."""
    import transformers
    from transformers import AutoConfig, AutoModel

    loads = {"AutoConfig": lambda: AutoConfig.from_pretrained(out),
             "pipeline": lambda: transformers.pipeline("image-feature-extraction", model=str(out)),
             "from_config": lambda: AutoModel.from_config(AutoConfig.from_pretrained(out, trust_remote_code=True))}
    for i, kwargs in enumerate(STOCK_KWARGS):
        loads[f"AutoModel {kwargs}"] = lambda kw=kwargs: AutoModel.from_pretrained(out, **kw)
        loads[f"{stock_class.__name__} {kwargs}"] = lambda kw=kwargs: stock_class.from_pretrained(out, **kw)
    return loads


@pytest.mark.parametrize("kind", HF_KINDS)
def test_hf_folder_refuses_every_stock_loader(hf_folders, kind, tmp_path):
    import transformers
    from transformers import AutoImageProcessor, AutoModel

    out = hf_folders[kind]
    AutoImageProcessor.from_pretrained(out)  # preprocessing needs no remote code
    stock = getattr(transformers, json.loads((out / "config.json").read_text())["vit_surgery"]["base_class"])
    for name, load in stock_loads(out, stock).items():
        if name == "from_config":
            # once this process loaded a folder with trust_remote_code (an earlier test), transformers has
            # registered the remote classes for AutoModel: from_config then builds the vit-surgery class, never
            # the stock one; in a fresh process it raises
            try:
                model = load()
            except ValueError as e:
                assert STOCK_REFUSAL in str(e) or "trust_remote_code=True" in str(e), (name, e)
            else:
                assert type(model).__name__.startswith("VitSurgery"), (name, type(model))
            continue
        with pytest.raises(ValueError) as info:
            load()
        assert STOCK_REFUSAL in str(info.value) or "trust_remote_code=True" in str(info.value), (name, info.value)
    x = torch.randn(2, 3, 64, 64)
    ours = surgery.load(out)
    with torch.no_grad():
        want = (ours.vision_model if kind == "clip_model" else ours)(pixel_values=x).last_hidden_state
    for kwargs in ({}, {"attn_implementation": "eager"}, {"dtype": torch.float16}):
        remote = AutoModel.from_pretrained(out, trust_remote_code=True, **kwargs).eval()
        assert type(remote).__name__.startswith("VitSurgery"), kwargs
        with torch.no_grad():
            got = (remote.vision_model if kind == "clip_model" else remote)(
                pixel_values=x.to(remote.dtype)).last_hidden_state
        if not kwargs:
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        elif "attn_implementation" in kwargs:  # another attention kernel: float32 rounding apart
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        else:
            assert got.dtype == torch.float16 and got.shape == want.shape
    remote.save_pretrained(tmp_path / "resaved")  # a re-saved model stays closed to the stock class
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        stock.from_pretrained(tmp_path / "resaved", attn_implementation="eager")


def test_hf_folder_loads_with_device_map(hf_folders):
    pytest.importorskip("accelerate")
    from transformers import AutoModel

    out = hf_folders["clip"]
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        AutoModel.from_pretrained(out, device_map="cpu")
    remote = AutoModel.from_pretrained(out, trust_remote_code=True, device_map="cpu")
    assert type(remote).__name__ == "VitSurgeryCLIPVisionModel"


def test_stock_refusal_literal_is_inlined_into_the_modeling_file(hf_folders):
    import runpy

    assert runpy.run_path(str(hf_folders["clip"] / "modeling_vit_surgery.py"))["STOCK_REFUSAL"] == STOCK_REFUSAL


# ---- timm at another input size ----------------------------------------------------------------------

def test_timm_baked_folder_at_another_input_size(tmp_path):
    """`img_size=` at load and `set_input_size` on the baked model resample the positional table as timm
    does for the source (the register has no positional row): both match the source at that size with the
    rule hooked in; the pretrained_cfg has the source's types."""
    import timm

    from tests.helpers.rule_reference import per_vector_relative, rule_reference

    out = _folder_family("timm_clip", tmp_path)
    src = tmp_path / "timm_clip-src"
    planted = {int(k): v for k, v in json.loads((tmp_path / "timm_clip.json").read_text())["register_neurons"].items()}
    x = torch.randn(2, 3, 96, 96)
    resized = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    resized.set_input_size(img_size=96)
    source = timm.create_model(f"local-dir:{src}", pretrained=True, img_size=96).eval()
    plain, plain_source = (timm.create_model(f"local-dir:{d}", pretrained=True) for d in (out, src))
    assert isinstance(plain_source.pretrained_cfg["input_size"], tuple)
    assert {k: type(v) for k, v in plain.pretrained_cfg.items()} == \
        {k: type(v) for k, v in plain_source.pretrained_cfg.items() if k in plain.pretrained_cfg}
    with torch.no_grad(), rule_reference(source, planted):
        want = source.forward_features(x)
    for baked in (timm.create_model(f"local-dir:{out}", pretrained=True, img_size=96).eval(), resized):
        assert baked.num_prefix_tokens == 2 and baked.pos_embed.shape == source.pos_embed.shape
        with torch.no_grad():
            got = baked.forward_features(x)
        assert got.shape == want.shape == (2, 1 + 1 + 144, 64)
        assert float(per_vector_relative(got.double(), want.double()).max()) < 1e-5


# ---- OpenVINO ----------------------------------------------------------------------------------------

def test_openvino_ir_of_an_hf_folder_has_hf_output_names(hf_folders):
    """What optimum-intel's OVModelForFeatureExtraction does: openvino_model.xml next to config.json,
    outputs read by name (`last_hidden_state`)."""
    import openvino as ov

    from surgery.exporters.openvino_export import OV_XML, export_openvino

    out = hf_folders["dinov2"]
    report = export_openvino(out, loaded=load_model(str(out)), progress=False)
    assert report.passed, report.summary()
    compiled = ov.Core().compile_model(str(out / OV_XML), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    assert {o.get_any_name() for o in compiled.outputs} == {"last_hidden_state", "pooler_output"}
    x = torch.randn(3, 3, 64, 64)
    res = compiled(x.numpy())
    got = {o.get_any_name(): torch.from_numpy(v) for o, v in res.items()}
    with torch.no_grad():
        want = surgery.load(out)(pixel_values=x)
    torch.testing.assert_close(got["pooler_output"], want.pooler_output, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got["last_hidden_state"], want.last_hidden_state, rtol=1e-4, atol=1e-4)
