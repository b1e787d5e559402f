"""safetensors with the recipe in the file's metadata (string -> string, deterministic)."""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
from safetensors import safe_open
from .output_format import write_json

METADATA_KEY = "vit_surgery"


_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL"}
_FLOAT_NAMES = ("F64", "F32", "F16", "BF16")
_TORCH_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}


def save_state_dict(state: Mapping[str, torch.Tensor], path: Path, surgery: Optional[dict[str, Any]]) -> None:
    """Write a safetensors file tensor by tensor, plus the recipe metadata.

    safetensors' own `save_file` serialises every tensor to bytes in memory first (a second copy of
    the model, a third with the unsharing clones); here each tensor goes to disk straight from its
    own storage, so writing costs one tensor. Same format (header sorted, data in key order);
    little-endian like every platform torch supports.
    """
    names = sorted(state)
    meta = {"format": "pt"}
    if surgery is not None:  # None: a plain file (benchmark fixtures)
        meta[METADATA_KEY] = json.dumps(surgery, sort_keys=True)
    header: dict[str, Any] = {"__metadata__": meta}
    offset = 0
    for k in names:
        t = state[k]
        if t.dtype not in _DTYPE_NAMES:
            raise TypeError(f"{k}: dtype {t.dtype} cannot be written to safetensors")
        size = t.numel() * t.element_size()
        header[k] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # tensors start 8-byte aligned, as safetensors writes them
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for k in names:
            t = state[k].detach().to("cpu").contiguous()
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)
            del t


def canonicalize_header(path: Path) -> None:
    """Rewrite the JSON header with sorted keys (same length, space padded).

    safetensors serialises its metadata map in hash order, which changes from process to process;
    sorting makes the same model give a byte-identical file.
    """
    with open(path, "r+b") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) > n:  # cannot happen for the same content; keep the original rather than corrupt it
            return
        f.seek(8)
        f.write(text + b" " * (n - len(text)))


def read_metadata(path: Path) -> dict[str, Any]:
    """The recipe + provenance stored in a baked safetensors file ({} for other files)."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    raw = meta.get(METADATA_KEY)
    return json.loads(raw) if raw else {}


# ---- a checkpoint as its files hold it: single file or shards + index, streamed --------------------

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_COPY_CHUNK = 1 << 24


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """(the JSON header, `__metadata__` included; where the tensor data starts) of a safetensors file."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n)), 8 + n


def _read_exactly(fd: int, buf: Any, pos: int, truncated: str) -> None:
    """Fill the writable buffer `buf` from file offset `pos` (preadv until done; OSError(`truncated`) at EOF)."""
    import os

    view, done = memoryview(buf), 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], pos + done)
        if n <= 0:
            raise OSError(truncated)
        done += n


