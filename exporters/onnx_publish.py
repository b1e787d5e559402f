"""Export + validate + move into place: `export_and_validate(OUT, loaded=...)` takes the baked model in
OUT as loaded by the caller, exports `OUT/model.onnx` into a scratch folder, validates it, and only then
moves it into place (with parity.json's `onnx` section). The helpers are shared by the other formats
(HF layout, OpenVINO)."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch

from surgery.core.errors import ModelInputError, ParityError

from .onnx_export import export_onnx
from surgery.core.output_format import ONNX_DATA_FILE as DATA_FILE, write_json
from surgery.core.output_format import ONNX_FILE, PARITY_FILE
from surgery.core.outputs import atomic_output_file, check_replaceable, identity, move_file_into_place
from surgery.core import onnx_runtime
from surgery.core.progress import say_if

from .onnx_spec import EXTERNAL_DATA_THRESHOLD
from .base import ExportOptions
from .onnx_validate import OnnxReport, validate_onnx, validation_batches


@contextlib.contextmanager
def staged_output(out_dir: Path, prefix: str) -> Iterator[Path]:
    """A scratch folder inside `out_dir` (same filesystem: moving a file out of it is an atomic rename),
    removed afterwards whatever happens, so a failed export leaves nothing behind."""
    scratch = Path(tempfile.mkdtemp(prefix=prefix, dir=out_dir))
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def publish_validated(report: Any, failure: str, moves: Sequence[tuple[Path, Path]],
                      before: Optional[dict[Path, Any]] = None) -> None:
    """Raise ParityError(`failure`) unless `report` passed; then move each staged file onto its target,
    in order (an existing target is replaced only now). `before`: each target's identity() when the run
    started; a target that changed since (another run wrote it) is left alone and this run exits 8."""
    if not report.passed:
        raise ParityError(failure)
    for staged, target in moves:
        if before is not None and target in before:
            move_file_into_place(staged, target, before[target])
        else:
            os.replace(staged, target)


def record_parity_section(out_dir: Path, key: str, entry: Any, *, create: bool) -> None:
    """Set `key` in OUT/parity.json to `entry`, written atomically. A missing, unreadable or non-object
    parity.json is started afresh with `create`, left alone without."""
    f = out_dir / PARITY_FILE
    doc: Any = None
    if f.is_file():
        try:
            doc = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            doc = None
    if not isinstance(doc, dict):
        if not create:
            return
        doc = {}
    doc[key] = entry
    with atomic_output_file(f, overwrite=True) as tmp:
        write_json(tmp, doc)


def _update_parity_json(out_dir: Path, report: OnnxReport) -> None:
    record_parity_section(out_dir, "onnx", report.to_dict(), create=False)


def _staged_moves(scratch: Path, out_dir: Path, external: bool) -> list[tuple[Path, Path]]:
    """model.onnx and, for large models, its external weights, weights first (the graph names them)."""
    moves = [(scratch / DATA_FILE, out_dir / DATA_FILE)] if external else []
    return moves + [(scratch / ONNX_FILE, out_dir / ONNX_FILE)]


def export_and_validate(out_dir: Path, fp16: bool = False, progress: bool = True, *, loaded: Any,
                        exporter: str = "dynamo", batches: Optional[list[torch.Tensor]] = None,
                        external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
                        tolerance: Optional[float] = None, say_summary: bool = True) -> OnnxReport:
    """Load the baked model in `out_dir`, export it, validate it, and only then move `model.onnx` (and
    `model.onnx.data` for large models) into `out_dir`. Failing validation raises ParityError naming the
    outputs out of tolerance and writes nothing; an existing model.onnx is replaced only on success.
    With `progress`, steps (and the summary, unless `say_summary` is False) go to stderr."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise ModelInputError(f"model folder not found: {out_dir}")
    if loaded.recipe is None:
        raise ModelInputError(f"{out_dir} carries no baked test-time registers (run `vit-surgery convert` first)")
    before = {out_dir / name: identity(out_dir / name) for name in (ONNX_FILE, DATA_FILE)}
    with staged_output(out_dir, ".onnx-export-") as scratch:
        info = export_onnx(loaded, out_dir, scratch, fp16=fp16, exporter=exporter,
                           external_data_threshold=external_data_threshold, progress=progress)
        say_if(progress, f"validating {ONNX_FILE} in onnxruntime against PyTorch and the hooked reference")
        work = batches if batches is not None else validation_batches(loaded)
        report = validate_onnx(out_dir, loaded, work, onnx_path=info.path, tolerance=tolerance, progress=progress)
        report.path = str(out_dir / ONNX_FILE)
        publish_validated(report, f"ONNX export failed validation, no {ONNX_FILE} written: {report.summary()}",
                          _staged_moves(scratch, out_dir, info.external_data), before)
        if not info.external_data and (out_dir / DATA_FILE).exists():  # a previous, larger export's weights
            (out_dir / DATA_FILE).unlink()
        _update_parity_json(out_dir, report)
        say_if(progress and say_summary, report.summary())
        return report


# ---- the format registry's entry points (exporters/base.py) --------------------------------------

def export_format(out_dir: Path, loaded: Any, options: ExportOptions) -> OnnxReport:
    """OUT/model.onnx (+ model.onnx.data for large models), validated; an existing one only with overwrite."""
    target = out_dir / ONNX_FILE
    check_replaceable(out_dir / DATA_FILE, options.overwrite)
    check_replaceable(target, options.overwrite)
    return export_and_validate(out_dir, fp16=options.fp16, progress=options.progress, exporter=options.exporter,
                               say_summary=False, loaded=loaded)


def open_session(path: Path) -> Any:
    return onnx_runtime.open_session(path)


def validate_present(out_dir: Path, loaded: Any, batches: list[torch.Tensor]) -> list[OnnxReport]:
    return [validate_onnx(out_dir, loaded, batches)]
