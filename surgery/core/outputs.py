"""Outputs are written to a temporary sibling and moved into place only when complete.

- A crash, Ctrl-C, SIGTERM or a failed check leaves nothing at OUT (an existing OUT untouched).
- The final move never replaces anything that appeared at OUT meanwhile: of several runs writing one
  OUT at the same time exactly one wins, the others fail with exit 8 (rename with RENAME_NOREPLACE /
  RENAME_EXCHANGE on Linux, under a lock on the parent folder everywhere).
- Folders and files get the modes `mkdir`/`cp` would give them (0o777/0o666 minus the umask).
- A temporary left by a process that no longer exists (SIGKILL, power loss) is removed by the next
  run that writes the same OUT; its name says which host and process made it.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
import socket
import stat
import warnings
from pathlib import Path
from typing import Iterator, Literal, Optional

from .errors import OutputExistsError, OutputPathError

Kind = Literal["folder", "file"]
_AT_FDCWD = -100
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


# ---- validation (cheap, before any model is loaded) ------------------------------------------

# The longest suffix a temporary sibling adds to OUT's name: ".partial-HOST.PID.XXXXXXXX" (and "." in front).
_TEMP_SUFFIX_BYTES = len(".") + len(".partial-") + 64 + len(".") + 20 + len(".") + 8


def _kind_of(path: Path) -> str:
    """What is at `path` in words ("a FIFO", "a character device", ...) for entries that are neither a
    regular file nor a folder."""
    mode = os.stat(path).st_mode
    for test, words in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                        (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return words
    return "a special file"


def shown(path: str | Path) -> str:
    """A path as it can always be printed: names that are not valid UTF-8 are shown escaped."""
    text = str(path)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return ascii(text)


def check_output_target(out: str | Path, overwrite: bool, kind: Kind = "folder") -> Path:
    """OUT must be creatable: absent (or, with --overwrite, an existing `kind`: only a regular file is
    replaced by a file and a folder by a folder, never a FIFO, device or socket), its folder must exist
    and be writable, and its name must be printable and short enough for the temporary sibling."""
    path = Path(out)
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise OutputPathError(f"output {shown(path)}: the name is not valid UTF-8; choose a name the report "
                              "files can record") from None
    check_replaceable(path, overwrite, kind)
    _check_writable_parent(path)
    _check_name_length(path)
    return path


def check_replaceable(path: Path, overwrite: bool, kind: Kind = "file") -> None:
    """`path` may be written: absent, or (with `overwrite`) an existing `kind`; never a dangling link, a
    FIFO, device or socket, even with `overwrite` (an exporter adding a file into OUT checks this too)."""
    if path.is_symlink() and not path.exists():
        raise OutputPathError(f"output {path} is a dangling symbolic link (to {os.readlink(path)}); remove it "
                              "or choose another output")
    if not path.exists():
        return
    if not path.is_dir() and not path.is_file():
        raise OutputPathError(f"output {path} is {_kind_of(path)}; only a regular file or a folder is ever "
                              "replaced: choose another output")
    if not overwrite:
        raise OutputExistsError(f"output {path} already exists; pass {{overwrite}} to replace it",
                                parameters=("overwrite",))
    if kind == "folder" and not path.is_dir():
        raise OutputPathError(f"output {path} exists and is a file, not a folder; {{overwrite}} only replaces "
                              "folders", parameters=("overwrite",))
    if kind == "file" and path.is_dir():
        raise OutputPathError(f"output {path} is a folder; give a file path")


def _check_writable_parent(path: Path) -> None:
    parent = path.absolute().parent
    if not parent.exists():
        ancestor = parent
        while not ancestor.exists() and not ancestor.is_symlink():
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise OutputPathError(f"cannot create {path}: {ancestor} is not a folder")
        raise OutputPathError(f"cannot create {path}: the folder {parent} does not exist (create it first)")
    if not parent.is_dir():
        raise OutputPathError(f"cannot create {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"cannot create {path}: no permission to write in {parent} (or it is read-only)")


def _check_name_length(path: Path) -> None:
    try:
        limit = os.pathconf(path.absolute().parent, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        limit = 255
    need = len(os.fsencode(path.name)) + _TEMP_SUFFIX_BYTES
    if need > limit:
        raise OutputPathError(f"output name {path.name[:40]}... is too long: with the temporary suffix it would "
                              f"take {need} bytes, the file system allows {limit}; choose a shorter name")


def local_source_path(spec: str) -> Optional[Path]:
    """The file or folder a model spec names on this machine (None for hub names)."""
    for prefix in ("local-dir:", "hf:", "dinov2:", "open_clip:"):
        if spec.startswith(prefix):
            spec = spec[len(prefix):]
            break
    path = Path(spec)
    return path.resolve() if spec and path.exists() else None


def refuse_input_overlap(out: str | Path, inputs: dict[str, Optional[str | Path]]) -> None:
    """No command writes OUT onto, into or around one of its own inputs (model, images, neurons file,
    --source, check images, dataset): OUT may not be an input, contain one, or lie inside one.
    `inputs`: what the user calls it (e.g. "the source model") -> the spec or path given (None: absent)."""
    target = Path(out).resolve()
    for what, spec in inputs.items():
        src = local_source_path(str(spec)) if spec else None
        if src is None:
            continue
        if target == src:
            raise OutputPathError(f"output {out} is {what} ({spec}); choose another output (inputs are never "
                                  "overwritten)")
        if src in target.parents:
            raise OutputPathError(f"output {out} is inside {what} ({spec}); choose an output outside it")
        if target in src.parents:
            raise OutputPathError(f"output {out} contains {what} ({spec}); choose another output")
        link = _link_into(src, target)
        if link is not None:
            raise OutputPathError(f"{what} ({spec}) reaches into output {out} through the link {link}: replacing "
                                  "OUT would replace the input's files; choose another output")


def _link_into(src: Path, target: Path, depth: int = 2) -> Optional[Path]:
    """A symbolic link in input folder `src` (its files and those of its subfolders, `depth` levels) that
    resolves to `target` or into it, else None."""
    if not src.is_dir() or depth < 0:
        return None
    try:
        entries = list(os.scandir(src))
    except OSError:
        return None
    for e in entries:
        path = Path(e.path)
        if e.is_symlink():
            try:
                resolved = path.resolve()
            except (OSError, RuntimeError):  # a link loop reaches nothing (the loader says what it is)
                continue
            if resolved == target or target in resolved.parents:
                return path
        elif e.is_dir(follow_symlinks=False):
            found = _link_into(path, target, depth - 1)
            if found is not None:
                return found
    return None


def refuse_source_overlap(out: str | Path, spec: str) -> None:
    """The source is never modified: OUT may not be the source, contain it, or lie inside it."""
    refuse_input_overlap(out, {"the source model": spec})


# ---- temporary names and stale temporaries ---------------------------------------------------

def host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def _temp_name(path: Path, what: str = "partial") -> Path:
    return path.parent / f".{path.name}.{what}-{host_tag()}.{os.getpid()}.{secrets.token_hex(4)}"


def _process_exists(pid: int) -> Optional[bool]:
    """True/False; None when `pid` cannot be a process id (a crafted or foreign name): not judged."""
    if os.name != "posix":  # os.kill(pid, 0) would terminate it on Windows: assume it lives
        return True
    if not 0 < pid < 2 ** 22:  # Linux's pid_max is at most 2**22
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def clean_stale_partials(path: Path) -> list[Path]:
    """Remove temporaries of `path` whose process (on this host) is gone; warn about ones we cannot judge."""
    parent = path.parent
    if not parent.is_dir():
        return []
    ours = re.compile(rf"\.{re.escape(path.name)}\.(?P<what>partial|old)-(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)\.[0-9a-f]{{8}}")
    older = re.compile(rf"\.{re.escape(path.name)}\.(partial|old)-[A-Za-z0-9_]{{8}}")
    removed = []
    for entry in sorted(parent.iterdir()):
        m = ours.fullmatch(entry.name)
        alive = _process_exists(int(m["pid"])) if m and m["host"] == host_tag() else True
        if m and alive is None:
            warnings.warn(f"found {entry}, which names no possible process; left it alone", stacklevel=2)
        elif m and alive is False:
            if m["what"] == "old":  # the previous OUT, moved aside just before a killed run's final rename
                warnings.warn(f"found {entry}: the previous {path.name}, moved aside by a run that was killed; "
                              "move it back or delete it", stacklevel=2)
                continue
            _remove(entry)
            removed.append(entry)
            warnings.warn(f"removed {entry}: an unfinished output left by a run that was killed (pid {m['pid']})",
                          stacklevel=2)
        elif older.fullmatch(entry.name):
            warnings.warn(f"found {entry}, left by an older vit-surgery run that was killed; delete it unless "
                          "another run is writing this output now", stacklevel=2)
    return removed


# ---- the final, no-replace move ----------------------------------------------------------------

def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux renameat2(2); False where the C library or the file system lacks it."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


@contextlib.contextmanager
def folder_locked(folder: Path) -> Iterator[None]:
    """Serialise final moves into one folder between vit-surgery processes (released if a process dies)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: renameat2 is not there either; os.rename below still refuses non-empty folders
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _identity(path: Path) -> Optional[tuple[int, int]]:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _move_into_place(tmp: Path, path: Path, before: Optional[tuple[int, int]], lock: bool = True) -> None:
    """Move `tmp` to `path`, which must still be what it was when the run started (absent, or the same
    folder the user asked to overwrite). Anything else appeared meanwhile and is left untouched."""
    with folder_locked(path.parent) if lock else contextlib.nullcontext():
        if _identity(path) != before:
            raise OutputExistsError(f"output {path} appeared while this run was writing it (another run?); "
                                    "left it untouched, nothing written")
        try:
            if before is None:
                if not _renameat2(tmp, path, _RENAME_NOREPLACE):
                    if os.path.lexists(path):
                        raise FileExistsError(errno.EEXIST, "exists", str(path))
                    os.rename(tmp, path)
            elif not _renameat2(tmp, path, _RENAME_EXCHANGE):  # now tmp holds the old output
                old = _temp_name(path, "old")
                os.rename(path, old)
                os.rename(tmp, path)
                os.rename(old, tmp)
        except FileExistsError:
            raise OutputExistsError(f"output {path} appeared while this run was writing it (another run?); "
                                    "left it untouched, nothing written") from None


