"""A bounded look at an ONNX file's protobuf before onnx / onnx_ir parse it (exit 4 on what is refused).

Parsing builds the whole graph in memory: a file of 2^20 nested `If` subgraphs takes over 12 GB before any
check on the graph can run. This scan reads the wire format straight from the mapped file, keeping only
counters, and refuses

- subgraphs nested deeper than MAX_SUBGRAPH_DEPTH, or more than MAX_SUBGRAPHS of them (exported models nest
  control flow a level or two; a ViT has none, and recognise() refuses control flow anyway);
- a tensor (initializer, `Constant` value or any attribute tensor) whose dims declare more elements than its
  data holds (2^40 elements and no data), found before anything allocates it;
- an external-data reference outside the model's folder (refused by its name: that file is never opened),
  to a missing file, or to a file shorter than the tensor declares.

A file the scan cannot read as protobuf is left to the parser, which names the error.
"""
from __future__ import annotations

import math
import mmap
from pathlib import Path
from typing import Iterator

from ..core.errors import ModelInputError

MAX_SUBGRAPH_DEPTH = 4
MAX_SUBGRAPHS = 4096

# field numbers of onnx.proto3
_MODEL_GRAPH, _MODEL_FUNCTIONS = 7, 25
_GRAPH_NODE, _GRAPH_INITIALIZER = 1, 5
_FUNCTION_NODE = 7
_NODE_ATTRIBUTE = 5
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS = 5, 6, 10, 11
_T_DIMS, _T_TYPE, _T_NAME, _T_RAW, _T_EXTERNAL, _T_LOCATION = 1, 2, 8, 9, 13, 14
_T_TYPED = {4: 4, 5: 0, 6: -1, 7: 0, 10: 8, 11: 0}  # typed data fields: fixed width in bytes, 0 varint, -1 bytes
# bits per element of each TensorProto.DataType (unknown types: 4, the smallest, so none is refused wrongly)
_BITS = {1: 32, 2: 8, 3: 8, 4: 16, 5: 16, 6: 32, 7: 64, 9: 8, 10: 16, 11: 64, 12: 32, 13: 64, 14: 64, 15: 128,
         16: 16, 17: 8, 18: 8, 19: 8, 20: 8, 21: 4, 22: 4, 23: 4}


class _Malformed(Exception):
    """Not protobuf: the parser reports it."""


def _varint(buf: mmap.mmap | bytes, i: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if i >= end or shift > 63:
            raise _Malformed
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _fields(buf: mmap.mmap | bytes, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, a, b) of each field in buf[start:end]: a varint's value as (value, 0), a
    length-delimited field's payload as its (start, end), fixed-width ones as their span."""
    i = start
    while i < end:
        key, i = _varint(buf, i, end)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i, end)
            yield field, wire, value, 0
        elif wire == 2:
            n, i = _varint(buf, i, end)
            if i + n > end:
                raise _Malformed
            yield field, wire, i, i + n
            i += n
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            if i + width > end:
                raise _Malformed
            yield field, wire, i, i + width
            i += width
        else:
            raise _Malformed


