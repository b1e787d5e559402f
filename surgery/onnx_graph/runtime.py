"""Running a (possibly rewritten) onnx-ir model in onnxruntime, with chosen intermediate tensors exposed.
Sessions are opened and run by surgery/core/onnx_runtime.py (the project's one session helper)."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx_ir as ir

from ..core.onnx_runtime import open_session

_IN_MEMORY_LIMIT = 1 << 30  # larger models go through a temporary file with external data


class ExposedSession:
    """An onnxruntime session of `model` whose outputs are the model's own plus `extra` values.

    The extra values become graph outputs of a copy of the graph made by serialising `model`; `model`
    itself is restored (its outputs list) before returning."""

    def __init__(self, model: ir.Model, extra: Sequence[ir.Value], label: str) -> None:
        graph = model.graph
        own = list(graph.outputs)
        self.names = [v.name for v in extra]
        added = [v for v in dict.fromkeys(extra) if not v.is_graph_output()]
        graph.outputs.extend(added)
        self._tmp = None
        try:
            proto = ir.to_proto(model)
            size = sum(t.ByteSize() for t in proto.graph.initializer)
            external = any(isinstance(v.const_value, ir.ExternalTensor) for v in graph.initializers.values())
            if size < _IN_MEMORY_LIMIT and not external:
                payload: Any = proto.SerializeToString()
            else:  # external data is found relative to a file's folder
                self._tmp = tempfile.TemporaryDirectory(prefix="vit-surgery-ort-")
                payload = str(Path(self._tmp.name) / "model.onnx")
                ir.save(model, payload, external_data="model.onnx.data")
            del proto
        finally:
            for _ in added:
                graph.outputs.pop()
            assert [v.name for v in graph.outputs] == [v.name for v in own]
        self.session = open_session(payload, label)
        self.label = label
        self.output_names = [o.name for o in own]

    def run(self, pixels: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(the model's own outputs, the extra values), for one batch of pixels."""
        got = self.session.run_pixels(self.output_names + self.names, pixels)
        return got[:len(self.output_names)], got[len(self.output_names):]

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