def identity(path: Path) -> Optional[tuple[int, int]]:
    """What is at `path` now (device, inode), None when nothing: compare before a final move."""
    return _identity(path)


def move_file_into_place(staged: Path, target: Path, before: Optional[tuple[int, int]]) -> None:
    """Move a finished file onto `target`, which must still be what it was when the run started (`before`,
    from identity()): a file another run put there meanwhile is left alone (OutputExistsError, exit 8)."""
    give_usual_modes(staged)
    _move_into_place(staged, target, before)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_usual_modes(path: Path) -> None:
    """Folders 0o777 and files 0o666 (0o777 if executable) minus the umask, as mkdir/cp create them:
    some writers (safetensors, mkdtemp) create private 0o600/0o700 files that another user could not read."""
    mask = _umask()
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if p.is_symlink():
            continue
        mode = os.stat(p).st_mode
        full = 0o777 if p.is_dir() or mode & 0o111 else 0o666
        if mode & 0o777 != full & ~mask:
            os.chmod(p, full & ~mask)


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to `out`; on success it becomes `out` (replacing it only with overwrite)."""
    path = check_output_target(out, overwrite, "folder")
    clean_stale_partials(path)
    before = _identity(path)
    tmp = _temp_name(path)
    os.mkdir(tmp)  # mode 0o777 minus the umask, as mkdir(1) would
    try:
        yield tmp
        give_usual_modes(tmp)
        _move_into_place(tmp, path, before)
    finally:
        _remove(tmp)  # the unfinished output, or the replaced one


@contextlib.contextmanager
def atomic_output_file(out: str | Path, overwrite: bool = False, locked: bool = False) -> Iterator[Path]:
    """Yield a temporary file path next to `out` for the caller to write; on success it becomes `out`
    (`locked`: the caller holds folder_locked on its folder already)."""
    path = check_output_target(out, overwrite, "file")
    clean_stale_partials(path)
    before = _identity(path)
    tmp = _temp_name(path)
    try:
        yield tmp
        give_usual_modes(tmp)
        _move_into_place(tmp, path, before, lock=not locked)
    finally:
        _remove(tmp)