class _Scan:
    def __init__(self, path: Path, buf: mmap.mmap | bytes) -> None:
        self.path, self.buf, self.graphs = path, buf, 0
        self.folder = path.resolve().parent

    def graph(self, start: int, end: int, depth: int, node_field: int = _GRAPH_NODE) -> None:
        if depth > MAX_SUBGRAPH_DEPTH:
            raise ModelInputError(f"{self.path}: subgraphs nested more than {MAX_SUBGRAPH_DEPTH} deep (control flow "
                                  "inside control flow); refused before the graph is parsed")
        self.graphs += depth > 0  # the main graph is no subgraph
        if self.graphs > MAX_SUBGRAPHS:
            raise ModelInputError(f"{self.path}: more than {MAX_SUBGRAPHS} subgraphs; refused before the graph "
                                  "is parsed")
        for field, wire, a, b in _fields(self.buf, start, end):
            if wire != 2:
                continue
            if field == node_field:
                self.node(a, b, depth)
            elif field == _GRAPH_INITIALIZER and node_field == _GRAPH_NODE:
                self.tensor(a, b)

    def node(self, start: int, end: int, depth: int) -> None:
        for field, wire, a, b in _fields(self.buf, start, end):
            if field != _NODE_ATTRIBUTE or wire != 2:
                continue
            for afield, awire, x, y in _fields(self.buf, a, b):
                if awire != 2:
                    continue
                if afield in (_ATTR_G, _ATTR_GRAPHS):
                    self.graph(x, y, depth + 1)
                elif afield in (_ATTR_T, _ATTR_TENSORS):
                    self.tensor(x, y)

    def tensor(self, start: int, end: int) -> None:
        dims: list[int] = []
        dtype, name, raw, entries, external, location = 0, "", None, 0, {}, 0
        for field, wire, a, b in _fields(self.buf, start, end):
            if field == _T_DIMS:
                if wire == 0:
                    dims.append(a)
                else:  # packed
                    i = a
                    while i < b:
                        d, i = _varint(self.buf, i, b)
                        dims.append(d)
            elif field == _T_TYPE and wire == 0:
                dtype = a
            elif field == _T_NAME and wire == 2:
                name = bytes(self.buf[a:b]).decode("utf-8", "replace")
            elif field == _T_RAW and wire == 2:
                raw = b - a
            elif field in _T_TYPED:
                width = _T_TYPED[field]
                if wire == 2 and width > 0:  # packed fixed-width
                    entries += (b - a) // width
                elif wire == 2 and width == 0:  # packed varints: one per byte below 0x80
                    chunk = bytes(self.buf[a:b])
                    entries += len(chunk) - len(chunk.translate(None, bytes(range(128))))
                else:  # one entry per field (also each string of string_data)
                    entries += 1
            elif field == _T_EXTERNAL and wire == 2:
                entry = {k: bytes(self.buf[x:y]).decode("utf-8", "replace")
                         for k, w, x, y in _fields(self.buf, a, b) if w == 2}
                external[entry.get(1, "")] = entry.get(2, "")
            elif field == _T_LOCATION and wire == 0:
                location = a
        if any(d >= 2**63 for d in dims):  # a negative int64 dim
            raise ModelInputError(f"{self.path}: tensor {name} has a negative dimension {dims}")
        elements = math.prod(dims)
        need_bytes = (elements * _BITS.get(dtype, 4) + 7) // 8
        if location == 1:  # EXTERNAL
            self.external(name, external, need_bytes)
            return
        # what is present: raw bytes, or typed entries (at most 2 elements each: 4-bit types pack two)
        holds = max((raw or 0) * 8 // _BITS.get(dtype, 4), 2 * entries)
        if elements > holds:
            raise ModelInputError(f"{self.path}: tensor {name} declares {elements} elements (dims {dims}) but holds "
                                  f"data for {holds}; refused before anything is allocated")

    def external(self, name: str, entry: dict[str, str], need_bytes: int) -> None:
        where = Path(entry.get("location", ""))
        target = (self.folder / where).resolve()
        if where.is_absolute() or ".." in where.parts or not target.is_relative_to(self.folder):
            raise ModelInputError(f"{self.path}: tensor {name} points at external data {str(where)!r} outside the "
                                  "model's folder; refused (the file is not opened)")
        if not str(where) or not target.is_file():
            raise ModelInputError(f"{self.path}: tensor {name} needs external data file {str(where)!r}, which is "
                                  "missing")
        try:
            offset, length = int(entry.get("offset", 0)), entry.get("length")
            need = offset + (int(length) if length is not None else need_bytes)
        except ValueError:
            raise ModelInputError(f"{self.path}: tensor {name} has an unreadable external-data offset or "
                                  "length") from None
        if target.stat().st_size < need:
            raise ModelInputError(f"{self.path}: external data file {str(where)!r} is shorter than tensor {name} "
                                  f"declares ({target.stat().st_size} < {need} bytes)")

    def model(self) -> None:
        size = len(self.buf)
        for field, wire, a, b in _fields(self.buf, 0, size):
            if wire != 2:
                continue
            if field == _MODEL_GRAPH:
                self.graph(a, b, 0)
            elif field == _MODEL_FUNCTIONS:  # a function's body counts as one level of subgraph
                self.graph(a, b, 1, node_field=_FUNCTION_NODE)


def prescan_onnx(path: Path) -> None:
    """Refuse (ModelInputError, exit 4) a file whose subgraph nesting, tensor sizes or external data is
    unsafe, reading its protobuf without parsing it (see the module docstring). `path` is a regular file."""
    with open(path, "rb") as f:
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (ValueError, OSError):  # empty or unmappable: the parser says why
            return
        with buf:
            try:
                _Scan(path, buf).model()
            except _Malformed:
                return
