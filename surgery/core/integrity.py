"""What convert wrote, recorded so that `check` can tell a corrupted or modified output from a good one.

surgery.json gets two blocks:
- "integrity": sha256 of every tensor's bytes in each safetensors file (with dtype and shape) and of
  every other file convert wrote (configs, modeling code), so a flipped byte names its tensor;
- "source_identity": the source's spec, its local path when it has one, and a sha256 over its weights
  (names, dtypes, shapes, bytes), so `check --source` can tell whether it was given the right model.

Also here: the NaN/Inf scan every loaded model goes through (the message names the tensor).
"""
from __future__ import annotations

import hashlib
import json
import struct
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from .errors import IntegrityError, NonFiniteError
from .output_format import OPENVINO_BIN, OPENVINO_XML, SURGERY_FILE, read_surgery_json, surgery_json_text

if TYPE_CHECKING:  # verifying files needs no torch: `check` and `export` refuse a damaged OUT before importing it
    from torch import nn

_CHUNK = 1 << 24


# ---- NaN / Inf -----------------------------------------------------------------------------------

def assert_finite(model: nn.Module, what: str) -> None:
    """Refuse weights holding NaN or Inf, naming the first such tensor (exit 4)."""
    import torch

    for name, t in model.state_dict().items():
        if t.device.type == "meta":  # a streamed VLM's language model: judged from its files (NaN fails the judge)
            continue
        if not torch.is_floating_point(t) or bool(torch.isfinite(t).all()):
            continue
        nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        raise NonFiniteError(f"{what}: weight tensor {name} contains {nan} NaN and {inf} Inf value(s); "
                             "the model cannot be converted or checked")


# ---- hashing ---------------------------------------------------------------------------------------

def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _safetensors_header(f: Any) -> tuple[dict[str, Any], int]:
    raw = f.read(8)
    if len(raw) < 8:
        raise ValueError("file too short")
    n = struct.unpack("<Q", raw)[0]
    header = json.loads(f.read(n))
    return header, 8 + n


def safetensors_digests(path: Path) -> dict[str, dict[str, Any]]:
    """name -> {dtype, shape, sha256 of the tensor's bytes}, read straight from the file (no torch)."""
    out: dict[str, dict[str, Any]] = {}
    with open(path, "rb") as f:
        header, base = _safetensors_header(f)
        for name, info in sorted(header.items()):
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            f.seek(base + start)
            h, left = hashlib.sha256(), end - start
            while left > 0:
                chunk = f.read(min(_CHUNK, left))
                if not chunk:
                    break
                h.update(chunk)
                left -= len(chunk)
            out[name] = {"dtype": info["dtype"], "shape": info["shape"], "sha256": h.hexdigest()}
    return out


def weights_sha256(model: nn.Module) -> str:
    """One hash over a model's state dict: names, dtypes, shapes and bytes (independent of file format).
    Tensors a streamed VLM keeps in its files (meta in the model) are hashed from their stored bytes."""
    import torch

    h = hashlib.sha256()
    stored = getattr(model, "surgery_checkpoint", None)
    for name, t in sorted(model.state_dict().items()):
        if t.device.type == "meta" and stored is not None:
            h.update(f"{name}|stored|{tuple(t.shape)}|".encode())
            stored.hash_bytes(name, h)
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ---- recording (convert) ---------------------------------------------------------------------------

def integrity_record(folder: Path) -> dict[str, Any]:
    """Hashes of every file now in `folder` (what the exporter wrote), tensor by tensor for safetensors."""
    record: dict[str, Any] = {"algorithm": "sha256", "files": {}, "tensors": {}}
    for f in sorted(folder.rglob("*")):
        name = f.relative_to(folder).as_posix()
        if name == SURGERY_FILE or f.suffix == ".md" or not f.is_file():  # documentation may be rewritten
            continue
        if f.suffix == ".safetensors":
            record["tensors"][name] = safetensors_digests(f)
        else:
            record["files"][name] = file_sha256(f)
    return record


def _class_name(model: nn.Module) -> str:
    return f"{type(model).__module__}.{type(model).__qualname__}"  # timm's and open_clip's VisionTransformer differ