class ShardedCheckpoint:
    """A `model.safetensors` or `model.safetensors.index.json` + its shards, read from the headers only.

    `tensor(name)` is the one place a tensor is built from these files (what the streamed VLM reads:
    its tower, and the language model one layer at a time for the judge); `copy_bytes` moves a tensor's
    stored bytes from file to file without building it. Deep copies share the object (it holds open
    files, not weights)."""

    def __init__(self, paths: dict[str, Path], index: Optional[dict[str, Any]]) -> None:
        self.paths = paths  # file name -> local path, in the order the checkpoint lists them
        self.index = index  # the index JSON (None: a single file)
        self.headers: dict[str, dict[str, Any]] = {}
        self.metadata: dict[str, dict[str, str]] = {}
        self.starts: dict[str, int] = {}
        self.file_of: dict[str, str] = {}
        for name, path in paths.items():
            header, start = read_header(path)
            self.metadata[name] = header.pop("__metadata__", None) or {}
            self.headers[name], self.starts[name] = header, start
            for tensor in header:
                self.file_of[tensor] = name

    @classmethod
    def open(cls, lookup: Callable[[str], Optional[Path]]) -> Optional["ShardedCheckpoint"]:
        """The checkpoint `lookup(file name) -> local path or None` finds: an index and its shards, else a
        single file; None when there is neither. A shard the index names that is missing raises OSError."""
        index_path = lookup(INDEX_FILE)
        if index_path is not None:
            index = json.loads(Path(index_path).read_text(encoding="utf-8"))
            names = list(dict.fromkeys(sorted(index.get("weight_map", {}).values())))
            paths = {}
            for name in names:
                p = lookup(name)
                if p is None:
                    raise OSError(f"{INDEX_FILE} names {name}, which is missing")
                paths[name] = Path(p)
            return cls(paths, index)
        single = lookup(SINGLE_FILE)
        return None if single is None else cls({SINGLE_FILE: Path(single)}, None)

    def __deepcopy__(self, memo: dict) -> "ShardedCheckpoint":
        return self

    def names(self) -> list[str]:
        return sorted(self.file_of)

    def info(self, name: str) -> dict[str, Any]:
        return self.headers[self.file_of[name]][name]

    def nbytes(self, name: str) -> int:
        begin, end = self.info(name)["data_offsets"]
        return end - begin

    def total_bytes(self) -> int:
        return sum(self.nbytes(n) for n in self.file_of)

    def tensor(self, name: str) -> torch.Tensor:
        """The stored tensor (its dtype), read into memory of its own: plain reads, no mapping of the file
        (a mapped file's touched pages would stay resident for as long as it is open)."""
        import os

        info = self.info(name)
        dtype = _TORCH_DTYPES[info["dtype"]]
        out = torch.empty(info["shape"], dtype=dtype)
        size = self.nbytes(name)
        if size:
            buf = out.reshape(-1).view(torch.uint8).numpy()
            file = self.file_of[name]
            pos = self.starts[file] + info["data_offsets"][0]
            fd = os.open(self.paths[file], os.O_RDONLY)
            try:
                _read_exactly(fd, buf, pos, f"{self.paths[file]}: truncated data for {name}")
            finally:
                os.close(fd)
        return out

    def read_into(self, name: str, out: "torch.Tensor", staging: Optional["torch.Tensor"] = None,
                  start_row: int = 0) -> None:
        """The stored tensor written into `out` (any floating dtype, any device), converted chunk by chunk
        through `staging` (uint8, reused by the caller): no allocation of the tensor's size, so a streamed
        unit's weights land in memory that is already there. `out` holds the whole tensor, or, from row
        `start_row` of its first axis on, as many whole rows as it has elements for."""
        import os

        info = self.info(name)
        dtype = _TORCH_DTYPES[info["dtype"]]
        shape = [int(d) for d in info["shape"]]
        count = math.prod(shape)
        row = math.prod(shape[1:]) if shape else 1
        rows = out.numel() // row if row else 0
        if out.numel() != count and (not shape or out.numel() % row or start_row + rows > shape[0]):
            raise ValueError(f"{name}: stored {shape}, {out.numel()} elements from row {start_row} to fill")
        if out.numel() == count and start_row:
            raise ValueError(f"{name}: the whole tensor asked for from row {start_row}")
        item = torch.empty((), dtype=dtype).element_size()
        chunk = max(item, (_COPY_CHUNK // item) * item)
        if staging is None or staging.numel() < chunk:
            staging = torch.empty(chunk, dtype=torch.uint8)
        flat = out.reshape(-1)
        file = self.file_of[name]
        pos = self.starts[file] + info["data_offsets"][0] + start_row * row * item
        size, done = out.numel() * item, 0
        fd = os.open(self.paths[file], os.O_RDONLY)
        try:
            while done < size:
                want = min(chunk, size - done)
                _read_exactly(fd, staging[:want].numpy(), pos + done, f"{self.paths[file]}: truncated data for {name}")
                flat[done // item:(done + want) // item].copy_(staging[:want].view(dtype))
                done += want
        finally:
            os.close(fd)

    def copy_bytes(self, name: str, dst: Any) -> None:
        """Append the tensor's stored bytes to the open binary file `dst`, in chunks."""
        file = self.file_of[name]
        begin, end = self.info(name)["data_offsets"]
        with open(self.paths[file], "rb") as f:
            f.seek(self.starts[file] + begin)
            left = end - begin
            while left > 0:
                chunk = f.read(min(_COPY_CHUNK, left))
                if not chunk:
                    raise OSError(f"{self.paths[file]}: truncated data for {name}")
                dst.write(chunk)
                left -= len(chunk)

    def hash_bytes(self, name: str, h: Any) -> None:
        """Feed the tensor's stored dtype and bytes to the hash `h` (hashlib), in chunks."""
        h.update(self.info(name)["dtype"].encode())

        class _Sink:
            write = h.update
        self.copy_bytes(name, _Sink())

    def same_bytes(self, name: str, other: "ShardedCheckpoint", other_name: Optional[str] = None) -> bool:
        """Is `name`'s tensor stored in `other` (as `other_name`) with the same dtype, shape and bytes?"""
        other_name = other_name or name
        if other_name not in other.file_of:
            return False
        a, b = self.info(name), other.info(other_name)
        if a["dtype"] != b["dtype"] or list(a["shape"]) != list(b["shape"]) or self.nbytes(name) != other.nbytes(other_name):
            return False
        ranges = []
        for ckpt, n in ((self, name), (other, other_name)):
            file = ckpt.file_of[n]
            ranges.append((ckpt.paths[file], ckpt.starts[file] + ckpt.info(n)["data_offsets"][0]))
        with open(ranges[0][0], "rb") as fa, open(ranges[1][0], "rb") as fb:
            fa.seek(ranges[0][1])
            fb.seek(ranges[1][1])
            left = self.nbytes(name)
            while left > 0:
                size = min(_COPY_CHUNK, left)
                if fa.read(size) != fb.read(size):
                    return False
                left -= size
        return True


def _tensor_entry(t: torch.Tensor, name: str) -> tuple[str, list[int], int]:
    if t.dtype not in _DTYPE_NAMES:
        raise TypeError(f"{name}: dtype {t.dtype} cannot be written to safetensors")
    return _DTYPE_NAMES[t.dtype], list(t.shape), t.numel() * t.element_size()


def write_checkpoint_like(src: ShardedCheckpoint, out_dir: Path, tensors: Mapping[str, torch.Tensor],
                          drop: set[str], new_in: str, surgery: Optional[dict[str, Any]],
                          cast: Optional[torch.dtype] = None) -> list[Path]:
    """Write `src`'s layout to `out_dir`: the same file names (and index), each file holding the same
    tensors as the source's, where a name in `tensors` is written from that tensor (replacing the
    source's, or added to the file `new_in` when the source has no such name), names in `drop` are left
    out, and every other tensor's stored bytes are copied from the source without being read into a
    tensor (`cast`: floating tensors stored in another dtype are read, cast and written one at a time).
    Files with nothing to change are copied whole. The recipe metadata goes into every rewritten file."""
    import shutil

    added = sorted(n for n in tensors if n not in src.file_of)
    written = []
    weight_map: dict[str, str] = {}
    for file, header in src.headers.items():
        names = sorted((set(header) - drop) | (set(added) if file == new_in else set()))
        for n in names:
            weight_map[n] = file
        recast = {n for n in names if n not in tensors and cast is not None and header[n]["dtype"] in _FLOAT_NAMES
                  and header[n]["dtype"] != _DTYPE_NAMES[cast]}
        dst = out_dir / file
        written.append(dst)
        if not (set(header) & (drop | set(tensors))) and file != new_in and not recast:
            shutil.copyfile(src.paths[file], dst)
            continue
        meta = dict(src.metadata[file]) or {"format": "pt"}
        if surgery is not None:
            meta[METADATA_KEY] = json.dumps(surgery, sort_keys=True)
        out_header: dict[str, Any] = {"__metadata__": meta}
        offset = 0
        for n in names:
            if n in tensors:
                dtype, shape, size = _tensor_entry(tensors[n], n)
            elif n in recast:
                dtype, shape = _DTYPE_NAMES[cast], list(header[n]["shape"])  # type: ignore[index]
                size = math.prod(shape) * torch.empty((), dtype=cast).element_size()
            else:
                dtype, shape, size = header[n]["dtype"], list(header[n]["shape"]), src.nbytes(n)
            out_header[n] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
        text = json.dumps(out_header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        text += b" " * (-len(text) % 8)
        with open(dst, "wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            for n in names:
                if n in tensors or n in recast:
                    t = tensors[n] if n in tensors else src.tensor(n).to(cast)
                    t = t.detach().to("cpu").contiguous()
                    if t.numel():
                        f.write(t.reshape(-1).view(torch.uint8).numpy().data)
                    del t
                else:
                    src.copy_bytes(n, f)
    if src.index is not None:
        index = json.loads(json.dumps(src.index))
        index["weight_map"] = dict(sorted(weight_map.items()))
        meta = index.setdefault("metadata", {})
        total = 0
        params = 0
        for f in dict.fromkeys(weight_map.values()):
            header, _ = read_header(out_dir / f)
            for n, info in header.items():
                if n == "__metadata__":
                    continue
                total += info["data_offsets"][1] - info["data_offsets"][0]
                params += math.prod(info["shape"])
        meta["total_size"] = total
        if "total_parameters" in meta:
            meta["total_parameters"] = params
        dst = out_dir / INDEX_FILE
        write_json(dst, index)
        written.append(dst)
    return written
