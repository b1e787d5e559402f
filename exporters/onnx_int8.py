"""`vit-surgery export OUT --format onnx --int8 [static|dynamic]`: an INT8 ONNX file of the baked model,
with the register branch kept in float, validated against the float32 model before it is moved in.

Static (`--int8`, `--int8 static`, needs `--images CALIB`): onnxruntime.quantization's recipe —
`quant_pre_process` (symbolic shape inference + basic graph optimisation) first, then `quantize_static`
in QDQ format, per-channel symmetric int8 weights in [-64, 64] (`reduce_range`: no saturation in the
uint8 x int8 kernels of x86 CPUs without VNNI, see WEIGHT_QMAX_STATIC), int8 activations with one MinMax
range per tensor calibrated on CALIB preprocessed by the model's own transform (a `CalibrationDataReader`
over the project's image loading, `surgery.core.images`). Quantized op types: MatMul, Gemm, Conv (the
compute; LayerNorm, Softmax, the residual adds and the GELU stay float, as transformer INT8 recipes do),
except the nodes reading attention probabilities (`softmax_readers`: probabilities @ V stays float, so
no onnxruntime version fuses its buggy int8 QLinearSoftmax). Both make the file give the same numbers in
onnxruntime 1.18 to 1.32 (and transformers.js 4's onnxruntime-node) at every optimisation level.

Dynamic (`--int8 dynamic`, no images): `quantize_dynamic`, per-channel int8 weights, activations
quantized at run time per tensor per call (what hub ONNX repos' `model_quantized.onnx` are made with).

Kept in float in both modes, by node name (`nodes_to_exclude`), and recorded in the file's metadata
(`vit_surgery.int8`): every node of each RegisterMlp's register branch — `reg_fc1`, the branch's
activation and any float64 casts, the signed-max edit (Abs/ArgMax/GatherElements, the row writes) and
`reg_fc2`. The branch holds the k register units only (a few per block), so it costs nothing to keep,
and the edit picks one value by magnitude across all tokens: int8 rounding there would move the value
the register token receives. The names come from the exporter's own scope records (dynamo:
`pkg.torch.onnx.name_scopes` / `class_hierarchy` node metadata; legacy: `/model/.../reg_fc1/MatMul`
node names) and a forward walk from `reg_fc1` to `reg_fc2` inside the MLP's scope. The branch's input
(the pre-MLP LayerNorm output, shared with the ordinary `fc1`) would reach it through that tensor's QDQ
pair; it is rewired to the float tensor itself, so the branch is float end to end.

Validation (before the file is moved into place), against the float32 baked model in PyTorch on images
that calibration did not see (CALIB images held out, else the built-in images): per image, the cosine
of the pooled output, and the mean over patch tokens of each patch token's cosine. Refused (exit 7,
nothing written) unless every image has pooled cosine >= POOLED_COSINE_MIN and patch-token cosine >=
PATCH_COSINE_MIN. The register token's cosine is reported, not judged (it is one token whose value the
fp32 check already pins). Numbers go to parity.json (`onnx_int8`) and the folder's model card.
"""
from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from surgery.core.errors import ModelInputError, UsageError

from surgery.core.output_format import META_PREFIX
from surgery.core.integrity import record_written
from surgery.core.outputs import atomic_output_file, check_replaceable, identity
from surgery.core.verdict import verdict_word
from surgery.core import onnx_runtime
from surgery.core.progress import say_if
from .onnx_spec import VIT_ONNX_SPEC
from .onnx_patches import ExportWrapper, mha_fastpath_disabled
from .onnx_export import export_onnx, replace_metadata
from .onnx_publish import publish_validated, record_parity_section, staged_output
from .onnx_metadata import token_layout
from .onnx_validate import validation_batches

