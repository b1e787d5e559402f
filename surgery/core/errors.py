"""User-facing errors. Each kind carries the exit code the CLI returns (documented in docs/reference/exit-codes.md).

`SurgeryError` is abstract: it has no exit code of its own (exit 1 means a bug), so every raise names
its real kind, and `EXIT_CODES` is built from the kinds. Core code is also the Python API: its messages
name parameters (`top_k`), and the CLI shows the flags (`--top-k`) through `cli_message`.
"""
from __future__ import annotations

from typing import Any


class SurgeryError(Exception):
    """An error caused by the user's input; the CLI prints it on one line and exits with `exit_code`.
    Abstract: raise one of its subclasses."""

    exit_code: int  # set by each subclass

    def __new__(cls, *args: Any, **kwargs: Any) -> "SurgeryError":
        if "exit_code" not in {k for c in cls.__mro__ if c is not SurgeryError for k in vars(c)}:
            raise TypeError(f"{cls.__name__} has no exit code: raise a SurgeryError subclass that has one")
        return super().__new__(cls, *args)

    def __init__(self, message: str = "", *args: Any, parameters: tuple[str, ...] = ()) -> None:
        """`parameters`: the parameters `message` names as `{name}` placeholders (shown as `name` to the
        Python API, as the flag `--name` by the CLI); without them `message` is used as it is."""
        self.template, self.parameters = message, tuple(parameters)
        super().__init__(self._render(lambda p: p), *args)

    def _render(self, show: Any) -> str:
        # plain replacement, not str.format: a path in the message may hold braces of its own
        text = self.template
        for p in self.parameters:
            text = text.replace("{" + p + "}", show(p))
        return text

    def cli_message(self) -> str:
        """The message as the CLI prints it (parameters named as flags, underscores as dashes)."""
        return self._render(lambda p: "--" + p.replace("_", "-"))


class ImageInputError(SurgeryError):
    """Missing image folder, no readable images."""

    exit_code = 3


class UsageError(SurgeryError):
    """Bad command-line usage or option value, found before any work starts (e.g. a device this machine does not have)."""

    exit_code = 2


class ParameterError(UsageError):
    """A bad value of a named parameter. `template` names the parameters as `{name}`: the Python API's
    message shows `name`, the CLI's the flag `--name` (underscores as dashes)."""

    def __init__(self, template: str, *parameters: str) -> None:
        super().__init__(template, parameters=parameters)


class ModelInputError(SurgeryError):
    """Unknown model name or missing model path, unsupported architecture, missing or mismatched weights,
    NaN/Inf weights, an unusable config, ONNX external data outside the folder, missing or too short."""

    exit_code = 4


class NonFiniteError(ModelInputError):
    """A model's weights contain NaN or Inf (the message names the tensor)."""


class NeuronsFileError(SurgeryError):
    """Malformed neurons file, or one that does not fit the model."""

    exit_code = 5


class NoOutliersError(SurgeryError):
    """Calibration found no high-norm tokens at the chosen threshold."""

    exit_code = 6


class ParityError(SurgeryError):
    """The baked model does not match the hooked reference within tolerance."""

    exit_code = 7


class OutputExistsError(SurgeryError):
    """OUT exists and --overwrite was not given."""

    exit_code = 8


class UnsafeCheckpointError(SurgeryError):
    """A checkpoint needs full unpickling or remote code and the user did not allow it."""

    exit_code = 9


class OutputPathError(SurgeryError):
    """OUT cannot be written: its folder is missing or read-only, a file, special file or dangling link is in
    the way, its name is too long or not UTF-8, the disk is full, or it is, contains or is inside one of the
    command's inputs."""

    exit_code = 10


class IntegrityError(SurgeryError):
    """OUT's files differ from what convert recorded (corrupted or modified), OUT has no record to verify
    (and no source to check it against), or --source is not OUT's source."""

    exit_code = 11


class MissingExtraError(SurgeryError):
    """An optional package a command needs is not installed (the message names the pip extra)."""

    exit_code = 12


class OutOfMemoryRisk(SurgeryError):
    """The estimated peak memory (or the size a config describes) exceeds what this machine has available;
    stopped before starting."""

    exit_code = 13


def require_extra(module: str, extra: str, what: str) -> None:
    """Raise MissingExtraError naming `pip install "vit-surgery[extra]"` when `module` is not importable."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise MissingExtraError(f'{what} needs the {module} package: pip install "vit-surgery[{extra}]"')


def _kinds(cls: type = SurgeryError) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub] + _kinds(sub)
    return out


def exit_codes() -> dict[int, str]:
    """Exit code -> meaning: 0, 1, every SurgeryError kind that sets its own code (its
    docstring), 130 and 143."""
    codes = {0: "success", 1: "unexpected internal error (a bug)"}
    for kind in _kinds():
        if "exit_code" in vars(kind):
            codes.setdefault(kind.exit_code, " ".join((kind.__doc__ or kind.__name__).split()))
    codes.update({130: "interrupted (Ctrl-C); no output was left behind",
                  143: "terminated (SIGTERM); no output was left behind"})
    return dict(sorted(codes.items()))


EXIT_CODES = exit_codes()


def first_line(e: BaseException) -> str:
    """An exception's first non-empty line (at most 300 characters): the one-line form of a library error. A
    line that only introduces the next ("Validation error for field 'x':") keeps that next line; a line that
    points at a report not shown ("... look at the above report!") drops that pointer."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    text = lines[0] if lines else type(e).__name__
    if text.endswith(":") and len(lines) > 1:
        text = f"{text} {lines[1]}"
    for pointer in (" Please look at the above report!", " look at the above report!"):
        text = text.replace(pointer, "")
    return text[:300]
