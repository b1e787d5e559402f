"""`vit-surgery export OUT --format onnx|openvino [--layout plain|hf]`: runtime files for a converted folder.

Imports nothing heavy at module level: this module is loaded to build the CLI parser.
"""
from __future__ import annotations

import argparse
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


def cmd_export(a: argparse.Namespace) -> int:
    from exporters.base import ExportOptions
    from exporters.formats import format_for_cli
    from surgery.backends import load_model
    from surgery.core.errors import UsageError
    from surgery.core.source import LoadOptions

    out = Path(a.out_dir)
    check_converted_folder(out)
    fmt = format_for_cli(a.format, a.layout)
    if a.fp16 and not fmt.supports_fp16:
        raise UsageError(f"--format {a.format} takes no --fp16 (full precision only)")
    fmt.implementation()  # a missing optional package stops here, before the model loads
    options = LoadOptions(a.allow_unsafe_pickle, a.trust_remote_code, a.device)
    report = fmt.export(out, load_model(str(out), options),
                        ExportOptions(fp16=a.fp16, exporter=a.exporter, overwrite=a.overwrite, progress=not a.quiet))
    print(report.summary())
    written = [out / f for f in fmt.files if (out / f).exists()]
    print(f"wrote {', '.join(str(w) for w in written)}")
    return 0


def add_commands(subparsers: Any) -> None:
    from exporters.formats import cli_choices
    from surgery.cli_args import add_model_options

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
                        "(optimum, transformers.js), see README")
    e.add_argument("--fp16", action="store_true",
                   help="onnx only: compute in float16 inside the graph (float32 inputs/outputs; tolerance 2e-2)")
    e.add_argument("--exporter", choices=["dynamo", "legacy"], default="dynamo",
                   help="torch exporter to try first (the other is the fallback; default dynamo)")
    e.add_argument("--overwrite", action="store_true", help="replace existing exported files")
    e.add_argument("-q", "--quiet", action="store_true")
    add_model_options(e)
    e.set_defaults(func=cmd_export)
