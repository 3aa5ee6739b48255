"""Atomic writes (a crash never leaves a half-written file or folder in place of a good one) and file checksums."""

import contextlib
import errno
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _temp_prefix(dest):
    """Hidden temporary names carry the writer's pid: `.NAME.tmp-PID-XXXX` (and `.NAME.old-PID`)."""
    return f".{dest.name}.tmp-{os.getpid()}-"


def remove_stale_temps(dest):
    """Delete the temporary files and folders that a killed writer of `dest` left beside it (their pid is gone)."""
    dest = Path(dest)
    if not dest.parent.is_dir():
        return 0
    pattern = re.compile(rf"^\.{re.escape(dest.name)}\.(?:tmp|old)-(\d+)(?:-|$)")
    removed = 0
    for p in dest.parent.iterdir():
        m = pattern.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed += 1
    return removed


@contextlib.contextmanager
def atomic_dir(dest, force=False):
    """Yield a temporary folder next to `dest`; on success it is renamed to `dest` (replacing it if `force`)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(dest)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(dest), dir=dest.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result is an ordinary folder
    try:
        try:
            yield tmp
            _fsync_tree(tmp)
        except Exception as e:
            raise _write_failed(dest, e) from e
        if dest.exists():
            if not force:
                raise FileExistsError(dest)
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}-{tmp.name.rsplit('-', 1)[-1]}")
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
    remove_stale_temps(dest)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(dest), dir=dest.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the result follows the user's umask
    try:
        try:
            with os.fdopen(fd, mode) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
        except Exception as e:
            raise _write_failed(dest, e) from e
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fsync_tree(root):
    mode = 0o666 & ~_umask()  # some writers (safetensors) create private files: the result follows the umask
    for path in Path(root).rglob("*"):
        if path.is_file():
            os.chmod(path, mode)
            with open(path, "rb") as f:
                os.fsync(f.fileno())


FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
FULL_MESSAGES = ("unexpected pos", "No space left", "File too large", "Disk quota exceeded")


def _write_failed(dest, e):
    """A write that failed for want of space (the OS's error, or torch's and safetensors' wrapping of it) as one
    LoopfitError naming the folder; any other exception as it is. The partial write is removed by the caller."""
    from . import LoopfitError

    if isinstance(e, LoopfitError):
        return e
    full = (isinstance(e, OSError) and e.errno in FULL_ERRNOS) or any(m in str(e) for m in FULL_MESSAGES)
    if not full:
        return e
    return LoopfitError(f"cannot write {dest}: the disk holding {dest.parent} is full or over its quota "
                        f"({(str(e).splitlines() or [type(e).__name__])[0][:100]}); free space there, or write "
                        "elsewhere, and run again (what was written before is intact)")


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


@contextlib.contextmanager
def folder_lock(folder, what):
    """Hold an exclusive lock on `folder` (created if missing) for the block: a second process that asks for it
    gets a LoopfitError naming the holder. The kernel releases the lock when its holder dies, even by kill -9."""
    import fcntl

    from . import LoopfitError

    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".loopfit.lock"
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise LoopfitError(f"{what} {folder} is in use by a running loopfit ({holder}): wait for it to finish, or "
                           f"choose another {what}") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}")
    f.flush()
    try:
        yield folder
    finally:
        f.close()  # releases the lock
        if created and [p.name for p in folder.iterdir()] == [path.name]:
            shutil.rmtree(folder, ignore_errors=True)  # a run refused before writing anything leaves nothing
