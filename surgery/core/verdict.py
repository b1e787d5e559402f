"""One protocol for every verdict vit-surgery returns: the parity report of `convert` / `check`, the
export formats' validation reports (ONNX, OpenVINO, INT8), the ONNX rewrite's check reports and the
results of the verbs that hold them (`surgery.api`).

A verdict has `passed` (a bool property, never a method), `summary()` (one line for a person, naming what
was judged and saying PASS or FAIL: `verdict_word`) and `to_dict()` (the JSON object written into
parity.json or a --report file; it holds `passed` and `summary` too). Callers that print, record or
combine verdicts take a `Verdict`, whatever judged it.
"""
from __future__ import annotations

from typing import Any, Iterable, Protocol, runtime_checkable

PASS, FAIL = "PASS", "FAIL"


@runtime_checkable
class Verdict(Protocol):
    """What every judge returns (see the module docstring)."""

    @property
    def passed(self) -> bool: ...

    def summary(self) -> str: ...

    def to_dict(self) -> dict[str, Any]: ...


def verdict_word(passed: bool) -> str:
    """PASS or FAIL, the word every summary line carries."""
    return PASS if passed else FAIL


def all_passed(verdicts: Iterable[Verdict]) -> bool:
    """Whether every verdict passed (True for none)."""
    return all(v.passed for v in verdicts)
