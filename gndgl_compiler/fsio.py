"""Safe files: every write, fsync, hash and JSON read of gndgl goes through here.

One job: a crash leaves the old file (or directory) or the new one, never a mix. Atomic
files (:func:`atomic_write_bytes`, ``_text``, ``_json``, ``_via``: temp file beside the
target, flush, fsync, ``os.replace``, fsync of the directory), atomic directories
(:func:`replacing_dir`), sha256 and :func:`read_json`.

The seam for fault injection: every operation calls a method of the current
:class:`FileSystem` (``mkstemp``, ``write``, ``fsync``, ``replace``, ``unlink``, ...) and
code marks logical events with :func:`point`. The default is the real file system with
no-op points; a test subclasses it and installs it for its context with
``with fsio.use(MyFaultyFS()): ...`` (docs/architecture.md, "Files and the fault seam").
No module attribute is ever reassigned, so moving a writer keeps its faults armed.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import errno
import glob
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from .errors import GndglError, TrainingError

class FileSystem:
    """The file operations gndgl's writers use; this class is the real file system.

    Subclass it and override the operations a test wants to fail, tear or watch (each
    gets the path it acts on), or :meth:`point` to act at a named event; install the
    instance with :func:`use`. Instances carry no state of their own.
    """

    def mkstemp(self, directory: Path, prefix: str, suffix: str) -> tuple[int, str]:
        """Create a new temp file; returns ``(fd, path)`` as :func:`tempfile.mkstemp`."""
        return tempfile.mkstemp(dir=directory, prefix=prefix, suffix=suffix)

    def mkdtemp(self, directory: Path, prefix: str) -> Path:
        """Create a new temp directory in ``directory``; returns its path."""
        return Path(tempfile.mkdtemp(prefix=prefix, dir=directory))

    def mkdir(self, path: Path, parents: bool = False, exist_ok: bool = False) -> None:
        """Create a directory, as :meth:`pathlib.Path.mkdir`."""
        Path(path).mkdir(parents=parents, exist_ok=exist_ok)

    def write(self, f: IO, data: bytes | str, path: str | os.PathLike) -> None:
        """Write ``data`` to the open file ``f`` (named ``path``)."""
        f.write(data)

    def fsync(self, fd: int, path: str | os.PathLike) -> None:
        """Flush the file open as ``fd`` (named ``path``) to the disk."""
        os.fsync(fd)

    def fsync_dir(self, directory: str | os.PathLike) -> None:
        """Make the entries of ``directory`` (renames, new files) durable; a no-op on Windows."""
        if os.name == "nt":  # directories cannot be opened for fsync on Windows
            return
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def chmod(self, path: str | os.PathLike, mode: int) -> None:
        """Set the permission bits of ``path``."""
        os.chmod(path, mode)

    def replace(self, src: str | os.PathLike, dst: str | os.PathLike) -> None:
        """Rename ``src`` over ``dst`` atomically (:func:`os.replace`)."""
        os.replace(src, dst)

    def exchange(self, a: Path, b: Path) -> bool:
        """Swap two existing directories atomically (Linux ``renameat2(RENAME_EXCHANGE)``); returns
        False where the platform or file system cannot (nothing changed); OSError on other failures."""
        if not sys.platform.startswith("linux"):
            return False
        try:
            renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
        except (OSError, AttributeError):  # no libc symbol (glibc < 2.28, musl)
            return False
        renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        at_fdcwd, rename_exchange = -100, 2
        if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
            return True
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
            return False
        raise OSError(err, os.strerror(err), str(b))

    def unlink(self, path: str | os.PathLike, missing_ok: bool = True) -> None:
        """Delete a file (a missing one is fine unless ``missing_ok`` is False)."""
        Path(path).unlink(missing_ok=missing_ok)

    def rmtree(self, path: str | os.PathLike) -> None:
        """Delete a directory tree, ignoring errors."""
        shutil.rmtree(path, ignore_errors=True)

    def point(self, name: str, **info: Any) -> None:
        """A named event of the code (see :func:`point`); does nothing here."""


_CURRENT: contextvars.ContextVar[FileSystem] = contextvars.ContextVar(
    "gndgl_fsio", default=FileSystem())  # noqa: B039 - FileSystem holds no state; the default is never mutated


def current() -> FileSystem:
    """The file system of this context (the real one unless a :func:`use` block is active)."""
    return _CURRENT.get()


@contextlib.contextmanager
def use(fs: FileSystem) -> Iterator[FileSystem]:
    """Context manager: ``fs`` is the file system of this context in the ``with`` block (yields it)."""
    token = _CURRENT.set(fs)
    try:
        yield fs
    finally:
        _CURRENT.reset(token)


def point(name: str, **info: Any) -> None:
    """Mark the logical event ``name`` (``"<area>.<what>"``, listed in docs/architecture.md) where a
    test may inject a fault; ``info`` (a path, a step) is passed to :meth:`FileSystem.point`."""
    _CURRENT.get().point(name, **info)


# --------------------------------------------------------------------------- atomic files


def _default_mode(path: Path) -> int:
    """The mode of an existing ``path``, else what a plain ``open()`` would create."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _atomic(path: str | os.PathLike, fill: Callable[[FileSystem, int, str], None], suffix: str,
            error: type[GndglError] | None) -> Path:
    """Temp file beside ``path``; ``fill`` writes, fsyncs and closes it; chmod, rename, fsync the directory."""
    path, fs = Path(path), current()
    tmp: str | None = None
    try:
        fd, tmp = fs.mkstemp(path.parent, f".{path.name}.", ".tmp" + suffix)
        mode = _default_mode(path)
        fill(fs, fd, tmp)
        fs.chmod(tmp, mode)
        fs.replace(tmp, path)
        tmp = None
        fs.fsync_dir(path.parent)
    except OSError as exc:
        if error is None:
            raise
        raise error(f"could not write {path}: {exc.strerror or exc}. "
                    "Check that the directory exists, is writable and that the disk is not full.") from exc
    finally:
        if tmp is not None:
            try:
                fs.unlink(tmp)
            except OSError:
                pass
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *,
                       error: type[GndglError] | None = TrainingError) -> Path:
    """Write ``data`` to ``path`` atomically and durably.

    A temp file ``.<name>.<random>.tmp`` beside ``path`` is flushed, fsynced, given the mode of
    the file it replaces (else ``open()``'s default), renamed over ``path`` (:func:`os.replace`);
    then the directory is fsynced. A reader sees the old file or the new one, never a mix.

    Args:
        path: destination file; its directory must exist.
        data: the content.
        error: the gndgl error class raised on failure; None lets :class:`OSError` through.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        TrainingError (or ``error``): on any OS failure (read-only directory, disk full, ...),
            naming the path and the OS reason. The temp file is removed and an earlier file
            at ``path`` is left untouched.
    """
    def fill(fs: FileSystem, fd: int, tmp: str) -> None:
        with os.fdopen(fd, "wb") as f:
            fs.write(f, data, tmp)
            f.flush()
            fs.fsync(f.fileno(), tmp)
    return _atomic(path, fill, "", error)


