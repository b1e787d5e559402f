"""`vit-surgery export OUT --format onnx|openvino [--layout plain|hf]`: runtime files for a converted folder.

Imports nothing heavy at module level: this module is loaded to build the CLI parser.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any



def cmd_export(a: argparse.Namespace) -> int:
    from surgery import api
    from surgery.cli.args import progress_of

    api.check_export_request(Path(a.out_dir), a.format, a.layout, a.fp16, a.int8)  # before torch is imported
    res = api.export(Path(a.out_dir), format=a.format, layout=a.layout, fp16=a.fp16, int8=a.int8, images=a.images,
                     exporter=a.exporter, overwrite=a.overwrite, options=_options(a), progress=progress_of(a))
    print(res.summary())
    print(f"wrote {', '.join(res.written)}")
    return 0


def _options(a: argparse.Namespace) -> Any:
    from surgery.core.source import LoadOptions

    return LoadOptions(a.allow_unsafe_pickle, a.trust_remote_code, a.device)


def add_commands(subparsers: Any) -> None:
    from surgery.exporters.formats import cli_choices
    from surgery.cli.args import add_model_options, add_output_options

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
    add_output_options(e)
    add_model_options(e)
    e.set_defaults(func=cmd_export)
