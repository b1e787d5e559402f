"""Count the aten ops one eager call dispatches: the launch count a GPU pays in eager mode, measured on the CPU.

`TorchDispatchMode` sees every op below autograd, as the backend kernels are called. View ops (those
whose schema returns an alias of an input: view, slice, expand, transpose, ...) launch no kernel and are
not counted. The count is deterministic for a given model, input shape and dtype: a structural figure,
not a timing. Used by tests/core/test_eager_ops.py and benchmarks/bench_eager_ops.py.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode


# ops that return a tensor sharing the input's storage without declaring it in their schema (no kernel)
ALIASING = frozenset({"_unsafe_view", "_reshape_alias"})


class _Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if not func.is_view and func.overloadpacket.__name__ not in ALIASING:
            self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def dispatched_ops(fn: Callable[..., Any], *args: Any) -> Counter[str]:
    """{aten op name: calls} for one call fn(*args) under no_grad, view ops left out."""
    counter = _Counter()
    with torch.no_grad(), counter:
        fn(*args)
    return counter.ops
