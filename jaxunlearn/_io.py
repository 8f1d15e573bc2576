"""Writing results safely, in one place: plain-JSON conversion, atomic files and
directories (with recovery after a crash), and one writer per output."""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np


def jsonable(x: Any) -> Any:
    """Plain-JSON copy of x: numpy / jax scalars and arrays to Python, NaN and inf to None,
    mappings keyed by strings, anything else unknown to its ``str``."""
    if isinstance(x, Mapping):
        return {str(k): jsonable(v) for k, v in x.items()}
    if x is None or isinstance(x, str | bool):
        return x
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if hasattr(x, "shape") and hasattr(x, "dtype"):  # numpy or jax array / scalar
        arr = np.asarray(x)
        return jsonable(arr.tolist()) if arr.ndim else jsonable(arr.item())
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, int):
        return x
    return str(x)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes text to path via a temporary file in the same folder, fsync and `os.replace`.

    A crash leaves either the old file or the new one, never a truncated file that parses.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------- directories
#
# A directory is written as a hidden sibling ``.NAME.tmp-PID-TOKEN``, renamed to
# ``.NAME.ready-PID-TOKEN`` once complete, then put in place. Where the kernel can exchange
# two paths atomically (Linux renameat2 RENAME_EXCHANGE) the old and the new directory swap
# in one step, so a complete directory is at NAME at every instant. Elsewhere the old one is
# first moved aside to ``.NAME.old-PID-TOKEN``; a crash between the two renames leaves no
# NAME, and `recover_interrupted_save` (run before every save and by the CLI at start) puts
# the newest complete version back. Leftovers of dead processes are deleted there too.

_STAGES = ("tmp", "ready", "old")
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swaps two paths (Linux renameat2); False where unsupported."""
    import ctypes
    import errno

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), f"{a} <-> {b}")


def staging_path(dst: Path, stage: str, token: str) -> Path:
    """``dst.parent / .NAME.STAGE-PID-TOKEN``: a sibling on the same filesystem."""
    return dst.parent / f".{dst.name}.{stage}-{os.getpid()}-{token}"


def _leftovers(dst: Path) -> list[tuple[str, int, Path]]:
    out = []
    pattern = re.compile(rf"\.{re.escape(dst.name)}\.({'|'.join(_STAGES)})-(\d+)-\w+")
    if not dst.parent.is_dir():
        return out
    for entry in dst.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match:
            out.append((match.group(1), int(match.group(2)), entry))
    return out


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_interrupted_save(dst: str | os.PathLike) -> str | None:
    """Repairs what a killed save left next to `dst`, and says what it did.

    If `dst` is missing but a complete new version (``ready``) or the previous one (``old``)
    of a dead process is there, the newest complete one becomes `dst` again. Then the
    leftovers of dead processes (partial ``tmp`` copies, ``old`` copies) are deleted.
    Directories of live processes (a save in progress) are left alone.

    Returns:
      A sentence describing the repair, or None when there was nothing to do.
    """
    dst = Path(dst).absolute()
    dead = [(stage, path) for stage, pid, path in _leftovers(dst) if not _alive(pid)]
    said = None
    if not dst.exists():
        for stage in ("ready", "old"):
            found = sorted((p for s, p in dead if s == stage), key=lambda p: p.stat().st_mtime)
            if found:
                os.rename(found[-1], dst)
                said = f"restored {dst} from an interrupted save ({found[-1].name})"
                break
    for _, path in dead:
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
    return said


def swap_into_place(ready: Path, dst: Path) -> None:
    """Puts the complete directory `ready` at `dst`, removing the previous `dst`."""
    if not dst.exists():
        os.rename(ready, dst)
        return
    if _exchange(ready, dst):  # now `ready` holds the previous version
        shutil.rmtree(ready, ignore_errors=True)
        return
    old = staging_path(dst, "old", ready.name.rsplit("-", 1)[-1])
    os.rename(dst, old)
    os.rename(ready, dst)  # a crash just before this is repaired by recover_interrupted_save
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- one writer


class BusyError(RuntimeError):
    """Another live process holds the lock on an output."""


@contextlib.contextmanager
def exclusive_lock(target: str | os.PathLike, what: str = "output") -> Iterator[None]:
    """Holds an exclusive lock on `target` (a file or directory, existing or not).

    The lock is an ``flock`` on the hidden sibling ``.NAME.lock``, so the kernel releases it
    when the holder exits or is killed: a crashed run never blocks the next one.

    Raises:
      BusyError: another process holds it (the message names its pid and `target`).
    """
    import fcntl

    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    path = target.parent / f".{target.name}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise BusyError(
                f"another run (pid {holder}) is writing the {what} {target}; wait for it to "
                f"finish, or choose another {what}."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock


def file_digest(path: str | os.PathLike, *, limit: int | None = None) -> str:
    """sha256 of a file's bytes (16 hex digits); with `limit`, of its size and at most
    `limit` bytes from each end (large weight files)."""
    path = Path(path)
    h = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as f:
        if limit is None or size <= 2 * limit:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(str(size).encode())
            h.update(f.read(limit))
            f.seek(size - limit)
            h.update(f.read(limit))
    return h.hexdigest()[:16]


def model_dir_fingerprint(directory: str | os.PathLike) -> str:
    """A digest of a model directory's config and weights (16 hex digits): full contents up to
    2 GiB of weights, beyond that each file's size, header and tail (fast for 8B models)."""
    directory = Path(directory)
    files = sorted(
        p
        for p in directory.iterdir()
        if p.is_file() and (p.name == "config.json" or p.suffix in (".safetensors", ".bin"))
    )
    total = sum(p.stat().st_size for p in files)
    limit = None if total <= 2 << 30 else 8 << 20
    record = [(p.name, file_digest(p, limit=limit)) for p in files]
    return hashlib.sha256(repr(record).encode()).hexdigest()[:16]
