"""Weights read tensor by tensor: a checkpoint never sits in memory next to the model it fills.

`load_state_dict(load_file(path))` holds the whole file as a second copy of the model while it
copies; for a 10 GB CLIP that is the difference between converting on a 24 GB machine and not.
Here each tensor is read from the (memory-mapped) safetensors file and copied into the model's own
parameter before the next one is read, so loading costs the model plus one tensor.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .memory import trim_heap
from .modules import attach_legacy_branches, fold_attached_legacy_branches, stores_legacy_branches


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


class MappedSafetensors:
    """A safetensors file mapped copy-on-write: `tensor(name)` is a view of the file's bytes, no copy.

    Pages are read from (and shared with) the page cache, so a file convert has just written costs
    no new memory when it is loaded back; writes to a view stay private to this process."""

    def __init__(self, path: str | Path) -> None:
        import json
        import mmap
        import struct

        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            self.header = {k: v for k, v in json.loads(f.read(n)).items() if k != "__metadata__"}
            self.start = 8 + n
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)

    def tensor(self, name: str) -> torch.Tensor:
        info = self.header[name]
        dtype = _ST_DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        count = (end - begin) // torch.empty((), dtype=dtype).element_size()
        if count == 0:
            return torch.empty(info["shape"], dtype=dtype)
        return torch.frombuffer(self.map, dtype=dtype, count=count, offset=self.start + begin).view(info["shape"])


def _fill(dst: torch.Tensor, name: str, f, mapped: "MappedSafetensors | None") -> None:  # type: ignore[no-untyped-def]
    """dst <- the file's tensor: a view of the mapped file when dtype and device allow, else a copy."""
    if mapped is not None and dst.device.type == "cpu" and name in mapped.header \
            and _ST_DTYPES.get(mapped.header[name]["dtype"]) == dst.dtype \
            and list(mapped.header[name]["shape"]) == list(dst.shape):
        dst.data = mapped.tensor(name)
        return
    src = f.get_tensor(name)
    if tuple(src.shape) != tuple(dst.shape):
        raise RuntimeError(f"Error(s) in loading state_dict: size mismatch for {name}: copying a param with shape "
                           f"{tuple(src.shape)} from checkpoint, the shape in current model is {tuple(dst.shape)}.")
    dst.copy_(src)


def _check_shapes(f, targets: dict[str, torch.Tensor], names: list[str], what: str) -> None:  # type: ignore[no-untyped-def]
    """Every shape mismatch at once, worded like load_state_dict's, before anything is copied."""
    bad = []
    for name in names:
        shape = tuple(f.get_slice(name).get_shape())
        if shape != tuple(targets[name].shape):
            bad.append(f"size mismatch for {name}: copying a param with shape {shape} from checkpoint, the shape "
                       f"in current model is {tuple(targets[name].shape)}.")
    if bad:
        raise RuntimeError(f"Error(s) in loading state_dict for {what}: " + " ".join(bad))


def stored_float_dtype(path: str | Path) -> torch.dtype | None:
    """The most common floating dtype of the tensors in a safetensors file (from its header)."""
    from .source import safetensors_dtype, torch_dtype

    name = safetensors_dtype(path)
    return torch_dtype(name) if name else None


@torch.no_grad()
def load_safetensors_streamed(model: nn.Module, path: str | Path, device: str | torch.device = "cpu",
                              cast: bool = True, map_file: bool = False) -> None:
    """Fill `model` strictly from the safetensors file `path`, one tensor at a time.

    `map_file`: tensors whose dtype matches become views of the file mapped copy-on-write
    (MappedSafetensors) instead of copies. With `cast`, the model is first cast to the file's floating dtype (a baked folder runs in the
    dtype it was written in); otherwise each tensor is converted to the model's dtype as it is copied. Raises RuntimeError worded like `load_state_dict` on missing/unexpected keys or a
    shape mismatch, so callers map it to the same user error.
    """
    dtype = stored_float_dtype(path) if cast else None
    if dtype is not None:
        model.to(dtype)
    legacy = _attach_legacy_branches_if_stored(model, path, "")
    _fill_strictly(model.state_dict(keep_vars=True), type(model).__name__, path, device, map_file)
    if legacy:
        fold_attached_legacy_branches(model)


@torch.no_grad()
def load_safetensors_subset(model: nn.Module, path: str | Path, prefix: str, device: str | torch.device = "cpu",
                            map_file: bool = False) -> list[str]:
    """Fill the submodule of `model` named `prefix` (e.g. 'visual.') strictly from `path`, one tensor
    at a time; returns the file's other keys (not loaded)."""
    sub = model.get_submodule(prefix.rstrip("."))
    dtype = stored_float_dtype(path)
    if dtype is not None:
        sub.to(dtype)
    legacy = _attach_legacy_branches_if_stored(sub, path, prefix)
    targets = {prefix + k: v for k, v in sub.state_dict(keep_vars=True).items()}
    others = _fill_strictly(targets, type(sub).__name__, path, device, map_file, prefix)
    if legacy:
        fold_attached_legacy_branches(sub)
    return others


