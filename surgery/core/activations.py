"""The activation constants the register branch is rewritten with, in one table: the exporters'
tail-accurate activation (exporters/tail_accurate_activation.py) and the ONNX graph rewrite
(surgery/onnx_graph/unit_activation.py, recognise.py) both read them here.

Every activation of the sigmoid family is x * sigmoid(z(x)) with z = alpha * (x + cubic * x^3):
  QuickGELU  alpha 1.702;   SiLU  alpha 1;   tanh GELU  alpha 2 sqrt(2/pi), cubic 0.044715
(0.5 (1 + tanh u) = sigmoid(2u)). Exact (erf) GELU has no sigmoid form.
"""
from __future__ import annotations

import math

QUICK_GELU_ALPHA = 1.702
GELU_TANH_CUBIC = 0.044715
GELU_TANH_ALPHA = 2.0 * math.sqrt(2.0 / math.pi)  # 2 sqrt(2/pi): tanh(u) written as 2 sigmoid(2u) - 1

# name -> (alpha, cubic) of x * sigmoid(alpha * (x + cubic * x^3)); the names are the rewrite's
SIGMOID_GATES: dict[str, tuple[float, float]] = {
    "quick_gelu": (QUICK_GELU_ALPHA, 0.0),
    "silu": (1.0, 0.0),
    "gelu_tanh": (GELU_TANH_ALPHA, GELU_TANH_CUBIC),
}
