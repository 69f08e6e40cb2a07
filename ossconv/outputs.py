"""Where outputs are made: a temporary name beside the output, reclaimed if its run died, and a final rename
that never replaces what appeared at the output meanwhile unless asked to.

Every command that writes (checkpoint folders, rank folders, GGUF files, reports) builds its output under
``temporary(out)`` and then calls ``place``; an interrupted run leaves only a temporary name with its PID,
which the next run beside the same output removes once that PID is gone.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import re
import shutil
from pathlib import Path

from ossconv.errors import OssconvError, OutputExistsError

MAX_NAME_BYTES = 255  # a file name's limit on Linux and macOS file systems
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def temporary(out: Path) -> Path:
    """``.NAME.ossconv-tmp-PID`` beside ``out``, the name shortened (with a hash) to fit the 255-byte limit,
    after removing the temporary outputs of dead runs for the same ``out``."""
    reclaim(out)
    return out.parent / f"{_stem(out)}{os.getpid()}"


def _stem(out: Path) -> str:
    suffix = ".ossconv-tmp-"
    name = out.name
    room = MAX_NAME_BYTES - len(suffix) - 1 - 10  # the dot, a PID
    if len(name.encode()) > room:
        digest = hashlib.sha256(name.encode()).hexdigest()[:16]
        name = name.encode()[: room - 17].decode(errors="ignore") + "-" + digest
    return f".{name}{suffix}"


def reclaim(out: Path) -> list[Path]:
    """Remove temporary outputs for ``out`` left by runs that no longer exist; never those of live runs."""
    pattern = re.compile(re.escape(_stem(out)) + r"(\d+)")
    removed = []
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match and not _alive(int(match.group(1))):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def place(temp: Path, out: Path, *, overwrite: bool) -> None:
    """Move a finished ``temp`` to ``out``. Without ``overwrite`` an ``out`` that exists now (it may have
    appeared during the run) is never replaced: the rename itself refuses (``renameat2`` with
    ``RENAME_NOREPLACE`` where the kernel has it), so of two runs racing for one output one wins and the
    other gets OutputExistsError. With ``overwrite`` the old output is moved aside first, then removed."""
    if overwrite and (out.exists() or out.is_symlink()):
        old = out.parent / f"{_stem(out)}old-{os.getpid()}"
        os.rename(out, old)
        os.rename(temp, out)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
        return
    try:
        _rename_noreplace(temp, out)
    except FileExistsError:
        raise OutputExistsError(out) from None
    except OSError as error:
        if error.errno == errno.ENOTEMPTY:
            raise OutputExistsError(out) from None
        raise OssconvError(f"cannot move the finished output into place: {error.strerror}", out) from None


def _rename_noreplace(src: Path, dst: Path) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        renameat2 = None
    if renameat2 is not None:
        result = renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE)
        if result == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(code, os.strerror(code), str(dst))
    if dst.exists() or dst.is_symlink():  # no atomic no-replace here: check, then rename
        raise FileExistsError(errno.EEXIST, "exists", str(dst))
    os.rename(src, dst)
