"""The on-disk format of a vit-surgery output, in one place: file names, `surgery.json` (validated read
and write), the metadata record of an ONNX file (`OnnxMetadata`, to and from `metadata_props`) and the
tolerances an export is validated with.

Every writer and reader of these goes through here: the backends' writers and loaders, the exporters,
`check` and the ONNX graph rewrite (`surgery/onnx_graph/`), so a key or a file name is spelled once.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Optional

from .errors import ModelInputError, SurgeryError

# ---- file names ---------------------------------------------------------------------------------

SURGERY_FILE = "surgery.json"  # recipe + provenance + integrity record; every output folder has one
PARITY_FILE = "parity.json"  # the parity report, plus one section per validated export
NEURONS_FILE = "neurons.json"
ONNX_FILE = "model.onnx"
ONNX_DATA_FILE = "model.onnx.data"  # external weights next to model.onnx, only for models over 2 GB
ONNX_HF_DIR = "onnx"  # the HF layout: OUT/onnx/model.onnx next to config.json
ONNX_HF_FILES = {"float32": "model.onnx", "float16": "model_fp16.onnx"}
OPENVINO_XML = "openvino_model.xml"  # the names optimum-intel's OVModel classes look for
OPENVINO_BIN = "openvino_model.bin"


def require_onnx_path(path: Path) -> None:
    """Refuse (exit 4) an ONNX path that is no regular, non-empty file, saying which it is: an empty
    file parses as an empty graph, and a FIFO would block the reader."""
    if path.is_file():
        if path.stat().st_size == 0:
            raise ModelInputError(f"{path}: empty file, not an ONNX model")
        return
    if path.is_symlink() and not path.exists():
        raise ModelInputError(f"{path}: symbolic link to nothing (or a link loop), not an ONNX file")
    if path.exists():
        kind = "folder" if path.is_dir() else "FIFO, socket or device"
        raise ModelInputError(f"{path}: not a regular file (a {kind}), not an ONNX file")
    raise ModelInputError(f"{path}: no such ONNX file")


# ---- tolerances (relative error per feature vector, see surgery/core/judge.py) --------------------

FP32_TOLERANCE = 1e-5
FP16_TOLERANCE = 2e-2  # float16 keeps 11 significant bits; a dozen blocks accumulate a few 1e-3
OPENVINO_TOLERANCE = 1e-4  # the CPU plugin's float32 GELU tail decides an outlier-free image's register token



def recorded_tolerance(folder: Path) -> Optional[float]:
    """The tolerance convert judged `folder` with (parity.json's parity.tolerance), or None when the folder
    has no readable parity.json or no positive finite number there."""
    import math

    try:
        doc = json.loads((Path(folder) / PARITY_FILE).read_text(encoding="utf-8"))
        tol = float(doc["parity"]["tolerance"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return tol if math.isfinite(tol) and tol > 0 else None


# ---- surgery.json ----------------------------------------------------------------------------------

TOOL = "vit-surgery"
_OBJECT_KEYS = ("recipe", "token_layout", "source", "discovery", "integrity", "source_identity")


def _validated(doc: Any, where: str, kind: type[SurgeryError]) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise kind(f"{where}: not a JSON object")
    for key in _OBJECT_KEYS:
        if key in doc and not isinstance(doc[key], dict):
            raise kind(f"{where}: '{key}' is not an object")
    if "recipe" not in doc:
        raise kind(f"{where}: no 'recipe' (not written by vit-surgery)")
    regs = (doc.get("token_layout") or {}).get("register_indices", [])
    if not isinstance(regs, list) or not all(isinstance(i, int) for i in regs):
        raise kind(f"{where}: token_layout.register_indices is not a list of token indices")
    return doc


def _json_value(value: Any) -> Any:
    """What JSON cannot hold as it is: numbers of numpy / torch (0-d) as floats, anything else (a path) as text."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def json_text(doc: Any) -> str:
    """Every JSON file vit-surgery writes, as text: sorted keys, indented, newline-terminated (byte-identical
    across runs); numpy / torch numbers as floats, other non-JSON values (paths) as text."""
    return json.dumps(doc, indent=2, sort_keys=True, default=_json_value) + "\n"


def write_json(path: Path, doc: Any) -> None:
    """Write `doc` to `path` as `json_text` (UTF-8). The one JSON writer: parity.json, neurons.json,
    config files, reports."""
    Path(path).write_text(json_text(doc), encoding="utf-8")


def surgery_json_text(doc: Mapping[str, Any]) -> str:
    """The bytes of surgery.json (`json_text`)."""
    return json_text(doc)


def write_surgery_json(folder: Path, doc: Mapping[str, Any]) -> Path:
    """Write `folder/surgery.json` (validated first: a malformed record is a bug, ValueError)."""
    path = Path(folder) / SURGERY_FILE
    try:
        _validated(dict(doc), str(path), ModelInputError)
    except ModelInputError as e:
        raise ValueError(f"refusing to write a malformed {SURGERY_FILE}: {e}") from None
    path.write_text(surgery_json_text(doc), encoding="utf-8")
    return path


def read_surgery_json(folder: Path, *, kind: type[SurgeryError] = ModelInputError) -> Optional[dict[str, Any]]:
    """`folder/surgery.json`, validated; None when there is none. Unreadable or malformed: `kind`
    (ModelInputError for a loader, IntegrityError for `check`, which reads it to verify the output)."""
    path = Path(folder) / SURGERY_FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise kind(f"{path} is unreadable or corrupted (not valid JSON: {' '.join(str(e).split())[:200]})") from None
    return _validated(doc, str(path), kind)


# ---- ONNX metadata properties ---------------------------------------------------------------------

META_PREFIX = "vit_surgery."
FORMAT_VERSION = "1"


@dataclass
class OnnxMetadata:
    """vit-surgery's `metadata_props` of an ONNX file (keys `vit_surgery.<field>`; string values, JSON
    where structured). Written by the PyTorch export and the ONNX graph rewrite, read by validation,
    `check` and the OpenVINO conversion (which copies it into the IR's rt_info)."""

    recipe: Optional[dict[str, Any]] = None
    format_version: Optional[str] = None  # None: FORMAT_VERSION when written
    token_layout: Optional[dict[str, Any]] = None
    register_token_indices: Optional[list[int]] = None
    num_prefix_tokens: Optional[int] = None  # the baked model's, test-time registers included
    num_source_prefix_tokens: Optional[int] = None  # the source's: CLS and trained registers
    num_registers: Optional[int] = None
    source_model: Optional[str] = None
    source: Optional[dict[str, Any]] = None
    family: Optional[str] = None
    tool: Optional[str] = None  # None: "vit-surgery" when written
    tool_version: Optional[str] = None
    dtype: Optional[str] = None
    exporter: Optional[str] = None
    export_batch_size: Optional[int] = None
    interface: Optional[dict[str, Any]] = None
    preprocess: Optional[dict[str, Any]] = None
    float64_register_branch: Optional[list[str]] = None  # exports before the tail-accurate branch
    tail_accurate_register_branch: Optional[list[str]] = None
    graph_rewrite: Optional[dict[str, Any]] = None
    extra: dict[str, str] = field(default_factory=dict)  # keys this version does not know, kept as written

    _TEXT = ("format_version", "source_model", "family", "tool", "tool_version", "dtype", "exporter")
    _INT = ("num_prefix_tokens", "num_source_prefix_tokens", "num_registers", "export_batch_size")

    @classmethod
    def _names(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name != "extra"]

    def to_props(self) -> dict[str, str]:
        """`vit_surgery.<field>` -> string, in field order; fields left None are not written."""
        out = {}
        defaults = {"format_version": FORMAT_VERSION, "tool": TOOL}
        order = ["format_version"] + [n for n in self._names() if n != "format_version"]
        for name in order:
            v = getattr(self, name) if getattr(self, name) is not None else defaults.get(name)
            if v is None:
                continue
            out[META_PREFIX + name] = v if name in self._TEXT else str(v) if name in self._INT \
                else json.dumps(v, sort_keys=True, default=str)
        out.update({META_PREFIX + k: v for k, v in self.extra.items()})
        return out

    @classmethod
    def from_props(cls, props: Mapping[str, str], where: str = "ONNX file") -> "OnnxMetadata":
        """Decode the `vit_surgery.*` entries of `props` (other keys ignored); malformed: ModelInputError."""
        known, values, extra = set(cls._names()), {}, {}
        for key, raw in props.items():
            if not key.startswith(META_PREFIX):
                continue
            name = key[len(META_PREFIX):]
            if name not in known:
                extra[name] = raw
                continue
            try:
                values[name] = raw if name in cls._TEXT else int(raw) if name in cls._INT else json.loads(raw)
            except ValueError:
                raise ModelInputError(f"{where}: metadata property {key} is malformed") from None
        return cls(**values, extra=extra)

    def as_dict(self) -> dict[str, Any]:
        """The fields present (not None), decoded, plus unknown keys: what `read_onnx_metadata` returns."""
        out = {n: getattr(self, n) for n in self._names() if getattr(self, n) is not None}
        out.update(self.extra)
        return out
