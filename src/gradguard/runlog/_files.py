"""How the bytes of a run directory reach the disk (standard library only).

Whole files (``meta.json``, ``findings.json``, ``tune.json``, the report) are replaced atomically:
:func:`atomic_write_text` / :func:`atomic_write_json` (temp file, ``fsync``, ``os.replace``), so a
reader sees the old file or the new one. A ``.jsonl`` log is appended in whole lines, one
``write`` each, under the run directory's one-writer lock (:class:`_LogFile`).
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import uuid
from pathlib import Path
from typing import Any

from gradguard.errors import GradGuardError
from gradguard.runlog._encoding import _dumps
from gradguard.runlog._format import METRICS_FILE

try:  # POSIX: the one-writer-per-run-directory lock
    import fcntl
except ImportError:  # pragma: no cover - Windows: runs go unlocked
    fcntl = None  # type: ignore[assignment]


def _write_all(fd: int, data: bytes) -> None:
    """One ``os.write`` call (repeated only for the rest of a short write, which regular files rarely do)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(folder: Path) -> None:
    """``fsync`` a folder so a rename in it is durable; a no-op where the OS does not allow it."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(folder, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, fsync: bool = True) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically: readers see the old file or the new one.

    Writes a temporary file in the same folder, flushes and ``fsync``-s it, renames it over
    ``path`` with :func:`os.replace`, then ``fsync``-s the folder where the OS allows it. On an
    error the temporary file is removed and ``path`` is left as it was.

    Args:
        path: the file to write; its folder must exist.
        text: the whole new content.
        fsync: ``False``: no ``fsync`` (still atomic for readers and when the process dies; the
            caller makes it durable later, e.g. with :func:`_fsync_file`). Saves ~0.1–1 ms a write.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "note.txt"
        >>> atomic_write_text(p, "hello\\n"); p.read_text()
        'hello\\n'
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    data = text.encode("utf-8")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    fd = os.open(tmp, flags, 0o666)  # the umask applies, as for an ordinary open()
    try:
        try:
            _write_all(fd, data)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if fsync:
        _fsync_dir(target.parent)


def _fsync_file(path: str | os.PathLike[str]) -> None:
    """``fsync`` an existing file and its folder: makes an earlier ``atomic_write_text(...,
    fsync=False)`` durable. Raises :class:`OSError` as ``os.open`` / ``os.fsync`` do."""
    target = Path(path)
    fd = os.open(target, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_dir(target.parent)


def atomic_write_json(
    path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2, fsync: bool = True
) -> None:
    """Write ``obj`` as standard JSON to ``path`` atomically (see :func:`atomic_write_text`).

    Non-finite floats become ``"nan"``/``"inf"``/``"-inf"`` and other values are converted as by
    :func:`to_jsonable`, so this never fails on the data.

    Args:
        path: the file to write; its folder must exist.
        obj: the value to write.
        indent: JSON indentation (``None`` for one line).
        fsync: see :func:`atomic_write_text`.
    """
    atomic_write_text(path, _dumps(obj, indent=indent) + "\n", fsync=fsync)


class _LogFile:
    """One append-only ``.jsonl`` file of a run directory, written in whole lines only.

    Opened unbuffered in append mode (``O_APPEND``), so each :meth:`append` is one ``write`` at
    the end of the file. :attr:`cut` is the size the file had before a write that failed: that
    write may have left part of a line, which is truncated away (or, where truncating fails too,
    ended with a newline so the reader skips it as one bad line) before anything new is written.
    A record is never glued to a cut line.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = io.FileIO(path, "a+")
        self.cut: int | None = None

    def lock(self, run_dir: Path) -> None:
        """Take the run directory's writer lock: an exclusive ``flock`` on this file, released on
        :meth:`close` and when the process dies. Where the OS or file system has no ``flock``
        (Windows, some network mounts) the run goes on unlocked."""
        if fcntl is None:
            return
        try:
            fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _in_use_error(run_dir) from None
        except OSError:
            return

    def end_cut_line(self) -> None:
        """If the file ends mid-line (a killed writer), end that line: the cut line stays a line of
        its own that the reader skips, instead of swallowing the first new record."""
        fd = self.file.fileno()
        size = os.fstat(fd).st_size
        if size:
            os.lseek(fd, size - 1, os.SEEK_SET)  # reads only: writes go to the end (O_APPEND)
            if os.read(fd, 1) != b"\n":
                _write_all(fd, b"\n")

    def size(self) -> int:
        """The file's size, at a line boundary (a cut line is repaired first).

        Raises:
            FileNotFoundError: the file was deleted (e.g. with its run directory) while open.
            OSError: the repair failed.
        """
        st = os.fstat(self.file.fileno())
        if st.st_nlink == 0:
            raise FileNotFoundError(errno.ENOENT, "deleted while the run was writing to it", str(self.path))
        return st.st_size if self.cut is None else self._repair(st.st_size, self.cut)

    def _repair(self, size: int, cut: int) -> int:
        """Remove what a failed write left after ``cut`` (the size before it); return the new size."""
        fd = self.file.fileno()
        if size > cut:
            try:
                os.ftruncate(fd, cut)
                size = cut
            except OSError:
                _write_all(fd, b"\n")  # cannot remove the cut line: end it, the reader skips it
                size += 1
        self.cut = None
        return size

    def append(self, data: bytes) -> None:
        """Append ``data`` (whole lines) in one write; on failure leave no part of it behind
        (at once if possible, else before the next append) and raise the ``OSError``."""
        self.cut = self.size()
        try:
            _write_all(self.file.fileno(), data)
        except OSError:
            with contextlib.suppress(OSError):
                self.size()  # repair now, so the file is whole even if nothing more is written
            raise
        self.cut = None

    def sync(self) -> None:
        """``os.fsync`` the file."""
        os.fsync(self.file.fileno())

    def close(self) -> None:
        """Sync, unlock and close; never raises for I/O."""
        with contextlib.suppress(OSError):
            self.sync()
        if fcntl is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self.file.fileno(), fcntl.LOCK_UN)
        with contextlib.suppress(OSError):
            self.file.close()


def _in_use_error(run_dir: Path) -> GradGuardError:
    return GradGuardError(
        f"run directory {str(run_dir)!r} is in use: a live RunWriter (a Guard in this or another process) "
        f"holds its lock on {METRICS_FILE}, and two writers would interleave their records. "
        "Pass another log_dir (e.g. log_dir='auto' or gradguard.runlog.default_run_dir()), "
        "or close the other run (guard.close() / writer.close()) first."
    )


def _is_locked(path: Path) -> bool:
    """Whether a live writer holds the lock on ``path`` (a metrics file); ``False`` where locks are unknown."""
    if fcntl is None:
        return False
    try:
        with open(path, "rb") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    except OSError:
        return False
    return False
