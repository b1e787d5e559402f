"""`vit-surgery export OUT --format openvino`: an OpenVINO IR of the baked model, validated on the CPU plugin.

The IR is converted from the same graph the ONNX export writes (`export_onnx`, dynamic batch, the fix
inside the graph) with `openvino.convert_model` and saved full precision as `openvino_model.xml` +
`openvino_model.bin` (the file names optimum-intel's `OVModel*` classes look for). Inputs/outputs are
the ONNX export's: `pixel_values` -> `pooled`, `tokens`; the recipe and token layout are in the IR's
rt_info under `vit_surgery`.

Validation before the files are moved into OUT: compiled on the CPU plugin with
`INFERENCE_PRECISION_HINT=f32` (the plugin's default on CPUs with bfloat16 units is bf16, which would
fail any float32 tolerance), compared with the PyTorch baked model and the hooked reference at batch
sizes 1 and 5 (the export batch is 2). Tolerance OPENVINO_TOLERANCE = 1e-4 relative (the ONNX export's
float64 judge on top): the CPU plugin's float32 GELU is less accurate than onnxruntime's and PyTorch's
in the activation's far negative tail, and that tail decides the register token of an image without
outliers (the register branch cannot run in float64 there). Measured on the organism: 5e-5 on that
register token, <= 3e-7 on every other token and the pooled output. A failed validation writes nothing.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from surgery.core.errors import ModelInputError, require_extra

from .base import ExportOptions
from .onnx_export import export_onnx
from .onnx_metadata import read_onnx_metadata
from .onnx_publish import publish_validated, record_parity_section, staged_output
from surgery.core.output_format import META_PREFIX, OPENVINO_BIN, OPENVINO_TOLERANCE, OPENVINO_XML
from surgery.core.outputs import check_replaceable
from surgery.core.progress import say_if

from .onnx_spec import VIT_ONNX_SPEC
from .onnx_validate import OnnxReport, judge_runtime_outputs, validation_batches
from .onnx_hf_layout import export_hf_graph, validate_hf_outputs
from .runtime_check import RenamedSession

OV_XML, OV_BIN = OPENVINO_XML, OPENVINO_BIN
CPU_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}


def require_openvino() -> None:
    require_extra("openvino", "openvino", "OpenVINO export")


def openvino_report(path: Path) -> OnnxReport:
    """An empty report for an IR validated on the CPU plugin in float32."""
    return OnnxReport(path=str(path), dtype="float32", tolerance=OPENVINO_TOLERANCE,
                      export_batch_size=VIT_ONNX_SPEC.export_batch_size, opset=0, format="openvino",
                      runtime="OpenVINO CPU plugin, f32",
                      runtime_detail="OpenVINO CPU plugin, INFERENCE_PRECISION_HINT f32")


def openvino_summary(report: OnnxReport) -> str:
    return report.summary()


def compile_cpu(xml: Path) -> Any:
    """The IR compiled on the CPU plugin in float32."""
    import openvino as ov

    core = ov.Core()
    return core.compile_model(core.read_model(str(xml)), "CPU", CPU_CONFIG)


def _run_by_name(compiled: Any) -> Any:
    def run(pixels: Any) -> dict[str, Any]:
        res = compiled(pixels)  # a fresh infer request per call (thread-safe)
        return {out.get_any_name(): value for out, value in res.items()}
    return run


def openvino_session(xml: Path) -> RenamedSession:
    """An IR with the plain layout's outputs (pooled, tokens) as the validator's session."""
    return RenamedSession(_run_by_name(compile_cpu(xml)), {o: o for o in VIT_ONNX_SPEC.output_names})


def _validate_ir(xml: Path, report_path: Path, loaded: Any, batches: Optional[list[Any]]) -> OnnxReport:
    """The IR on the CPU plugin vs PyTorch and the hooked reference. HF folders' IRs carry HF's output
    names (last_hidden_state, pooler_output[, image_embeds]: what optimum-intel reads), judged like the
    HF ONNX layout; other folders' carry the plain layout's (pooled, tokens)."""
    if loaded.source.library == "hf":
        hf = validate_hf_outputs(_run_by_name(compile_cpu(xml)), report_path, loaded, OPENVINO_TOLERANCE,
                                 batches=batches)
        report = openvino_report(report_path)
        report.comparisons, report.problems = hf.comparisons, hf.problems
        return report
    report = openvino_report(report_path)
    return judge_runtime_outputs(report, openvino_session(xml), loaded,
                            batches if batches is not None else validation_batches(loaded))


def _convert(onnx_path: Path, xml: Path) -> None:
    import openvino as ov

    ov_model = ov.convert_model(str(onnx_path))
    for key, value in read_onnx_metadata(onnx_path).items():
        ov_model.set_rt_info(value if isinstance(value, str) else json.dumps(value), ["vit_surgery", key])
    ov.save_model(ov_model, str(xml), compress_to_fp16=False)


def export_openvino(out_dir: Path, *, loaded: Any, progress: bool = True, exporter: str = "dynamo",
                    batches: Optional[list[Any]] = None, overwrite: bool = False) -> OnnxReport:
    """Write OUT/openvino_model.{xml,bin} for the baked model in OUT, validated before it is moved in."""
    require_openvino()
    out_dir = Path(out_dir)
    for name in (OV_XML, OV_BIN):
        check_replaceable(out_dir / name, overwrite)
    if loaded.recipe is None:
        raise ModelInputError(f"{out_dir} carries no baked test-time registers (run `vit-surgery convert` first)")
    with staged_output(out_dir, ".openvino-export-") as scratch:
        if loaded.source.library == "hf":  # HF folders: HF's output names (optimum-intel reads them)
            onnx_path = export_hf_graph(loaded, out_dir, scratch, False, exporter, progress)
        else:
            onnx_path = export_onnx(loaded, out_dir, scratch, exporter=exporter, progress=progress).path
        say_if(progress, "converting to OpenVINO IR")
        _convert(onnx_path, scratch / OV_XML)
        say_if(progress, "validating the IR on the OpenVINO CPU plugin (f32) against PyTorch and the hooked reference")
        report = _validate_ir(scratch / OV_XML, out_dir / OV_XML, loaded, batches)
        publish_validated(report, f"OpenVINO export failed validation, nothing written: {report.summary()}",
                          [(scratch / OV_BIN, out_dir / OV_BIN), (scratch / OV_XML, out_dir / OV_XML)])
        _record(out_dir, report)
        return report


def validate_openvino(out_dir: Path, loaded: Any, batches: list[Any]) -> OnnxReport:
    """Re-validate OUT/openvino_model.xml (what `check` does with every format present)."""
    require_openvino()
    return _validate_ir(Path(out_dir) / OV_XML, Path(out_dir) / OV_XML, loaded, batches)


def _record(out_dir: Path, report: OnnxReport) -> None:
    """The validation goes into parity.json under "openvino" (next to "onnx")."""
    record_parity_section(out_dir, "openvino", report.to_dict(), create=True)


__all__ = ["OV_BIN", "OV_XML", "META_PREFIX", "compile_cpu", "export_openvino", "openvino_session", "openvino_summary",
           "validate_openvino", "export_format", "open_session", "validate_present"]


# ---- the format registry's entry points (exporters/base.py) --------------------------------------

def export_format(out_dir: Path, loaded: Any, options: ExportOptions) -> OnnxReport:
    if options.fp16:
        from surgery.core.errors import UsageError

        raise UsageError("the OpenVINO export is full precision only (no fp16)")
    return export_openvino(out_dir, loaded=loaded, progress=options.progress, exporter=options.exporter,
                           overwrite=options.overwrite)


def open_session(path: Path) -> Any:
    return openvino_session(path)


def validate_present(out_dir: Path, loaded: Any, batches: list[Any]) -> list[OnnxReport]:
    return [validate_openvino(out_dir, loaded, batches)]
