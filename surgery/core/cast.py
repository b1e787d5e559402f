"""Running a model in another dtype without a second copy of it.

The float64 judge (surgery/core/judge.py) and the float32 effect statistics used to deep-copy the whole
model into that dtype: for a float32 model a float64 copy is two more models' worth of memory. Here a
block's weights are cast when the block starts and put back when it ends, so one block exists in the
other dtype at a time. Casting to a wider dtype and back is exact; the originals are kept aside (not
re-rounded), so any dtype works and the model is bit-for-bit unchanged afterwards.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn

# Set on a model stored in one dtype that computes in another (a VLM tower kept in its checkpoint's float16
# runs block by block in float32): discovery, the judge and the effect statistics run it under cast_blockwise.
COMPUTE_DTYPE_ATTR = "surgery_compute_dtype"


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype `model` computes in: COMPUTE_DTYPE_ATTR if set, else its parameters'."""
    return getattr(model, COMPUTE_DTYPE_ATTR, None) or next(model.parameters()).dtype


class _Stash:
    """Original tensors of cast parameters/buffers, restored on exit."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(tensor) -> (tensor, original data)

    def cast(self, module: nn.Module, recurse: bool = True) -> list[int]:
        done = []
        tensors = list(module.parameters(recurse=recurse)) + list(module.buffers(recurse=recurse))
        with torch.inference_mode(False), torch.no_grad():  # plain tensors: the model stays usable anywhere
            for t in tensors:
                if not t.is_floating_point() or t.dtype == self.dtype or id(t) in self.saved:
                    continue
                self.saved[id(t)] = (t, t.data)
                t.data = t.data.to(self.dtype)
                done.append(id(t))
        return done

    def restore(self, ids: list[int] | None = None) -> None:
        with torch.inference_mode(False), torch.no_grad():
            for i in list(self.saved) if ids is None else ids:
                t, data = self.saved.pop(i)
                t.data = data


@contextlib.contextmanager
def cast_blockwise(model: nn.Module, blocks: Sequence[nn.Module], dtype: torch.dtype) -> Iterator[nn.Module]:
    """Within the context `model` runs in `dtype`: everything outside `blocks` (embeddings, norms,
    heads: small) is cast for the whole context, each block only while it runs."""
    if all(not t.is_floating_point() or t.dtype == dtype for t in model.parameters()):
        yield model
        return
    stash = _Stash(dtype)
    in_blocks = {id(t) for b in blocks for t in list(b.parameters()) + list(b.buffers())}
    rest = [t for t in list(model.parameters()) + list(model.buffers()) if id(t) not in in_blocks]
    handles = []
    current: dict[int, list[int]] = {}

    def enter(block: nn.Module, _args: tuple) -> None:
        current[id(block)] = stash.cast(block)

    def leave(block: nn.Module, _args: tuple, _out: object) -> None:
        stash.restore(current.pop(id(block), []))

    try:
        with torch.inference_mode(False), torch.no_grad():
            for t in rest:
                if t.is_floating_point() and t.dtype != dtype and id(t) not in stash.saved:
                    stash.saved[id(t)] = (t, t.data)
                    t.data = t.data.to(dtype)
        for b in blocks:
            handles.append(b.register_forward_pre_hook(enter))
            handles.append(b.register_forward_hook(leave))
        yield model
    finally:
        for h in handles:
            h.remove()
        stash.restore()


@contextlib.contextmanager
def cast_module(module: nn.Module, dtype: torch.dtype) -> Iterator[nn.Module]:
    """`module` (small: a norm, one attention) in `dtype` within the context, restored exactly after."""
    stash = _Stash(dtype)
    try:
        stash.cast(module)
        yield module
    finally:
        stash.restore()
