"""Files: every write in the course is atomic (a temporary file in the same folder, then a
rename), so a crash or a full disk never leaves a half-written checkpoint, JSON or figure."""
from __future__ import annotations

import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl                                 # POSIX: lock a temporary file while it is written
except ImportError:                              # Windows: no stale-file cleanup
    fcntl = None


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (else set and restored)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove_stale_temporaries(path: Path) -> None:
    """Remove the temporary files that writers of `path` killed mid-write left behind. A live
    writer holds a lock on its temporary file (see atomic_write), so only the dead ones go."""
    if fcntl is None:
        return
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp")    # mkstemp's names
    for stale in path.parent.iterdir():
        if not pattern.fullmatch(stale.name):
            continue
        try:
            with open(stale, "rb") as f:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)       # its writer is gone
            stale.unlink(missing_ok=True)
        except OSError:                          # locked by a live writer, or already gone
            pass


@contextmanager
def atomic_write(path, mode: str = "wb"):
    """Open a temporary file beside `path` for writing; on success fsync it and rename it to
    `path` (replacing any old file in one step); on any error remove it and re-raise.

    The file gets the permissions `open()` would give it (0666 less the user's umask), not the
    temporary file's 0600. Temporary files that an earlier writer of `path` left behind, killed
    before it could remove them (SIGKILL, a power cut), are removed first; the writer holds a
    lock on its own temporary file meanwhile, so that two writers never remove each other's.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)       # released when the file closes or the process dies
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            try:
                os.fchmod(f.fileno(), 0o666 & ~_umask())
            except OSError:                      # a file system without modes keeps its own
                pass
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def jsonable(x):
    """JSON fallback for numpy scalars and arrays, tensors, paths and the like."""
    if hasattr(x, "tolist"):
        return x.tolist()
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def save_json(path, obj, indent: int = 1) -> Path:
    """Write `obj` as JSON atomically; numpy/torch values become plain numbers."""
    text = json.dumps(obj, indent=indent, default=jsonable) + "\n"
    with atomic_write(path, "w") as f:
        f.write(text)
    return Path(path)


def writable_dir(path, flag: str) -> Path:
    """`path`, created if needed, once a file could be written there; else a one-line
    OutputError naming `flag`, the option that chooses another folder."""
    from .errors import OutputError

    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise OutputError(f"cannot write to {path} ({e.strerror or e}): "
                          f"choose a writable folder with {flag}") from e
    return path
