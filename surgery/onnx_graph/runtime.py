"""Running a (possibly rewritten) onnx-ir model in onnxruntime, with chosen intermediate tensors exposed."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx_ir as ir

from ..core.errors import ModelInputError, first_line

_IN_MEMORY_LIMIT = 1 << 30  # larger models go through a temporary file with external data


def session_options() -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 4  # fatal only: a failed run is reported once, by run_session, on one line
    return so


def session_for_file(path: Path) -> Any:
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ModelInputError(f"{path}: onnxruntime cannot load it ({first_line(e)})") from None


def as_input(session: Any, pixels: np.ndarray) -> np.ndarray:
    """`pixels` in the dtype the session's image input takes (float16 graphs without float32 I/O)."""
    want = session.get_inputs()[0].type
    return pixels.astype(np.float16) if want == "tensor(float16)" else pixels.astype(np.float32, copy=False)


def run_session(session: Any, names: Sequence[str], pixels: np.ndarray, label: str) -> list[np.ndarray]:
    """`session.run` on one batch; onnxruntime's failure (a graph that runs at one batch size only, a
    shape its nodes reject) is the model's: ModelInputError (exit 4) naming the batch, not an internal error."""
    try:
        return session.run(list(names), {session.get_inputs()[0].name: as_input(session, pixels)})
    except Exception as e:
        if type(e).__module__.split(".")[0] != "onnxruntime":
            raise
        raise ModelInputError(f"{label}: onnxruntime cannot run it on a batch of {len(pixels)} image(s) of "
                              f"{list(pixels.shape[1:])} ({_ort_reason(e)})") from None


def _ort_reason(e: Exception) -> str:
    """onnxruntime's run error without its C++ source location: "Reshape node: The input tensor cannot be
    reshaped ... Input shape:{2,64,48}, requested shape:{1,64,48}"."""
    import re

    text = " ".join(str(e).split())
    m = re.search(r"running (\S+) node.*?Status Message: (?:\S+:\d+ .*? was false\. )?(.*)", text)
    return first_line(ValueError(f"{m.group(1)} node: {m.group(2)}")) if m else first_line(e)


class ExposedSession:
    """An onnxruntime session of `model` whose outputs are the model's own plus `extra` values.

    The extra values become graph outputs of a copy of the graph made by serialising `model`; `model`
    itself is restored (its outputs list) before returning."""

    def __init__(self, model: ir.Model, extra: Sequence[ir.Value], label: str) -> None:
        import onnxruntime as ort

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
        try:
            self.session = ort.InferenceSession(payload, session_options(), providers=["CPUExecutionProvider"])
        except Exception as e:
            raise ModelInputError(f"{label}: onnxruntime cannot load it ({first_line(e)})") from None
        self.label = label
        self.output_names = [o.name for o in own]

    def run(self, pixels: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(the model's own outputs, the extra values), for one batch of pixels."""
        got = run_session(self.session, self.output_names + self.names, pixels, self.label)
        return got[:len(self.output_names)], got[len(self.output_names):]

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
