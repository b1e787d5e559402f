"""THE format registry: every deployment format a converted folder can be exported to, in one tuple.

`export` picks one by `--format`/`--layout`, `convert --formats` and `surgery.convert(formats=...)` by
name, and `check OUT` re-validates every format present in OUT. Adding a format: a module implementing
`export_format`, `open_session` and `validate_present` (exporters/base.py), and its entry here.
"""
from __future__ import annotations

from pathlib import Path

from surgery.core.errors import UsageError
from surgery.core.output_format import (FP32_TOLERANCE, ONNX_DATA_FILE, ONNX_FILE, ONNX_HF_DIR, ONNX_HF_FILES,
                                        OPENVINO_BIN, OPENVINO_TOLERANCE, OPENVINO_XML)

from .base import ExportOptions, Format

ONNX = Format("onnx", module="surgery.exporters.onnx_publish", files=(ONNX_FILE, ONNX_DATA_FILE), tolerance=FP32_TOLERANCE,
              runtime="onnxruntime CPU, optimisation ALL", parity_key="onnx", cli_format="onnx", supports_fp16=True)
ONNX_HF = Format("onnx_hf", module="surgery.exporters.onnx_hf_layout",
                 files=tuple(f"{ONNX_HF_DIR}/{f}" for f in ONNX_HF_FILES.values()), tolerance=FP32_TOLERANCE,
                 runtime="onnxruntime CPU, optimisation ALL", parity_key="onnx_hf_layout", cli_format="onnx",
                 cli_layout="hf", supports_fp16=True, by_file=True)
OPENVINO = Format("openvino", module="surgery.exporters.openvino_export", files=(OPENVINO_XML, OPENVINO_BIN),
                  tolerance=OPENVINO_TOLERANCE, runtime="OpenVINO CPU plugin, f32", parity_key="openvino",
                  cli_format="openvino", extra=("openvino", "openvino"))

FORMATS = (ONNX, ONNX_HF, OPENVINO)

__all__ = ["ExportOptions", "FORMATS", "Format", "cli_choices", "format_for_cli", "format_named", "formats_present"]


def format_named(name: str) -> Format:
    for f in FORMATS:
        if f.name == name:
            return f
    raise UsageError(f"unknown export format {name!r}; known: {', '.join(f.name for f in FORMATS)}")


def cli_choices() -> tuple[list[str], list[str]]:
    """The `--format` and `--layout` values the registry offers."""
    return sorted({f.cli_format for f in FORMATS}), sorted({f.cli_layout for f in FORMATS}, key=lambda s: s != "plain")


def format_for_cli(cli_format: str, layout: str = "plain") -> Format:
    for f in FORMATS:
        if (f.cli_format, f.cli_layout) == (cli_format, layout):
            return f
    layouts = [f.cli_layout for f in FORMATS if f.cli_format == cli_format]
    raise UsageError(f"{{format}} {cli_format} takes {{layout}} {' or '.join(layouts) or '(none)'}, not {layout}",
                     parameters=("format", "layout"))


def formats_present(out_dir: Path) -> list[Format]:
    return [f for f in FORMATS if f.present(out_dir)]