def _attach_legacy_branches_if_stored(model: nn.Module, path: str | Path, prefix: str) -> bool:
    """A vit-surgery 0.1.0 file (each RegisterMlp's fc1 rows in a `reg_fc1` of its own): `model` gets those
    slots to be filled by name, folded into fc1 after the read (core/modules.py). Returns whether it did."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        legacy = stores_legacy_branches([k for k in f.keys() if k.startswith(prefix)])
    if legacy:
        attach_legacy_branches(model)
    return legacy


def _fill_strictly(targets: dict[str, torch.Tensor], owner: str, path: str | Path, device: str | torch.device,
                   map_file: bool, prefix: str = "") -> list[str]:
    """Fill `targets` (names -> live tensors, no copies) from the file's keys under `prefix`, one tensor at a
    time; those keys must be exactly the targets' names. Returns the file's other keys."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=str(device)) as f:
        keys = set(f.keys())
        mine = {k for k in keys if k.startswith(prefix)}
        if mine != set(targets):
            raise RuntimeError(f"Error(s) in loading state_dict for {owner}: Missing key(s) in state_dict: "
                               f"{sorted(set(targets) - mine)[:8]}. Unexpected key(s) in state_dict: "
                               f"{sorted(mine - set(targets))[:8]}.")
        _check_shapes(f, targets, sorted(mine), owner)
        mapped = MappedSafetensors(path) if map_file else None
        for name in sorted(mine):
            _fill(targets[name], name, f, mapped)
    trim_heap()  # the replaced skeleton tensors
    return sorted(keys - mine)


@torch.no_grad()
def differing_tensors(path: str | Path, keys: list[str], expected: dict[str, torch.Tensor]) -> list[str]:
    """Keys whose tensor in `path` is not bit-for-bit `expected[key]` in the file's dtype (read one at a time)."""
    from safetensors import safe_open

    bad = []
    with safe_open(str(path), framework="pt") as f:
        for k in keys:
            got = f.get_tensor(k)
            want = expected.get(k)
            if want is None or tuple(want.shape) != tuple(got.shape) or \
                    not torch.equal(want.detach().to("cpu", got.dtype), got):
                bad.append(k)
            del got
    return bad


_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                   "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
                   "sparse_")


@contextlib.contextmanager
def skip_weight_init() -> Iterator[None]:
    """Within the context torch.nn.init's functions do nothing: a skeleton whose every stored tensor is
    about to be overwritten (strictly) need not be randomly initialised first — for a 2.5 B-parameter
    CLIP that is minutes of CPU. Computed buffers (masks, frequencies) are not init calls and stay."""
    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS if hasattr(torch.nn.init, name)}
    try:
        for name in saved:
            setattr(torch.nn.init, name, lambda tensor, *a, **k: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


@torch.no_grad()
def share_with_file(model: nn.Module, path: str | Path, keys: list[str], prefix: str = "") -> int:
    """Re-point `model`'s tensors named `keys` (verified bit-for-bit equal to the file's) at views of
    the mapped file: their memory becomes the page cache's (reclaimable) instead of the process's.
    Returns the bytes released."""
    mapped = MappedSafetensors(path)
    targets = model.state_dict(keep_vars=True)
    released = 0
    for key in keys:
        dst = targets.get(key[len(prefix):] if key.startswith(prefix) else key)
        if dst is None or dst.device.type != "cpu" or _ST_DTYPES.get(mapped.header[key]["dtype"]) != dst.dtype:
            continue
        released += dst.numel() * dst.element_size()
        dst.data = mapped.tensor(key)
    return released


@torch.no_grad()
def move_in_memory(model: nn.Module, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """`model.to(device, dtype)` for what is in memory: parameters left on the meta device (a streamed
    VLM's language model, read from its files when it runs) stay there. Returns `model`."""
    if not any(p.device.type == "meta" for p in model.parameters()):
        return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    for m in model.modules():
        for k, p in m._parameters.items():
            if p is not None and p.device.type != "meta":
                t = p.data.to(device) if device is not None else p.data
                m._parameters[k] = nn.Parameter(t.to(dtype) if dtype is not None and t.is_floating_point() else t,
                                                requires_grad=p.requires_grad)
        for k, b in m._buffers.items():
            if b is not None and b.device.type != "meta":
                b = b.to(device) if device is not None else b
                m._buffers[k] = b.to(dtype) if dtype is not None and b.is_floating_point() else b
    return model
