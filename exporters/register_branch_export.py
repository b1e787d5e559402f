"""The register branch's export form: a float k-row fc1 of its own, the ordinary fc1 without those rows.

Why. A baked PyTorch model reads the register units' activations from the ordinary fc1 (fewest eager ops,
bit-identical to the hooked reference). An exported graph wants the branch split off instead:
- INT8 (exporters/onnx_int8.py) keeps the branch in float by node name, from its own `reg_fc1` MatMul on
  the float block input; a quantized fc1 would compute the value the register token receives;
- fc2's input then carries zeros for the register units instead of their large activations (the
  outliers): one MinMax range per tensor is set by the ordinary units, as it is for the original model's
  tokens without outliers;
- the branch's activation can be the tail-accurate form (exporters/tail_accurate_activation.py) while the
  ordinary MLP keeps its fused kernel.

How. Within `split_register_branches(model)` each RegisterMlp gets `reg_fc1` (its k fc1 rows, a copy) and
those rows of fc1 are zero; on exit fc1's rows are put back and `reg_fc1` removed, so the PyTorch model is
unchanged (bit for bit). RegisterMlp's graph form (ONNX / FX) computes the branch from `reg_fc1` while it
is set: the same values, since a zero fc1 row gives act(0) = 0 times fc2's zero column in the ordinary MLP.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def split_register_branches(model: nn.Module) -> Iterator[list[str]]:
    """Within the context every RegisterMlp of `model` is in its export form (module docstring). Yields
    the names of the MLPs split."""
    from surgery.core.modules import RegisterMlp

    split: list[tuple[str, RegisterMlp]] = []
    try:
        with torch.no_grad():
            for name, mod in model.named_modules():
                if not isinstance(mod, RegisterMlp) or mod.reg_fc1 is not None:
                    continue
                rows = mod.fc1_rows()
                w, b = mod.fc1.weight, mod.fc1.bias
                branch = nn.Linear(w.shape[1], len(rows), bias=b is not None, device=w.device, dtype=w.dtype)
                branch.weight.copy_(w[rows])
                w[rows] = 0.0
                if b is not None:
                    branch.bias.copy_(b[rows])
                    b[rows] = 0.0
                mod.reg_fc1 = branch
                split.append((name, mod))
        yield [name for name, _ in split]
    finally:
        with torch.no_grad():  # the rows back from the branch (exact copies), the branch removed
            for _, mod in split:
                rows = mod.fc1_rows()
                mod.fc1.weight[rows] = mod.reg_fc1.weight
                if mod.fc1.bias is not None:
                    mod.fc1.bias[rows] = mod.reg_fc1.bias
                mod.reg_fc1 = None
