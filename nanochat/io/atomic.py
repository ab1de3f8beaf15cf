"""Writing files atomically and opening outside files safely: the one copy of each.

- ``atomic_path(target)``: a context manager yielding a temporary path next to ``target``;
  when the block ends without an exception the temporary file is flushed to disk, given the
  mode a plain ``open(target, "w")`` would give (the existing file's mode, else
  ``0o666 & ~umask``; ``mkstemp`` alone would leave 0600) and renamed onto ``target``. On an
  exception it is removed, so a failed write leaves no partial output and the old file intact.
  An ``OSError`` while creating the temporary file names ``target``, not the temporary name.
- ``atomic_write_bytes`` / ``atomic_write_text``: the same for data already in memory.
- ``open_regular(path, what)``: open a file for reading only when it is a regular file. The
  open is non-blocking, so a FIFO or a device cannot hang the reader; anything else is one
  ``ValueError`` sentence (``not_found`` / ``not_regular`` phrasing chosen by the caller's
  ``error`` class).
"""
from __future__ import annotations

import json
import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path


def current_umask() -> int:
    """The process umask (read from /proc where possible: setting it to read it races threads)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def default_mode(target) -> int:
    """The permission bits a plain ``open(target, "w")`` leaves: the existing file's, else 0o666 & ~umask."""
    try:
        st = os.stat(target)
        if stat.S_ISREG(st.st_mode):
            return stat.S_IMODE(st.st_mode)
    except OSError:
        pass
    return 0o666 & ~current_umask()


def _named_error(exc: OSError, target) -> OSError:
    """``exc`` re-told about ``target`` (the temporary name means nothing to the user)."""
    return type(exc)(exc.errno, exc.strerror or str(exc), os.fspath(target))


@contextmanager
def atomic_path(target, suffix=".tmp"):
    """Yield a temporary path in ``target``'s directory; rename it onto ``target`` on success."""
    target = Path(target)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    except OSError as exc:
        raise _named_error(exc, target) from None
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, default_mode(target))
        try:
            os.replace(tmp, target)
        except OSError as exc:
            raise _named_error(exc, target) from None
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_bytes(target, data: bytes) -> None:
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(target, text: str, encoding="utf-8") -> None:
    atomic_write_bytes(target, text.encode(encoding))


def open_regular(path, what="file", error=ValueError):
    """``open(path, "rb")`` for a regular file only, never blocking on a FIFO or device.

    Raises ``error`` with ``"{path}: ..."`` sentences: the path does not exist, is a directory,
    is not a regular file, or cannot be opened (permission, ...)."""
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{path}: the {what} does not exist.") from None
    except IsADirectoryError:
        raise error(f"{path}: the path is a directory, not a {what}.") from None
    except OSError as exc:
        raise error(f"{path}: the {what} cannot be opened ({exc.strerror or exc}).") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise error(f"{path}: the path is a directory, not a {what}.")
        if not stat.S_ISREG(mode):
            kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) \
                else "a socket" if stat.S_ISSOCK(mode) else "not a regular file"
            raise error(f"{path}: the path is {kind}, not a regular {what}.")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path, limit: int, what="file", error=ValueError) -> bytes:
    """The bytes of the regular file ``path``, refused (``error``) past ``limit`` bytes."""
    with open_regular(path, what, error) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise error(f"{path}: the {what} is {size:,} bytes, more than the {limit:,} allowed.")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise error(f"{path}: the {what} grew past {limit:,} bytes while being read.")
    return data


def read_json_object(path, limit: int, what="file", error=ValueError) -> dict:
    """A JSON object from the regular file ``path`` (at most ``limit`` bytes, UTF-8), or one
    ``error`` naming the file: not UTF-8, invalid JSON (with line and column), nesting too deep
    for the parser, or a value that is not an object."""
    data = read_regular(path, limit, what, error)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: the {what} is not UTF-8 text (bad byte at offset {exc.start}).") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{path}: the {what} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}).") from None
    except RecursionError:
        raise error(f"{path}: the {what} nests JSON too deeply.") from None
    if not isinstance(value, dict):
        raise error(f"{path}: the {what} must hold a JSON object, not {type(value).__name__}.")
    return value
