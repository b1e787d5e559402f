"""Progress of long steps (load, find, bake, write, the float64 check, exports, INT8 calibration, VLM
streaming), reported one way from everywhere: code calls `stage(...)`, `iterate(...)`, `say(...)` and
`detail(...)` here, and the caller decides how they show by installing a `Progress` with `reporting()`.

- the CLI: a tqdm bar per stage on a terminal, one line per finished stage on stderr otherwise (logs, CI:
  its name and time; a failed stage prints only its error), nothing with -q, more detail with -v;
- the Python API: `logging` only (logger "surgery": INFO per stage, DEBUG for detail; silent unless the
  application configures logging, as libraries are), plus an optional callback
  `callback(stage, done, total)` called when a stage starts (done 0), advances and ends.

Nothing here depends on who called: a helper adding a new long step wraps it in `stage()` and it shows
in the CLI and the API alike.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, TypeVar

log = logging.getLogger("surgery")

Callback = Callable[[str, int, Optional[int]], None]
MODES = ("auto", "bars", "lines", "log")
T = TypeVar("T")


@dataclass(frozen=True)
class Progress:
    """How progress shows. mode: "bars" (tqdm), "lines" (one stderr line per stage), "auto" (bars when
    stderr is a terminal, else lines), "log" (logging only: the library default). `verbose` adds the
    detail lines and each stage's time; `callback(stage, done, total)` sees every stage in any mode."""

    mode: str = "log"
    verbose: bool = False
    callback: Optional[Callback] = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"progress mode must be one of {MODES}, not {self.mode!r}")

    @property
    def bars(self) -> bool:
        return self.mode == "bars" or (self.mode == "auto" and _stderr_is_terminal())

    @property
    def prints(self) -> bool:
        return self.mode in ("bars", "lines", "auto")


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


_CURRENT: contextvars.ContextVar[Progress] = contextvars.ContextVar("surgery_progress", default=Progress())


def current() -> Progress:
    return _CURRENT.get()


@contextlib.contextmanager
def reporting(progress: Progress) -> Iterator[Progress]:
    """Within the context, stages report through `progress`."""
    token = _CURRENT.set(progress)
    try:
        yield progress
    finally:
        _CURRENT.reset(token)


def for_api(progress: bool | Callback | Progress | None) -> Progress:
    """The Progress an API call's `progress=` argument means: False/None logging only, True the CLI's
    display (bars on a terminal, lines otherwise), a callable a callback (logging otherwise)."""
    if isinstance(progress, Progress):
        return progress
    if callable(progress):
        return Progress("log", callback=progress)
    return Progress("auto" if progress else "log")


def _print(msg: str) -> None:
    print(f"vit-surgery: {msg}", file=sys.stderr, flush=True)


def say(msg: str) -> None:
    """A step's one-line message: printed when progress prints (not with -q), logged at INFO always."""
    log.info(msg)
    if current().prints:
        _print(msg)


def say_if(show: bool, msg: str) -> None:
    """A step's one-line message from code whose caller says whether to show it (the exporters'
    `progress=`): printed when `show`, logged at INFO always."""
    log.info(msg)
    if show:
        _print(msg)


def detail(msg: str) -> None:
    """A detail line: printed only when verbose (-v), logged at DEBUG always."""
    log.debug(msg)
    p = current()
    if p.prints and p.verbose:
        _print(msg)


class Stage:
    """One running stage: `advance(n)` moves its bar / callback on."""

    def __init__(self, name: str, total: Optional[int], unit: str, progress: Progress) -> None:
        self.name, self.total, self.unit, self.done = name, total, unit, 0
        self._progress = progress
        self._bar: Any = None
        if progress.bars:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=name, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True)

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        if self._progress.callback is not None:
            self._progress.callback(self.name, self.done, self.total)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


@contextlib.contextmanager
def stage(name: str, total: Optional[int] = None, unit: str = "step") -> Iterator[Stage]:
    """A long step: a bar on a terminal (advanced by `Stage.advance`), one line when it is done otherwise,
    an INFO log record and the callback's (name, 0, total) at the start; the time taken at DEBUG."""
    p = current()
    size = f" ({total} {unit}{'s' if total != 1 else ''})" if total is not None and unit != "step" else ""
    log.info("%s%s", name, size)
    if p.callback is not None:
        p.callback(name, 0, total)
    s = Stage(name, total, unit, p)
    start = time.perf_counter()
    try:
        yield s
    finally:
        s.close()
    # off a terminal, one line per stage when it is done (a failed stage says nothing: its error is the
    # one line); on a terminal the bar showed it, and -v adds the time
    took = f"{name}{size}: done in {time.perf_counter() - start:.1f} s"
    if p.prints and not p.bars:
        log.debug(took)
        _print(took)
    else:
        detail(took)


def iterate(items: Iterable[T], name: str, total: Optional[int] = None, unit: str = "step") -> Iterator[T]:
    """`items`, one `stage` advanced per item."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with stage(name, total, unit) as s:
        for item in items:
            yield item
            s.advance()
