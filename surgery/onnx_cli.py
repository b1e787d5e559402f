"""`vit-surgery export OUT --format onnx|openvino [--layout plain|hf]`: runtime files for a converted folder.

Imports nothing heavy at module level: this module is loaded to build the CLI parser.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

FORMATS = ("onnx", "openvino")
LAYOUTS = ("plain", "hf")


def check_converted_folder(out: Path) -> None:
    """A folder written by `convert` (it always holds surgery.json), else a one-line error (exit 4)."""
    from surgery.core.errors import ModelInputError

    if not out.is_dir():
        raise ModelInputError(f"model folder not found: {out} (export works on a folder written by `convert`)")
    if not (out / "surgery.json").is_file():
        raise ModelInputError(f"{out} is not a vit-surgery output (no surgery.json); export works on a folder "
                              "written by `vit-surgery convert`")


def cmd_export(a: argparse.Namespace) -> int:
    from surgery.core.errors import ModelInputError, OutputExistsError, SurgeryError
    from surgery.backends import load_model
    from surgery.core.source import LoadOptions

    out = Path(a.out_dir)
    check_converted_folder(out)
    if a.layout != "hf" and "vlm" in json.loads((out / "surgery.json").read_text(encoding="utf-8")):
        raise ModelInputError(f"{out} is a vision-language model: export its vision encoder with "
                              "`--format onnx --layout hf` (onnx/vision_encoder.onnx)")
    options = LoadOptions(a.allow_unsafe_pickle, a.trust_remote_code, a.device)
    if a.format == "openvino":
        if a.fp16 or a.layout != "plain":
            raise SurgeryError("--format openvino takes neither --fp16 nor --layout hf")
        from exporters.openvino_export import OV_XML, export_openvino, openvino_summary, require_openvino

        require_openvino()
        report = export_openvino(out, progress=not a.quiet, loaded=load_model(str(out), options), exporter=a.exporter,
                                 overwrite=a.overwrite)
        print(openvino_summary(report))
        print(f"wrote {out / OV_XML} (+ .bin)")
        return 0
    if a.layout == "hf":
        from exporters.onnx_hf_layout import export_hf_layout

        report, written = export_hf_layout(out, fp16=a.fp16, progress=not a.quiet, loaded=load_model(str(out), options),
                                           exporter=a.exporter, overwrite=a.overwrite)
        print(report.summary())
        print(f"wrote {written}")
        return 0
    from exporters.onnx_export import DATA_FILE, ONNX_FILE, export_and_validate

    target = out / ONNX_FILE
    if (target.exists() or (out / DATA_FILE).exists()) and not a.overwrite:
        raise OutputExistsError(f"output {target} already exists; pass --overwrite to replace it")
    report = export_and_validate(out, fp16=a.fp16, progress=not a.quiet, exporter=a.exporter, say_summary=False,
                                 loaded=load_model(str(out), options))
    print(report.summary())
    print(f"wrote {target}" + (f" (+ {DATA_FILE})" if report.external_data else ""))
    return 0


def add_commands(subparsers: Any) -> None:
    from surgery.cli_args import add_model_options

    e = subparsers.add_parser(
        "export", help="export a converted folder to ONNX or OpenVINO (validated before it is written)",
        description="Write OUT/model.onnx (input pixel_values [batch, 3, H, W]; outputs pooled and tokens, "
                    "register tokens included; recipe and token layout in the metadata), the HF ONNX layout "
                    "(--layout hf: onnx/model.onnx with last_hidden_state and pooler_output, config.json, "
                    "preprocessor_config.json) or an OpenVINO IR (--format openvino: openvino_model.xml/.bin), "
                    "and validate it against PyTorch and the hooked reference. A failed validation writes nothing.")
    e.add_argument("out_dir", metavar="OUT", help="folder written by `vit-surgery convert`")
    e.add_argument("--format", choices=FORMATS, default="onnx", help="export format (default: onnx)")
    e.add_argument("--layout", choices=LAYOUTS, default="plain",
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
