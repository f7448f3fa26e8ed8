"""Reading and writing files the user names, safely.

Inputs: `check_input` refuses a missing path, a directory or a non-regular file (a FIFO would
block the first read forever, a device could be endless) before anything opens it, and
`open_input` opens without blocking and re-checks the opened descriptor (no window between the
check and the open).

Outputs: every file ggfuse writes goes through `atomic_output` / `write_atomic`: the bytes go to a
unique temp file beside the target (two writers never share a temp name), which is renamed onto
the target only once it is complete. A failed write (full disk, a missing folder, an exception in
the caller) leaves the target as it was and no temp file behind. An output that is one of the
command's inputs is refused before anything is written.

Sizes for people: `format_bytes` prints binary units (KiB, MiB, GiB), the convention
`ggfuse.options.parse_bytes` reads.
"""
from __future__ import annotations

import contextlib
import os
import stat
import tempfile

from ggfuse.errors import GGFuseError


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def check_input(path, what: str = "file") -> str:
    """path, or GGFuseError when it is not an existing regular file (nothing is opened)."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise GGFuseError(None, f"{what}: expected a file name, got {path!r}")
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise GGFuseError(path, f"no such file (the {what})") from None
    except (OSError, ValueError) as e:       # ValueError: a NUL byte in the name
        raise GGFuseError(path, f"cannot read the {what}: {getattr(e, 'strerror', None) or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise GGFuseError(path, f"the {what} is {_kind(st.st_mode)}, not a regular file")
    return path


def open_input(path, mode: str = "rb", what: str = "file"):
    """Open a regular file for reading without ever blocking on a FIFO (O_NONBLOCK, then fstat)."""
    check_input(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise GGFuseError(path, f"cannot read the {what}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise GGFuseError(path, f"the {what} is {_kind(st.st_mode)}, not a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"}))
    except BaseException:
        os.close(fd)
        raise


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return os.path.realpath(a) == os.path.realpath(b)


def _is_gguf(path: str) -> bool:
    try:
        if not os.path.isfile(path):
            return False
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def check_output(path, inputs=(), what: str = "output") -> str:
    """path, or GGFuseError when it cannot be written safely: an empty name, a directory, a
    missing parent folder, or one of `inputs` (it would destroy an input)."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise GGFuseError(None, f"{what}: expected a file name, got {path!r}")
    path = os.fspath(path)
    if "\0" in path:
        raise GGFuseError(path, f"{what}: a file name cannot hold a NUL byte")
    for src in inputs:
        if src is not None and os.path.exists(path) and _same_file(path, os.fspath(src)):
            raise GGFuseError(path, f"{what} would overwrite the input {os.fspath(src)}; choose another name")
    if os.path.isdir(path):
        raise GGFuseError(path, f"{what} is a directory; give a file name")
    if what != "synth GGUF" and _is_gguf(path):
        # a model is always somebody's input (a plan's source, a run's weights): never clobber one
        raise GGFuseError(path, f"{what} would overwrite a GGUF model; choose another name")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise GGFuseError(path, f"{what}: the folder {parent} does not exist")
    if os.path.exists(path) and not os.path.isfile(path):
        st = os.stat(path)
        raise GGFuseError(path, f"{what} is {_kind(st.st_mode)}; give a regular file name")
    return path


@contextlib.contextmanager
def atomic_output(path, mode: str = "wb", inputs=(), what: str = "output"):
    """A file object for `path`'s new contents: a unique temp file beside it, renamed onto it when
    the block ends without an exception; removed (and the target untouched) otherwise. OSErrors
    (full disk, permissions) become one GGFuseError naming the target."""
    path = check_output(path, inputs, what)
    parent = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{base[:64]}.", suffix=".tmp", dir=parent)
    except OSError as e:
        raise GGFuseError(path, f"cannot write the {what}: {e.strerror}") from None
    done = False
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)          # what open(path, "w") would have given
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        done = True
    except OSError as e:
        raise GGFuseError(path, f"cannot write the {what}: {e.strerror or e}") from None
    finally:
        if not done:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def write_atomic(path, data, inputs=(), what: str = "output") -> str:
    """Write str or bytes to `path` through atomic_output; returns path."""
    with atomic_output(path, "w" if isinstance(data, str) else "wb", inputs, what) as f:
        f.write(data)
    return os.fspath(path)


def format_bytes(n) -> str:
    """A byte count for people, in binary units: 512 B, 1.5 KiB, 12.0 GiB."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0
    return f"{n} B"   # unreachable