def atomic_write_via(path: str | os.PathLike, writer: Callable[[Path], Any], *, suffix: str = "",
                     error: type[GndglError] | None = TrainingError) -> Path:
    """Like :func:`atomic_write_bytes`, for libraries that write to a file name themselves.

    Args:
        path: destination file; its directory must exist.
        writer: called with the temp file's path (``.<name>.<random>.tmp<suffix>``); writes it whole.
        suffix: the temp file's ending (some writers insist on one, e.g. ``.pt2``).
        error: the gndgl error class raised on an OS failure; None lets :class:`OSError` through.

    Returns and raises as :func:`atomic_write_bytes`.
    """
    def fill(fs: FileSystem, fd: int, tmp: str) -> None:
        os.close(fd)
        writer(Path(tmp))
        fsync_file(tmp)
    return _atomic(path, fill, suffix, error)


def atomic_write_text(path: str | os.PathLike, text: str, *,
                      error: type[GndglError] | None = TrainingError) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically; returns and raises as :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode("utf-8"), error=error)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, compact: bool = False,
                      error: type[GndglError] | None = TrainingError) -> Path:
    """Write ``obj`` as JSON (indent 1, or ``compact``: no spaces, for big machine-read files) to
    ``path`` atomically; returns and raises as :func:`atomic_write_bytes` (TypeError: not JSON-able)."""
    text = json.dumps(obj, separators=(",", ":")) if compact else json.dumps(obj, indent=1)
    return atomic_write_text(path, text + "\n", error=error)


