"""Validate an exported graph run by any runtime (OpenVINO, an HF-layout ONNX file) the way
`onnx_validate.validate_onnx` validates model.onnx: against the hooked reference run in float64, per
feature vector, at batch sizes that include one other than the export batch, with the same tolerances
and conditioning rule (surgery/core/judge.py). The runtime is anything with ORT's
`run(output_names, {input_name: array})`; `RenamedSession` maps another graph's names onto the
`pixel_values` -> (`pooled`, `tokens`) interface.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np



class RenamedSession:
    """Runs `run_fn(pixels) -> {name: array}` and answers under the VIT_ONNX_SPEC names."""

    def __init__(self, run_fn: Callable[[np.ndarray], dict[str, Any]], names: dict[str, str]) -> None:
        self.run_fn, self.names = run_fn, names  # names: spec name ("pooled", "tokens") -> runtime name

    def run(self, output_names: Sequence[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        got = self.run_fn(next(iter(feeds.values())))
        return [np.asarray(got[self.names.get(o, o)]) for o in output_names]
