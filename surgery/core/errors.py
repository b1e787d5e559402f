"""User-facing errors. Each carries the exit code the CLI returns (documented in the README)."""
from __future__ import annotations


class SurgeryError(Exception):
    """An error caused by the user's input; the CLI prints it on one line and exits with `exit_code`."""

    exit_code = 1


class ImageInputError(SurgeryError):
    """Missing image folder, no readable images."""

    exit_code = 3


class UsageError(SurgeryError):
    """A bad option value found before any work starts (e.g. a device this machine does not have)."""

    exit_code = 2


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


EXIT_CODES = {
    0: "success",
    1: "unexpected internal error",
    2: "bad command-line usage",
    3: ImageInputError.__doc__,
    4: ModelInputError.__doc__,
    5: NeuronsFileError.__doc__,
    6: NoOutliersError.__doc__,
    7: ParityError.__doc__,
    8: OutputExistsError.__doc__,
    9: UnsafeCheckpointError.__doc__,
    10: OutputPathError.__doc__,
    11: IntegrityError.__doc__,
    12: MissingExtraError.__doc__,
    13: OutOfMemoryRisk.__doc__,
    130: "interrupted (Ctrl-C); no output was left behind",
    143: "terminated (SIGTERM); no output was left behind",
}


def first_line(e: BaseException) -> str:
    """An exception's first non-empty line (at most 300 characters): the one-line form of a library error."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]