def source_identity(spec: str, model: nn.Module, relative_path: Optional[str] = None) -> dict[str, Any]:
    """`relative_path`: where the source lies relative to the output folder, recorded instead of an
    absolute path when both are written together (the demo), so the record stays byte-reproducible."""
    from .outputs import local_source_path

    path = relative_path or local_source_path(spec)
    prefix = next((p for p in ("local-dir:", "hf:", "dinov2:", "open_clip:") if spec.startswith(p)), "")
    return {"spec": spec, "path": str(path) if path else None, "local_spec": f"{prefix}{path}" if path else None,
            "model_class": _class_name(model), "weights_sha256": weights_sha256(model)}


def record_integrity(folder: Path, spec: str, source_model: nn.Module, relative_path: Optional[str] = None) -> None:
    """Add "integrity" and "source_identity" to folder/surgery.json (written by every exporter)."""
    doc = read_surgery_json(folder, kind=IntegrityError)
    doc["integrity"] = integrity_record(folder)
    doc["source_identity"] = source_identity(spec, source_model, relative_path)
    (folder / SURGERY_FILE).write_text(surgery_json_text(doc), encoding="utf-8")


def record_written(folder: Path, names: list[str]) -> None:
    """Add (or refresh) the hashes of files an export just wrote into OUT (paths relative to it) to OUT's
    integrity record; a name no longer there leaves the record. Without a record nothing is added (export
    refuses such an OUT; convert records the whole folder)."""
    from .outputs import atomic_output_file, folder_locked

    with folder_locked(folder):  # concurrent exports into one OUT each keep their entries
        doc = read_surgery_json(folder, kind=IntegrityError)
        record = (doc or {}).get("integrity")
        if doc is None or not isinstance(record, dict):
            return
        files = record.setdefault("files", {})
        for name in names:
            f = folder / name
            if f.is_file():
                files[name] = file_sha256(f)
            else:
                files.pop(name, None)
        with atomic_output_file(folder / SURGERY_FILE, overwrite=True, locked=True) as tmp:
            tmp.write_text(surgery_json_text(doc), encoding="utf-8")


def record_onnx_output(folder: Path, recipe: dict[str, Any], source: str) -> None:
    """surgery.json of an ONNX input's output folder (every file in it written by this run): the recipe,
    the source, and the hash of every file, so `check` tells a modified file from a good one (exit 11)."""
    from .output_format import TOOL, write_surgery_json

    write_surgery_json(folder, {"recipe": recipe, "tool": TOOL, "source_model": source, "format": "onnx",
                                "integrity": integrity_record(folder)})


def verify_before_check(out: Path, *, say_missing: bool = True) -> bool:
    """`check`'s first step on OUT (a converted folder, or an ONNX output file or folder): its files against
    the integrity record (IntegrityError, exit 11, on damage or an unrecorded runtime file: before any model
    loads). False when there is no record, with a warning that only the comparison with --source can tell
    a damaged output from a good one: surgery.json without a record (an older vit-surgery) is always said;
    no surgery.json at all only with `say_missing` (else the caller says it, once it knows OUT is an output)."""
    folder = out if out.is_dir() else out.parent
    if verify_output(folder, every_deployment_file=True):
        return True
    if read_surgery(folder) is not None:
        warnings.warn(f"{out} has no integrity record (written by an older vit-surgery): damaged files are only "
                      "caught with --source", stacklevel=3)
    elif say_missing:
        warnings.warn(f"{out} has no integrity record ({SURGERY_FILE} deleted, or not written by convert): only the "
                      "comparison with --source judges it", stacklevel=3)
    return False


def is_deployment_file(name: str) -> bool:
    """A runtime file an export writes (ONNX graphs and their weights, OpenVINO IR): each must be recorded."""
    base = name.rsplit("/", 1)[-1]
    return base.endswith((".onnx", ".onnx.data", ".onnx_data")) or base in (OPENVINO_XML, OPENVINO_BIN)


# ---- verification (check) --------------------------------------------------------------------------

def read_surgery(folder: Path) -> Optional[dict[str, Any]]:
    """OUT's surgery.json for `check`: None when there is none; unreadable or malformed is damage (exit 11)."""
    return read_surgery_json(folder, kind=IntegrityError)