def write_file(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write a file inside a directory that is not published yet (:func:`replacing_dir` fsyncs it).

    Returns ``path`` as a :class:`~pathlib.Path`; raises :class:`OSError` on any OS failure."""
    path, fs = Path(path), current()
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with open(path, "wb") as f:
        fs.write(f, raw, path)
    return path


def remove_temp_files(directory: str | os.PathLike) -> list[str]:
    """Delete the temp files (``.<name>.*.tmp``) of atomic writes that a killed process left in ``directory``.

    Call it only where no other process writes into ``directory`` at the same time.

    Returns:
        Names of the deleted files (a file that cannot be deleted is left alone).
    """
    fs, deleted = current(), []
    for tmp in Path(directory).glob(".*.tmp"):
        try:
            if tmp.is_file():
                fs.unlink(tmp)
                deleted.append(tmp.name)
        except OSError:
            pass
    return deleted


# --------------------------------------------------------------------------- atomic directories


@contextlib.contextmanager
def replacing_dir(out: str | os.PathLike, *, error: type[GndglError] = GndglError, what: str = "directory",
                  remedy: str = "choose another path") -> Iterator[Path]:
    """Build a directory that then replaces ``out`` atomically: an interrupted build leaves the old one.

    Yields a temp directory beside ``out`` (``.<name>.tmp-*``, mode 755) to fill. On a normal
    exit its files and directories are fsynced and it is swapped into place: a rename, or one
    ``renameat2(RENAME_EXCHANGE)`` over an existing ``out``; without exchange, two renames that
    park the old tree in ``.<name>.old-*/a`` in between (:func:`interrupted_replacement`).
    On an error the temp directory is deleted and ``out`` is untouched.

    Args:
        out: the directory to create or replace (its parents are created).
        error: the gndgl error class raised on an OS failure.
        what: what the directory is, for messages (``"artifact"``).
        remedy: what to do when the temp directory cannot be created.

    Returns:
        A context manager yielding the temp directory's path.

    Raises:
        GndglError (or ``error``): ``cannot write the <what> to '<out>': <OS reason>``.
    """
    out, fs = Path(out), current()
    parent = out.parent if str(out.parent) else Path(".")
    try:
        fs.mkdir(parent, parents=True, exist_ok=True)
        tmp = fs.mkdtemp(parent, f".{out.name}.tmp-")
    except OSError as exc:
        raise error(f"cannot write the {what} to '{out}': {exc.strerror}; {remedy}") from None
    try:
        fs.chmod(tmp, 0o755)
        yield tmp
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                fsync_file(f)
        for d in sorted((d for d in tmp.rglob("*") if d.is_dir()), reverse=True):
            fs.fsync_dir(d)
        fs.fsync_dir(tmp)
        if not out.exists():
            fs.replace(tmp, out)
        elif fs.exchange(tmp, out):  # out is the new tree in one step; tmp now holds the old one
            fs.rmtree(tmp)
        else:  # two renames: a crash in between leaves the old tree in .<name>.old-*/a
            old = fs.mkdtemp(parent, f".{out.name}.old-")
            fs.replace(out, old / "a")
            fs.replace(tmp, out)
            fs.rmtree(old)
        fs.fsync_dir(parent)
    except OSError as exc:
        fs.rmtree(tmp)
        raise error(f"cannot write the {what} to '{out}': {exc.strerror or exc}") from None
    except BaseException:
        fs.rmtree(tmp)
        raise


def interrupted_replacement(out: str | os.PathLike, marker: str) -> Path | None:
    """The previous tree (``.<name>.old-*/a`` holding a file ``marker``) that an interrupted
    two-rename :func:`replacing_dir` of ``out`` left aside, or None."""
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    try:
        for cand in sorted(parent.glob(f".{glob.escape(out.name)}.old-*/a")):
            if (cand / marker).is_file():
                return cand
    except OSError:
        pass
    return None


def fsync_file(path: str | os.PathLike) -> None:
    """fsync an existing file by name; raises :class:`OSError` if it cannot be opened or flushed."""
    fd = os.open(path, os.O_RDONLY)
    try:
        current().fsync(fd, path)
    finally:
        os.close(fd)


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make the entries of ``directory`` durable; raises :class:`OSError` on failure."""
    current().fsync_dir(directory)


# --------------------------------------------------------------------------- hashes and JSON


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_and_size(path: str | os.PathLike) -> tuple[str, int]:
    """Hex sha256 and size in bytes of a file, read in 1 MiB chunks; raises :class:`OSError` if unreadable."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file (see :func:`sha256_and_size`); raises :class:`OSError` if unreadable."""
    return sha256_and_size(path)[0]


def read_json(path: str | os.PathLike, *, error: type[GndglError] = GndglError, remedy: str = "") -> Any:
    """Parse a JSON file.

    Args:
        path: the file.
        error: the gndgl error class raised when it cannot be read or parsed.
        remedy: what the message tells the user to do (appended after ``;``).

    Returns:
        The parsed value.

    Raises:
        GndglError (or ``error``): ``cannot read '<path>': <reason>; <remedy>``.
    """
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise error(f"cannot read '{path}': {exc}" + (f"; {remedy}" if remedy else "")) from None
