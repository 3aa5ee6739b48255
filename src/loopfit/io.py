"""Atomic writes (a crash never leaves a half-written file or folder in place of a good one) and file checksums."""

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_dir(dest, force=False):
    """Yield a temporary folder next to `dest`; on success it is renamed to `dest` (replacing it if `force`)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield tmp
        _fsync_tree(tmp)
        if dest.exists():
            if not force:
                raise FileExistsError(dest)
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(dest, mode="wb"):
    """Yield an open file whose contents appear at `dest` only once it is complete and flushed."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)
    os.chmod(tmp, 0o644)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fsync_tree(root):
    for path in Path(root).rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def sha256_file(path):
    """The hex sha256 of a file's bytes, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def check_writable(path, what="--out"):
    """Refuse, before any heavy work, an output folder that cannot be created or written: a LoopfitError naming
    it. Creates nothing: it probes the nearest existing folder on the way with a temporary file."""
    from . import LoopfitError

    path = Path(path)
    fix = f"choose a {what} folder you can write to"
    if path.exists() and not path.is_dir():
        raise LoopfitError(f"{what} {path} is a file, not a folder: {fix}")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise LoopfitError(f"cannot create {what} {path}: {probe} is a file, not a folder: {fix}")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".loopfit-write-test-", dir=probe)
    except OSError as e:
        raise LoopfitError(f"cannot create {what} {path}: {probe} is not writable ({e.strerror}): {fix}") from None
    os.close(fd)
    os.unlink(tmp)


def check_empty_or_force(path, force, what="--out"):
    """Refuse to write into a non-empty output folder unless `force` (as `loopfit convert` does)."""
    from . import LoopfitError

    path = Path(path)
    if not force and path.is_dir() and any(path.iterdir()):
        raise LoopfitError(f"{what} {path} is not empty: choose another {what} or pass --force to write into it")