INT8_MODES = ("static", "dynamic")
FILES = {"static": "model_int8.onnx", "dynamic": "model_quantized.onnx"}
# Thresholds, per image against the float32 baked model. Measured (benchmarks/RESULTS.md, "INT8
# (onnxruntime)"): static INT8 of the baked ViT-B 0.989 worst pooled / 0.990 worst patch image, organisms
# 0.990-0.993; the unbaked ViT-B's static INT8 0.94 (refused at this level, as it should be).
POOLED_COSINE_MIN = 0.98
PATCH_COSINE_MIN = 0.98
STATIC_OP_TYPES = ("MatMul", "Gemm", "Conv")
DYNAMIC_OP_TYPES = ("MatMul", "Gemm")
# Static weights use 7 bits of int8 (onnxruntime's `reduce_range`, its documented remedy for x86 CPUs without
# VNNI): those CPUs multiply uint8 activations by int8 weights with VPMADDUBSW, which saturates a pair's sum at
# 32767; 255 x 64 x 2 = 32640 fits. With full-range weights the register row, the largest activations, was
# clipped there at optimisation EXTENDED/ALL (register cosine 0.785 against float32 on the AVX2 test machine,
# 0.976 with the integer kernels off), so what a file gave depended on the CPU; with these it is the same on
# every CPU and optimisation level (0.9856, organism).
WEIGHT_QMAX_STATIC = 64
CALIBRATION_IMAGES_MAX = 128  # a seeded sample of CALIB beyond this (MinMax ranges settle long before)
HELD_OUT_EVERY = 4  # every 4th CALIB image is kept for validation, never calibrated on
VALIDATION_IMAGES_MAX = 32
CARD_HEADING = "## INT8 ONNX"


# ---- which nodes are the register branch ----------------------------------------------------------

def _node_module_path(node: Any) -> Optional[str]:
    """The module a node was exported from: dynamo's name_scopes record, or the legacy node-name path."""
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(p.value)
            except (ValueError, SyntaxError):
                return None
            return scopes[-2] if len(scopes) >= 2 else None
    if node.name.startswith("/"):  # legacy exporter: /model/blocks.2/mlp/reg_fc1/MatMul
        return ".".join(s for s in node.name.split("/")[1:-1] if s)
    return None


_BRANCH_IN = re.compile(r"^(?P<mlp>.*)\.reg_fc1(\..*)?$")


def register_branch_nodes(proto: Any) -> dict[str, list[str]]:
    """{RegisterMlp scope: names of the nodes of its register branch}, from reg_fc1 to reg_fc2 inclusive.

    Seeds: the nodes exported from `MLP.reg_fc1`; then every consumer inside MLP's scope (not the ordinary
    `fc1`/`fc2`) of a tensor a branch node produced, stopping after the nodes of `MLP.reg_fc2`."""
    nodes = list(proto.graph.node)
    paths = {id(n): _node_module_path(n) for n in nodes}
    mlps = sorted({m.group("mlp") for p in paths.values() if p and (m := _BRANCH_IN.match(p))})
    consumers: dict[str, list[Any]] = {}
    for n in nodes:
        for t in n.input:
            consumers.setdefault(t, []).append(n)

    def under(path: Optional[str], scope: str) -> bool:
        return path is not None and (path == scope or path.startswith(scope + "."))

    out: dict[str, list[str]] = {}
    for mlp in mlps:
        def inside(n: Any) -> bool:
            p = paths[id(n)]
            return under(p, mlp) and not under(p, mlp + ".fc1") and not under(p, mlp + ".fc2")

        seeds = [n for n in nodes if under(paths[id(n)], mlp + ".reg_fc1")]
        branch: dict[int, Any] = {id(n): n for n in seeds}
        todo = list(seeds)
        while todo:
            n = todo.pop()
            if under(paths[id(n)], mlp + ".reg_fc2"):
                continue  # the branch ends at its output projection
            for t in n.output:
                for c in consumers.get(t, []):
                    if id(c) not in branch and inside(c):
                        branch[id(c)] = c
                        todo.append(c)
        order = {id(n): i for i, n in enumerate(nodes)}
        out[mlp] = [n.name for n in sorted(branch.values(), key=lambda n: order[id(n)])]
    return out


# ---- quantization ------------------------------------------------------------------------------------

class PixelReader:
    """onnxruntime's CalibrationDataReader protocol over preprocessed image batches."""

    def __init__(self, batches: Sequence[torch.Tensor], input_name: str = "pixel_values") -> None:
        self.batches, self.input_name = list(batches), input_name
        self._it: Optional[Iterator[torch.Tensor]] = None

    def get_next(self) -> Optional[dict[str, np.ndarray]]:
        if self._it is None:
            self._it = iter(self.batches)
        x = next(self._it, None)
        return None if x is None else {self.input_name: x.to("cpu", torch.float32).contiguous().numpy()}

    def rewind(self) -> None:
        self._it = None


