"""`vit-surgery export OUT --format onnx`: write and validate OUT/model.onnx for a converted folder."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def cmd_export(a: argparse.Namespace) -> int:
    from surgery.errors import ModelInputError, OutputExistsError
    from surgery.loading import LoadOptions

    from .onnx_export import DATA_FILE, ONNX_FILE, export_and_validate

    out = Path(a.out_dir)
    if not out.is_dir():
        raise ModelInputError(f"model folder not found: {out} (export works on a folder written by `convert`)")
    target = out / ONNX_FILE
    if (target.exists() or (out / DATA_FILE).exists()) and not a.overwrite:
        raise OutputExistsError(f"output {target} already exists; pass --overwrite to replace it")
    report = export_and_validate(out, fp16=a.fp16, progress=not a.quiet, exporter=a.exporter, say_summary=False,
                                 options=LoadOptions(a.allow_unsafe_pickle, a.trust_remote_code, a.device))
    print(report.summary())
    print(f"wrote {target}" + (f" (+ {DATA_FILE})" if report.external_data else ""))
    return 0


def add_commands(subparsers: Any) -> None:
    from surgery.cli import add_model_options

    e = subparsers.add_parser(
        "export", help="export a converted folder to ONNX (validated in onnxruntime before it is written)",
        description="Write OUT/model.onnx (input pixel_values [batch, 3, H, W]; outputs pooled and tokens, "
                    "register tokens included; recipe and token layout in the metadata) and validate it "
                    "against PyTorch and the hooked reference. A failed validation writes nothing.")
    e.add_argument("out_dir", metavar="OUT", help="folder written by `vit-surgery convert`")
    e.add_argument("--format", choices=["onnx"], default="onnx", help="export format (default: onnx)")
    e.add_argument("--fp16", action="store_true",
                   help="compute in float16 inside the graph (float32 inputs/outputs; tolerance 2e-2)")
    e.add_argument("--exporter", choices=["dynamo", "legacy"], default="dynamo",
                   help="torch exporter to try first (the other is the fallback; default dynamo)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing OUT/model.onnx")
    e.add_argument("-q", "--quiet", action="store_true")
    add_model_options(e)
    e.set_defaults(func=cmd_export)
