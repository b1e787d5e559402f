"""The one way vit-surgery opens and runs an onnxruntime session: the exporters' validation
(exporters/onnx_validate.py and the formats built on it) and the ONNX graph rewrite
(surgery/onnx_graph/runtime.py) both come here.

Every session runs on the CPU provider at graph optimisation level ALL (what a deployment runs, and
what transformers.js and optimum default to), logging fatal errors only: a failure is reported once, as
the project's one-line ModelInputError (exit 4) naming the file and, for a run, the batch. onnxruntime
is imported inside the functions, so importing this module loads nothing.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from .errors import ModelInputError, first_line

PROVIDERS = ("CPUExecutionProvider",)
RUNTIME = "onnxruntime CPU, optimisation ALL"  # as summaries say it
RUNTIME_DETAIL = "onnxruntime CPUExecutionProvider, graph_optimization_level ORT_ENABLE_ALL"  # as reports record it


def session_options(threads: Optional[int] = None) -> Any:
    """onnxruntime SessionOptions: optimisation level ALL, fatal-only logging, `threads` intra-op threads
    (None: onnxruntime's default)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 4  # fatal only: a failure is reported once, on one line, by this module
    if threads is not None:
        so.intra_op_num_threads = threads
    return so


class OrtSession:
    """An onnxruntime InferenceSession whose failures are ModelInputErrors naming `label`. `run` has
    onnxruntime's signature; `run_pixels` feeds one image batch to the first input, in its dtype;
    everything else (get_inputs, get_outputs) is the session's."""

    def __init__(self, session: Any, label: str) -> None:
        self.session, self.label = session, label

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)

    def run(self, output_names: Optional[Sequence[str]], feeds: Mapping[str, Any]) -> list[Any]:
        try:
            return self.session.run(None if output_names is None else list(output_names), dict(feeds))
        except Exception as e:
            if type(e).__module__.split(".")[0] != "onnxruntime":
                raise
            x = np.asarray(next(iter(feeds.values()))) if feeds else np.zeros((0,))
            raise ModelInputError(f"{self.label}: onnxruntime cannot run it on a batch of {len(x)} image(s) of "
                                  f"{list(x.shape[1:])} ({onnxruntime_reason(e)})") from None

    def run_pixels(self, output_names: Optional[Sequence[str]], pixels: np.ndarray) -> list[Any]:
        """`run` with `pixels` fed to the first input, in the dtype it takes (`as_input`)."""
        return self.run(output_names, {self.session.get_inputs()[0].name: as_input(self.session, pixels)})


def open_session(model: str | Path | bytes, label: Optional[str] = None, *, threads: Optional[int] = None) -> OrtSession:
    """A session of `model` (a file path, or a serialised ModelProto) on PROVIDERS with `session_options`;
    a model onnxruntime cannot load is a ModelInputError naming `label` (default: the path)."""
    import onnxruntime as ort

    label = label if label is not None else str(model) if not isinstance(model, bytes) else "the ONNX model"
    try:
        session = ort.InferenceSession(model if isinstance(model, bytes) else str(model), session_options(threads),
                                       providers=list(PROVIDERS))
    except Exception as e:
        raise ModelInputError(f"{label}: onnxruntime cannot load it ({first_line(e)})") from None
    return OrtSession(session, label)


def as_input(session: Any, pixels: np.ndarray) -> np.ndarray:
    """`pixels` in the dtype the session's image input takes (float16 graphs without float32 I/O)."""
    want = session.get_inputs()[0].type
    return pixels.astype(np.float16) if want == "tensor(float16)" else pixels.astype(np.float32, copy=False)


def onnxruntime_reason(e: Exception) -> str:
    """onnxruntime's run error without its C++ source location: "Reshape node: The input tensor cannot be
    reshaped ... Input shape:{2,64,48}, requested shape:{1,64,48}"."""
    text = " ".join(str(e).split())
    m = re.search(r"running (\S+) node.*?Status Message: (?:\S+:\d+ .*? was false\. )?(.*)", text)
    return first_line(ValueError(f"{m.group(1)} node: {m.group(2)}")) if m else first_line(e)