@dataclass
class QuantSettings:
    """What the quantizer was asked to do (written into the metadata)."""

    mode: str
    per_channel: bool = True
    excluded: dict[str, list[str]] = field(default_factory=dict)  # scope -> node names kept float
    calibration_images: int = 0
    attention_kept_float: list[str] = field(default_factory=list)  # readers of Softmax outputs (static)

    def to_dict(self) -> dict[str, Any]:
        static = self.mode == "static"
        return {"mode": self.mode, "tool": "onnxruntime.quantization", "format": "QDQ" if static else "dynamic",
                "pre_process": "quant_pre_process" if static else None,
                "op_types": list(STATIC_OP_TYPES if static else DYNAMIC_OP_TYPES),
                "weights": ("int8" + (f" in [{-WEIGHT_QMAX_STATIC}, {WEIGHT_QMAX_STATIC}] (reduce_range)" if static else "")
                            + ", symmetric, " + ("per channel" if self.per_channel else "per tensor")),
                "activations": ("int8, one MinMax range per tensor, calibrated" if static
                                else "int8, per tensor, computed at run time"),
                "calibration_images": self.calibration_images,
                "nodes_kept_float": self.excluded,
                "why_kept_float": "register branch (reg_fc1, activation, signed-max edit, reg_fc2) of each "
                                  "RegisterMlp: the k register units and the value the register token receives",
                **({"attention_probabilities_kept_float": self.attention_kept_float,
                    "why_attention_probabilities_float": "no QuantizeLinear reads a Softmax output, so no "
                    "onnxruntime fuses QLinearSoftmax (int8 kernel before 1.32 wraps probabilities near 1 to 0: "
                    "microsoft/onnxruntime#29727; the register is the attention sink)"} if static else {}),
                "validated_with": f"onnxruntime {_ort_version()} (CPU, graph optimisation ALL)"}


def _ort_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)


def _quiet_logging() -> Any:
    import logging

    lg = logging.getLogger()
    prev = lg.level
    lg.setLevel(logging.ERROR)  # the quantizer logs every excluded node at INFO/WARNING
    return lg, prev


def quantize_file(src: Path, dst: Path, mode: str, *, calibration: Sequence[torch.Tensor] = (),
                  exclude: Sequence[str] = (), per_channel: bool = True, input_name: str = "pixel_values",
                  work: Optional[Path] = None, float_branch_input: bool = True,
                  range_overrides: Optional[dict[str, list[dict[str, float]]]] = None) -> list[str]:
    """INT8 `src` -> `dst` with onnxruntime.quantization (the settings in the module docstring);
    `exclude` names nodes to keep float, and with `float_branch_input` they read float tensors rather than
    a quantized tensor's DequantizeLinear. Static needs `calibration` batches; `range_overrides` are
    TensorQuantOverrides (rmin/rmax per tensor) for the benchmark's variants. Returns the nodes static
    mode also kept float because they read attention probabilities (`softmax_readers`)."""
    import onnx
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if mode not in INT8_MODES:
        raise ValueError(f"mode must be one of {INT8_MODES}, got {mode!r}")
    lg, prev = _quiet_logging()
    try:
        if mode == "dynamic":
            quantize_dynamic(str(src), str(dst), op_types_to_quantize=list(DYNAMIC_OP_TYPES), per_channel=per_channel,
                             weight_type=QuantType.QInt8, nodes_to_exclude=list(exclude),
                             extra_options={"MatMulConstBOnly": True})
            return []
        extra: dict[str, Any] = {"ActivationSymmetric": False, "WeightSymmetric": True}
        if range_overrides:
            extra["TensorQuantOverrides"] = range_overrides
        pre = (work or dst.parent) / (src.stem + ".pre.onnx")
        quant_pre_process(str(src), str(pre))
        pre_proto = onnx.load(str(pre), load_external_data=False)
        kept = {n.name for n in pre_proto.graph.node}
        missing = [n for n in exclude if n not in kept]
        if missing:  # the branch must survive pre-processing by name, or it would be quantized silently
            raise ModelInputError(f"quant_pre_process renamed or fused register-branch node(s) {missing[:3]}; "
                                  "cannot keep them in float")
        unnamed = [n for n in _softmax_reader_nodes(pre_proto) if not n.name]
        for i, n in enumerate(unnamed):  # nodes_to_exclude works by name (an empty one matches nothing)
            n.name = f"vit_surgery_softmax_reader_{i}"
        if unnamed:
            onnx.save_model(pre_proto, str(pre))
        probabilities = softmax_readers(pre_proto)
        from surgery.core.progress import stage

        with stage("INT8 calibration (onnxruntime)", sum(len(b) for b in calibration), unit="image"):
            quantize_static(str(pre), str(dst), PixelReader(calibration, input_name), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=list(STATIC_OP_TYPES), per_channel=per_channel,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, reduce_range=True,
                            nodes_to_exclude=[*exclude, *probabilities], calibrate_method=CalibrationMethod.MinMax,
                            extra_options=extra)
        pre.unlink(missing_ok=True)
        proto = onnx.load(str(dst))
        fused = [n.name for n in _softmax_reader_nodes(proto) if n.op_type == "QuantizeLinear"]
        if fused:  # what onnxruntime < 1.32 would fuse into its broken int8 QLinearSoftmax: refuse, not ship
            raise ModelInputError(f"the quantizer put int8 attention probabilities in the graph ({fused[:3]}); "
                                  "onnxruntime before 1.32 runs them wrong")
        if float_branch_input and exclude and float_inputs_for(proto, exclude):
            onnx.save_model(proto, str(dst))
        return probabilities
    finally:
        lg.setLevel(prev)


