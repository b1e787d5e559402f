"""What a deployment format is to the rest of the project: one record per format, listed in the
registry (`exporters/formats.py`), as `Backend` records are for libraries (surgery/backends/base.py).

A record is light (names, files, tolerance): the CLI parser is built from the registry without loading
torch. The format's module, imported on first use, implements three functions:
- `export_format(out_dir, loaded, options) -> report`: export the converted folder's baked model,
  validate it, and only then move the files into place (the report of the last file written; every
  report is a `Verdict`, surgery/core/verdict.py);
- `open_session(path) -> session`: a runtime session on the format's main file, with onnxruntime's
  `run(output_names, feeds)` interface;
- `validate_present(out_dir, loaded, batches) -> [report]`: re-validate the format's files already in
  OUT (what `check` does with every format present).
Adding a format is that module plus one entry in `FORMATS`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Optional, Sequence

from surgery.core.verdict import Verdict


@dataclass(frozen=True)
class ExportOptions:
    fp16: bool = False
    exporter: str = "dynamo"  # the torch exporter tried first
    overwrite: bool = False
    progress: bool = True


@dataclass(frozen=True)
class Format:
    """One deployment format of a converted folder."""

    name: str  # registry name: "onnx", "onnx_hf", "openvino"
    module: str  # the module implementing export_format / open_session / validate_present
    files: tuple[str, ...]  # paths in OUT it writes; the first is its main file (present = that file is there)
    tolerance: float  # float32 tolerance of its validation (relative error per feature vector)
    runtime: str  # what runs it, as reports say it
    parity_key: str  # its section in OUT/parity.json
    cli_format: str  # `export --format` value ...
    cli_layout: str = "plain"  # ... and `--layout` value that select it
    supports_fp16: bool = False
    extra: Optional[tuple[str, str]] = None  # (module, pip extra) it needs beyond the base install
    by_file: bool = False  # parity.json records one report per file (formats with alternative files)

    def implementation(self) -> ModuleType:
        if self.extra is not None:
            from surgery.core.errors import require_extra

            require_extra(self.extra[0], self.extra[1], f"{self.name} export")
        return importlib.import_module(self.module)

    def present(self, out_dir: Path) -> bool:
        return (Path(out_dir) / self.files[0]).is_file()

    def export(self, out_dir: Path, loaded: Any, options: ExportOptions = ExportOptions()) -> Verdict:
        """Export and validate, then add what was written to OUT's integrity record (check verifies it)."""
        from surgery.core.integrity import record_written

        out_dir = Path(out_dir)
        report = self.implementation().export_format(out_dir, loaded, options)
        written = [*self.files, str(Path(report.path).resolve().relative_to(out_dir.resolve()))
                   if Path(report.path).resolve().is_relative_to(out_dir.resolve()) else None]
        record_written(out_dir, sorted({Path(n).as_posix() for n in written if n}))
        return report

    def session(self, path: Path) -> Any:
        return self.implementation().open_session(Path(path))

    def validate(self, out_dir: Path, loaded: Any, batches: Sequence[Any]) -> list[Verdict]:
        return self.implementation().validate_present(Path(out_dir), loaded, list(batches))
