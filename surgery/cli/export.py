"""`vit-surgery export OUT --format onnx|openvino [--layout plain|hf]`: runtime files for a converted folder.

Imports nothing heavy at module level: this module is loaded to build the CLI parser.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any



def check_converted_folder(out: Path) -> None:
    """A folder written by `convert` (it always holds surgery.json), else a one-line error (exit 4)."""
    from surgery.core.errors import ModelInputError
    from surgery.core.output_format import SURGERY_FILE

    if not out.is_dir():
        raise ModelInputError(f"model folder not found: {out} (export works on a folder written by `convert`)")
    if not (out / SURGERY_FILE).is_file():
        raise ModelInputError(f"{out} is not a vit-surgery output (no {SURGERY_FILE}); export works on a folder "
                              "written by `vit-surgery convert`")


def verify_before_export(out: Path) -> None:
    """export only exports what convert wrote: OUT's files must match its integrity record (exit 11),
    and an OUT without a record is refused (nothing could tell a damaged folder from a good one)."""
    from surgery.core.errors import IntegrityError
    from surgery.core.integrity import verify_output

    if not verify_output(out):
        raise IntegrityError(f"{out} has no integrity record (written by an older vit-surgery, or surgery.json was "
                             "edited): run `vit-surgery convert` again to export it")


def cmd_export(a: argparse.Namespace) -> int:
    from surgery.core.errors import ModelInputError, UsageError

    out = Path(a.out_dir)
    if a.format == "openvino" and (a.fp16 or a.layout != "plain"):
        raise UsageError("--format openvino takes neither --fp16 nor --layout hf")
    check_converted_folder(out)
    verify_before_export(out)
    if a.layout != "hf" and "vlm" in json.loads((out / "surgery.json").read_text(encoding="utf-8")):
        raise ModelInputError(f"{out} is a vision-language model: export its vision encoder with "
                              "`--format onnx --layout hf` (onnx/vision_encoder.onnx)")
    # the heavy imports only once the arguments and OUT passed their checks
    from surgery.exporters.base import ExportOptions
    from surgery.exporters.formats import format_for_cli
    from surgery.backends import load_model
    from surgery.core.source import LoadOptions

    options = LoadOptions(a.allow_unsafe_pickle, a.trust_remote_code, a.device)
    if a.int8 is not None:
        return _export_int8(a, out, options)
    if a.images is not None:
        raise UsageError("--images is for --int8 static (calibration images)")
    fmt = format_for_cli(a.format, a.layout)
    if a.fp16 and not fmt.supports_fp16:
        raise UsageError(f"--format {a.format} takes no --fp16 (full precision only)")
    fmt.implementation()  # a missing optional package stops here, before the model loads
    report = fmt.export(out, load_model(str(out), options),
                        ExportOptions(fp16=a.fp16, exporter=a.exporter, overwrite=a.overwrite, progress=not a.quiet))
    print(report.summary())
    written = [str(out / f) for f in fmt.files if (out / f).exists()] or [report.path]  # a VLM: vision_encoder.onnx
    print(f"wrote {', '.join(written)}")
    return 0


def _export_int8(a: argparse.Namespace, out: Path, options: Any) -> int:
    """`--int8 [static|dynamic]`: exporters/onnx_int8.py."""
    from surgery.backends import load_model
    from surgery.core.errors import MissingExtraError, UsageError

    if a.fp16:
        raise UsageError("--int8 and --fp16 are exclusive")
    if a.format == "openvino":
        raise MissingExtraError("--format openvino --int8 needs NNCF post-training quantization, which this version "
                                "does not ship (no \"openvino-int8\" extra yet); OpenVINO runs the QDQ file of "
                                "`export OUT --format onnx --int8` as INT8 (openvino.convert_model)")
    if a.int8 == "static" and a.images is None:
        raise UsageError("--int8 static needs calibration images: --images CALIB (or use --int8 dynamic)")
    from surgery.exporters.onnx_int8 import export_int8

    report, written = export_int8(out, loaded=load_model(str(out), options), mode=a.int8, images=a.images,
                                  layout=a.layout, exporter=a.exporter, progress=not a.quiet, overwrite=a.overwrite)
    print(report.summary())
    print(f"wrote {written}")
    return 0


def add_commands(subparsers: Any) -> None:
    from surgery.exporters.formats import cli_choices
    from surgery.cli.args import add_model_options

    formats, layouts = cli_choices()

    e = subparsers.add_parser(
        "export", help="export a converted folder to ONNX or OpenVINO (validated before it is written)",
        description="Write OUT/model.onnx (input pixel_values [batch, 3, H, W]; outputs pooled and tokens, "
                    "register tokens included; recipe and token layout in the metadata), the HF ONNX layout "
                    "(--layout hf: onnx/model.onnx with last_hidden_state and pooler_output, config.json, "
                    "preprocessor_config.json) or an OpenVINO IR (--format openvino: openvino_model.xml/.bin), "
                    "and validate it against PyTorch and the hooked reference. A failed validation writes nothing.")
    e.add_argument("out_dir", metavar="OUT", help="folder written by `vit-surgery convert`")
    e.add_argument("--format", choices=formats, default="onnx", help="export format (default: onnx)")
    e.add_argument("--layout", choices=layouts, default="plain",
                   help="onnx only: plain OUT/model.onnx (default), or hf: the layout of HF ONNX repos "
                        "(optimum, transformers.js), see docs/exports/onnx.md")
    e.add_argument("--fp16", action="store_true",
                   help="onnx only: compute in float16 inside the graph (float32 inputs/outputs; tolerance 2e-2)")
    e.add_argument("--int8", nargs="?", const="static", choices=["static", "dynamic"], default=None,
                   help="onnx only: INT8 file next to the float one (static: QDQ calibrated on --images, "
                        "model_int8.onnx; dynamic: model_quantized.onnx, no images); the register branch stays "
                        "float; validated against the float32 model (cosine, see docs/exports/int8.md)")
    e.add_argument("--images", metavar="CALIB", default=None,
                   help="with --int8: calibration images (static), preprocessed with the model's own transform; every "
                        "4th is held out for validation (dynamic: validation images only; default: built-in)")
    e.add_argument("--exporter", choices=["dynamo", "legacy"], default="dynamo",
                   help="torch exporter to try first (the other is the fallback; default dynamo)")
    e.add_argument("--overwrite", action="store_true", help="replace existing exported files")
    e.add_argument("-q", "--quiet", action="store_true")
    add_model_options(e)
    e.set_defaults(func=cmd_export)