def softmax_readers(proto: Any) -> list[str]:
    """Names of the nodes that read a Softmax output (in a ViT: the attention-probabilities @ V MatMul).

    Static INT8 keeps them in float, so no QuantizeLinear reads a Softmax output and no onnxruntime fuses
    DequantizeLinear -> Softmax -> QuantizeLinear into `com.microsoft.QLinearSoftmax`. Its int8 kernel
    before onnxruntime 1.32 clamps to the uint8 range (microsoft/onnxruntime#29727): a probability that
    quantizes above 127 wraps to -128, i.e. to ~0. The register is the attention sink (probabilities near
    1 in the blocks after the bake), so at the default optimisation level those runtimes dropped exactly
    the sink's attention: register-token cosine 0.53 against float32 where 1.32 gives 0.78 (organism)."""
    return [n.name for n in _softmax_reader_nodes(proto)]


def _softmax_reader_nodes(proto: Any) -> list[Any]:
    softmax_out = {t for n in proto.graph.node if n.op_type == "Softmax" for t in n.output}
    return [n for n in proto.graph.node if any(t in softmax_out for t in n.input)]


def float_inputs_for(proto: Any, names: Sequence[str]) -> int:
    """Rewire the nodes `names` to read the float tensors their QDQ inputs were made from (a quantized
    tensor shared with an ordinary node, like the pre-MLP LayerNorm output that feeds both `fc1` and
    `reg_fc1`, reaches an excluded node as DequantizeLinear(QuantizeLinear(x)); the branch gets x itself).
    Returns how many inputs were rewired."""
    prod = {o: n for n in proto.graph.node for o in n.output}
    wanted, count = set(names), 0
    for n in proto.graph.node:
        if n.name not in wanted:
            continue
        for i, t in enumerate(n.input):
            dq = prod.get(t)
            q = prod.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear":
                n.input[i] = q.input[0]
                count += 1
    return count


def _set_metadata(path: Path, entries: dict[str, str]) -> None:
    import onnx

    proto = onnx.load(str(path))
    replace_metadata(proto, entries)
    onnx.save_model(proto, str(path))


# ---- validation ---------------------------------------------------------------------------------------