def verify_output(folder: Path, *, every_deployment_file: bool = False) -> bool:
    """Compare OUT's files with the hashes convert (and each export) recorded. Returns False when there is
    no record (an output of an older vit-surgery); raises IntegrityError naming the first damaged file or
    tensor. `every_deployment_file` (check): an ONNX or OpenVINO file in OUT that no record names is damage
    too (nothing could tell it from a good one)."""
    doc = read_surgery(folder)
    record = (doc or {}).get("integrity")
    if not isinstance(record, dict):
        return False
    if every_deployment_file:
        recorded = set(record.get("files", {}))
        for f in sorted(folder.rglob("*")):
            name = f.relative_to(folder).as_posix()
            if is_deployment_file(name) and name not in recorded and not name.startswith("."):
                raise IntegrityError(f"{folder}: {name} is not in OUT's integrity record (vit-surgery did not write "
                                     "it, or an older version did): export it again")
    for name, digest in sorted(record.get("files", {}).items()):
        f = folder / name
        if not f.is_file():
            raise IntegrityError(f"{folder}: {name} is missing (convert wrote it)")
        if file_sha256(f) != digest:
            raise IntegrityError(f"{folder}: {name} differs from what convert wrote (corrupted or modified)")
    for name, tensors in sorted(record.get("tensors", {}).items()):
        f = folder / name
        if not f.is_file():
            raise IntegrityError(f"{folder}: {name} is missing (convert wrote it)")
        try:
            have = safetensors_digests(f)
        except (ValueError, KeyError, OSError, UnicodeDecodeError) as e:
            raise IntegrityError(f"{folder}: {name} is corrupted (unreadable header: {e})") from None
        for tensor, want in sorted(tensors.items()):
            got = have.get(tensor)
            if got is None:
                raise IntegrityError(f"{folder}: tensor {tensor} is missing from {name}")
            if got != want:
                raise IntegrityError(f"{folder}: tensor {tensor} in {name} differs from what convert wrote "
                                     "(corrupted or modified)")
        extra = sorted(set(have) - set(tensors))
        if extra:
            raise IntegrityError(f"{folder}: {name} holds tensor {extra[0]} that convert did not write")
    return True


def recorded_source(folder: Path) -> Optional[dict[str, Any]]:
    doc = read_surgery(folder)
    ident = (doc or {}).get("source_identity")
    return ident if isinstance(ident, dict) else None


def same_source(identity: dict[str, Any], model: nn.Module) -> Optional[bool]:
    """Is `model` the recorded source? None when it cannot be told (another class, e.g. after --to timm)."""
    if identity.get("model_class") != _class_name(model) or not identity.get("weights_sha256"):
        return None
    return weights_sha256(model) == identity["weights_sha256"]


def source_for_check(folder: Path, explicit: Optional[str], load: Callable[[str], Any]) -> tuple[Optional[nn.Module], str]:
    """The model `check` compares OUT against: --source (which must be OUT's source when that can be
    told), else the recorded source when it is still on this machine unchanged, else None (un-bake OUT,
    trustworthy only because its hashes were verified). Returns (model or None, what was used)."""
    ident = recorded_source(folder) or {}
    if explicit:
        model = load(explicit).model
        if ident and same_source(ident, model) is False:
            raise IntegrityError(f"{{source}} {explicit} is not the model {folder} was converted from "
                                 f"({ident.get('spec')}): its weights differ from the recorded hash",
                                 parameters=("source",))
        return model, f"the source model {explicit}"
    spec, recorded = ident.get("local_spec"), ident.get("path")
    if spec and recorded and not Path(recorded).is_absolute():  # recorded relative to OUT (the demo)
        spec = spec[: len(spec) - len(recorded)] + str(folder / recorded)
        recorded = str(folder / recorded)
    if spec and recorded and Path(recorded).exists():
        model = load(spec).model
        same = same_source(ident, model)
        if same:
            return model, f"the source model {spec}"
        if same is False:
            warnings.warn(f"the source recorded for {folder} ({spec}) has changed since convert; compared against "
                          "the un-baked weights instead", stacklevel=2)
    return None, "OUT's own weights un-baked (pass --source MODEL to compare against the original)"
