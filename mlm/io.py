"""Files: written so that a crash, a full disk or a kill never leaves a half-written one; JSON read
with a clear error.

Everything mlm writes (tokenizer files, exported weights, token arrays, checkpoints, metrics, plots)
goes through `AtomicFile`: bytes go to a temporary name beside the target, are flushed and fsynced,
and only then renamed over it. A rename within one folder is atomic on POSIX filesystems, so a
reader sees the old file or the new one, never a mix; on any error the temporary file is removed and
the old file stays."""

from __future__ import annotations

import errno
import json
import os
import socket
from pathlib import Path
from typing import IO

from mlm.errors import StorageError

# What a full or unwritable disk raises; anything else (a bug, a bad path) keeps its traceback.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG}


def storage_error(path: str | os.PathLike, error: OSError) -> StorageError:
    """The one-line error for a write that failed for lack of space or permission."""
    return StorageError(
        f"cannot write {path}: {error.strerror or error}; free some space or make the folder "
        "writable (or choose another --out), then run again"
    )


class AtomicFile:
    """A file written under a temporary name and put in place by `commit()`, or dropped by
    `discard()`.

    Used as a context manager it commits on a clean exit and discards on an exception. Used by hand
    it lets several files be written first and committed together at the end (a dataset's arrays).
    """

    def __init__(self, path: str | os.PathLike, mode: str = "wb", *, fsync: bool = True):
        if mode not in ("wb", "w"):
            raise ValueError(f"AtomicFile writes new files: mode 'wb' or 'w', not {mode!r}")
        self.path = Path(path)
        # Host and process keep two writers of the same target (ranks of two nodes on a shared disk,
        # say) from sharing a temporary file.
        self.tmp = self.path.with_name(f"{self.path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
        self.fsync = fsync
        try:
            self.file: IO = open(self.tmp, mode, **({"encoding": "utf-8"} if mode == "w" else {}))
        except OSError as e:
            if e.errno in STORAGE_ERRNOS:
                raise storage_error(self.path, e) from None
            raise

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.discard()
            if e.errno in STORAGE_ERRNOS:
                raise storage_error(self.path, e) from None
            raise

    def commit(self) -> Path:
        """Flush, fsync (so the bytes are on disk before the name points at them) and rename over
        the target."""
        try:
            if not self.file.closed:
                self.file.flush()
                if self.fsync:
                    os.fsync(self.file.fileno())
                self.file.close()
            os.replace(self.tmp, self.path)
        except OSError as e:
            self.discard()
            if e.errno in STORAGE_ERRNOS:
                raise storage_error(self.path, e) from None
            raise
        except BaseException:
            self.discard()
            raise
        return self.path

    def discard(self) -> None:
        if not self.file.closed:
            self.file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.commit()
        else:
            self.discard()


def atomic_write(path: str | os.PathLike, data: str | bytes, *, fsync: bool = True) -> Path:
    """Replace the file at path with data (text as UTF-8) in one step: see `AtomicFile`."""
    with AtomicFile(path, "w" if isinstance(data, str) else "wb", fsync=fsync) as f:
        f.write(data)
    return Path(path)


def read_json(path: str | os.PathLike, error: type[Exception]) -> dict:
    """The JSON in path, or {} when there is no such file; invalid JSON raises `error` naming the
    file."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise error(
            f"{path} is not valid JSON ({e.msg} at line {e.lineno}); restore or delete the file"
        ) from None