def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine along the last axis, in float64."""
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1, eps=1e-30)


@dataclass
class Int8Report:
    path: str
    mode: str
    pooled_min: float = POOLED_COSINE_MIN
    patch_min: float = PATCH_COSINE_MIN
    pooled_cosine: list[float] = field(default_factory=list)  # per image
    patch_cosine: list[float] = field(default_factory=list)  # per image: mean over patch tokens
    patch_cosine_worst_token: float = 1.0
    register_cosine: list[float] = field(default_factory=list)  # per image, worst register token
    images: int = 0
    validation_images: str = ""
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return (self.images > 0 and min(self.pooled_cosine) >= self.pooled_min
                and min(self.patch_cosine) >= self.patch_min)

    def summary(self) -> str:
        if not self.images:
            return f"onnx int8 ({self.mode}) FAIL: no validation images"
        reg = f", register token >= {min(self.register_cosine):.4f}" if self.register_cosine else ""
        return (f"onnx int8 ({self.mode}) {verdict_word(self.passed)} against the float32 baked model, "
                f"{self.images} image(s): pooled cosine >= {min(self.pooled_cosine):.4f} (needed "
                f"{self.pooled_min}), patch-token cosine >= {min(self.patch_cosine):.4f} per image (needed "
                f"{self.patch_min}; worst single patch token {self.patch_cosine_worst_token:.4f}){reg}")

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "path": self.path, "mode": self.mode, "images": self.images,
                "validation_images": self.validation_images,
                "against": "float32 baked model (PyTorch)", "runtime": onnx_runtime.RUNTIME_DETAIL,
                "thresholds": {"pooled_cosine_min_per_image": self.pooled_min,
                               "patch_token_cosine_min_per_image": self.patch_min,
                               "patch_token_cosine": "mean over an image's patch tokens of each token's cosine"},
                "pooled_cosine": {"min": min(self.pooled_cosine, default=0.0),
                                  "mean": float(np.mean(self.pooled_cosine)) if self.pooled_cosine else 0.0},
                "patch_token_cosine": {"min": min(self.patch_cosine, default=0.0),
                                       "mean": float(np.mean(self.patch_cosine)) if self.patch_cosine else 0.0,
                                       "worst_single_token": self.patch_cosine_worst_token},
                "register_token_cosine": {"min": min(self.register_cosine, default=1.0),
                                          "mean": float(np.mean(self.register_cosine)) if self.register_cosine
                                          else 1.0},
                "quantization": self.settings, "summary": self.summary()}


@torch.no_grad()
def validate_int8(report: Int8Report, path: Path, reference: Callable[[torch.Tensor], Any], batches: Sequence[torch.Tensor],
                  names: tuple[str, str], first_patch: int, registers: Sequence[int]) -> Int8Report:
    """Fill `report` with per-image cosines of the INT8 file's outputs `names` = (pooled, tokens) against
    `reference(pixels) -> (pooled, tokens, ...)`, the float32 baked model with the same interface."""
    session = onnx_runtime.open_session(path)
    worst = 1.0
    for x in batches:
        x = x.to("cpu", torch.float32).contiguous()
        got = dict(zip(names, session.run(list(names), {"pixel_values": x.numpy()})))
        want = reference(x)
        pooled_q, tokens_q = (torch.from_numpy(np.asarray(got[n], dtype=np.float32)) for n in names)
        pooled_f, tokens_f = want[0].float(), want[1].float()
        if pooled_q.shape != pooled_f.shape or tokens_q.shape != tokens_f.shape:
            raise ModelInputError(f"{path}: INT8 outputs have shapes {tuple(pooled_q.shape)}, {tuple(tokens_q.shape)}; "
                                  f"the model's {tuple(pooled_f.shape)}, {tuple(tokens_f.shape)}")
        report.pooled_cosine += _cos(pooled_q, pooled_f).tolist()
        patch = _cos(tokens_q[:, first_patch:], tokens_f[:, first_patch:])
        report.patch_cosine += patch.mean(dim=1).tolist()
        worst = min(worst, float(patch.min()))
        if registers:
            report.register_cosine += _cos(tokens_q[:, list(registers)], tokens_f[:, list(registers)]).min(dim=1).values.tolist()
        report.images += len(x)
    report.patch_cosine_worst_token = worst
    return report


# ---- images -------------------------------------------------------------------------------------------

def _batches(files: Sequence[Path], transform: Any, size: int = 8) -> list[torch.Tensor]:
    from surgery.core.images import ImageBatches

    reader = ImageBatches(list(files), transform, size, desc="INT8 images")  # a stage (core/progress.py)
    out = [x for x, _ in reader]
    reader.require_some(sum(len(x) for x in out))
    return out


def split_images(folder: Path, num: int = CALIBRATION_IMAGES_MAX) -> tuple[list[Path], list[Path]]:
    """(calibration files, held-out validation files) from CALIB: every HELD_OUT_EVERY-th image is held
    out (at most VALIDATION_IMAGES_MAX) when there are at least 2 x HELD_OUT_EVERY images, else all are used
    for both; calibration is a seeded sample of at most `num`."""
    import random

    from surgery.core.images import list_images

    files = list_images(folder)
    if len(files) < 2 * HELD_OUT_EVERY:
        return files[:num], files[:VALIDATION_IMAGES_MAX]
    held = files[HELD_OUT_EVERY - 1::HELD_OUT_EVERY][:VALIDATION_IMAGES_MAX]
    rest = [f for f in files if f not in set(held)]
    if len(rest) > num:
        rest = sorted(random.Random(0).sample(rest, num))
    return rest, held


def validation_images_text(images: Any, held: Sequence[Path], calibrated: Sequence[Path], static: bool,
                           read: Optional[int] = None) -> str:
    """What the INT8 file was validated on, as stdout, parity.json and the card say it: held-out images
    only when none of them was also calibrated on (a small CALIB is used for both). `read`: how many of
    `held` could be read (unreadable files are skipped, so not counted)."""
    n = len(held) if read is None else read
    if static and set(held) & set(calibrated):
        return (f"{n} image(s) of {images}, the same it was calibrated on (fewer than "
                f"{2 * HELD_OUT_EVERY} images: none held out)")
    return f"{n} image(s) of {images}" + (" not calibrated on" if static else "")


# ---- export + validate + move into place -------------------------------------------------------------

@dataclass
class _Layout:
    """What differs between the plain and the HF layout: the float32 graph, its names, the reference."""

    target: Path
    names: tuple[str, str]  # (pooled, tokens) output names in the graph
    reference: Callable[[torch.Tensor], Any]  # pixels -> (pooled, tokens, ...) in float32, the float model
    export: Any  # scratch -> fp32 graph path


def _plain_layout(out_dir: Path, loaded: Any, mode: str, exporter: str, progress: bool) -> _Layout:
    model = loaded.model.to("cpu", torch.float32).eval()

    def export(scratch: Path) -> Path:
        info = export_onnx(loaded, out_dir, scratch, exporter=exporter, progress=progress)
        if info.external_data:  # the quantizer would write its own external-data file next to the staged one
            raise ModelInputError(f"INT8 export of a model whose float32 graph needs external data (weights "
                                  f"{info.weights_bytes / 2**30:.1f} GiB > 2 GB) is not supported yet")
        return info.path

    return _Layout(out_dir / FILES[mode], tuple(VIT_ONNX_SPEC.output_names),  # type: ignore[arg-type]
                   ExportWrapper(model, loaded.adapter, torch.float32).eval(), export)


def _hf_layout(out_dir: Path, loaded: Any, mode: str, exporter: str, progress: bool) -> _Layout:
    from .onnx_hf_layout import ONNX_DIR, HFOutputs, export_hf_graph

    if loaded.source.library != "hf":
        raise ModelInputError(f"{{layout}} hf needs a folder converted from an HF transformers model; {out_dir} is "
                              f"a {loaded.source.library} folder: use {{layout}} plain", parameters=("layout",))
    model = loaded.model.to("cpu", torch.float32).eval()

    def export(scratch: Path) -> Path:
        return export_hf_graph(loaded, out_dir, scratch, False, exporter, progress)

    hf = HFOutputs(model, torch.float32).eval()

    def reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, pooler = hf(x)[:2]
        return pooler, hidden

    return _Layout(out_dir / ONNX_DIR / FILES[mode], ("pooler_output", "last_hidden_state"), reference, export)


def export_int8(out_dir: Path, *, loaded: Any, mode: str = "static", images: Optional[Path] = None,
                layout: str = "plain", exporter: str = "dynamo", progress: bool = True,
                overwrite: bool = False) -> tuple[Int8Report, Path]:
    """Write OUT/model_int8.onnx (static) or OUT/model_quantized.onnx (dynamic) — under OUT/onnx/ for
    `layout="hf"` — validated against the float32 baked model before it is moved into place."""
    out_dir = Path(out_dir)
    if mode not in INT8_MODES:
        raise UsageError(f"{{int8}} takes {' or '.join(INT8_MODES)}, got {mode!r}", parameters=("int8",))
    if mode == "static" and images is None:
        raise UsageError("{int8} static needs calibration images: {images} CALIB (or use {int8} dynamic)",
                         parameters=("int8", "images"))
    if loaded.recipe is None:
        raise ModelInputError(f"{out_dir} carries no baked test-time registers (run `vit-surgery convert` first)")
    lay = (_hf_layout if layout == "hf" else _plain_layout)(out_dir, loaded, mode, exporter, progress)
    check_replaceable(lay.target, overwrite)
    before = {lay.target: identity(lay.target)}  # another run finishing first wins; this one exits 8
    if images is not None:
        calib_files, held = split_images(Path(images))
        calibration = _batches(calib_files, loaded.transform) if mode == "static" else []
        validation = _batches(held, loaded.transform)
        where = validation_images_text(images, held, calib_files, mode == "static", sum(map(len, validation)))
    else:
        calib_files, calibration = [], []
        validation, where = validation_batches(loaded), "the built-in images"
    layout_info = token_layout(loaded)
    with staged_output(out_dir, ".onnx-int8-export-") as scratch:
        fp32 = lay.export(scratch)
        import onnx

        branch = register_branch_nodes(onnx.load(str(fp32), load_external_data=False))
        if not branch or not all(branch.values()):
            raise ModelInputError(f"could not find the register branch in the exported graph of {out_dir} "
                                  "(nothing to keep in float)")
        settings = QuantSettings(mode, excluded=branch, calibration_images=sum(map(len, calibration)))  # read, not listed
        staged = scratch / lay.target.name
        say_if(progress, f"quantizing to INT8 ({mode}; {sum(map(len, branch.values()))} register-branch nodes kept "
                       f"in float" + (f"; calibrating on {settings.calibration_images} images)" if calibration else ")"))
        with mha_fastpath_disabled():
            settings.attention_kept_float = quantize_file(fp32, staged, mode, calibration=calibration,
                                                          exclude=[n for names in branch.values() for n in names],
                                                          work=scratch)
        _set_metadata(staged, {META_PREFIX + "int8": json.dumps(settings.to_dict(), sort_keys=True),
                               META_PREFIX + "dtype": "int8"})
        say_if(progress, f"validating {lay.target.name} against the float32 baked model ({where})")
        report = Int8Report(path=str(lay.target), mode=mode, validation_images=where, settings=settings.to_dict())
        report.pooled_min, report.patch_min = POOLED_COSINE_MIN, PATCH_COSINE_MIN
        with mha_fastpath_disabled():
            validate_int8(report, staged, lay.reference, validation, lay.names, layout_info["first_patch_index"],
                          layout_info["register_indices"])
        lay.target.parent.mkdir(exist_ok=True)
        publish_validated(report, f"INT8 export failed validation, no {lay.target.name} written: {report.summary()}",
                          [(staged, lay.target)], before)
    record_written(out_dir, [lay.target.relative_to(out_dir).as_posix()])
    _record(out_dir, lay.target.name, report)
    write_card_section(out_dir, report)
    return report, lay.target


def _record(out_dir: Path, name: str, report: Int8Report) -> None:
    """parity.json's `onnx_int8` section, one entry per INT8 file (static and dynamic side by side)."""
    try:
        section = json.loads((out_dir / "parity.json").read_text(encoding="utf-8")).get("onnx_int8")
    except (OSError, ValueError, AttributeError):
        section = None
    section = dict(section) if isinstance(section, dict) else {}
    section[name] = report.to_dict()
    record_parity_section(out_dir, "onnx_int8", section, create=True)


def write_card_section(out_dir: Path, report: Int8Report) -> None:
    """Add (or replace) the INT8 section of OUT/README.md (the model card) with the validation numbers."""
    card = out_dir / "README.md"
    if not card.is_file():
        return
    text = card.read_text(encoding="utf-8")
    name = Path(report.path).name
    heading = f"{CARD_HEADING} (`{name}`)"
    d = report.to_dict()
    q = report.settings
    section = (f"{heading}\n\n"
               f"{q.get('mode', report.mode)} INT8 with onnxruntime.quantization ({q.get('format')}, weights "
               f"{q.get('weights')}, activations {q.get('activations')}); the register branch of every "
               "split MLP stays in float (node names in the file's `vit_surgery.int8` metadata). Against the "
               f"float32 model on {d['validation_images']}: pooled cosine min {d['pooled_cosine']['min']:.4f} "
               f"(needed {report.pooled_min}), patch-token cosine min {d['patch_token_cosine']['min']:.4f} per "
               f"image (needed {report.patch_min}), register token cosine min "
               f"{d['register_token_cosine']['min']:.4f}.\n")
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    with atomic_output_file(card, overwrite=True) as tmp:
        tmp.write_text(text, encoding="utf-8")


__all__ = ["FILES", "INT8_MODES", "Int8Report", "PATCH_COSINE_MIN", "POOLED_COSINE_MIN", "PixelReader",
           "export_int8", "quantize_file", "register_branch_nodes", "split_images", "validate_int8"]
