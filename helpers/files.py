"""Files: every write in the course is atomic (a temporary file in the same folder, then a
rename), so a crash or a full disk never leaves a half-written checkpoint, JSON or figure."""
from __future__ import annotations

import glob
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_write(path, mode: str = "wb"):
    """Open a temporary file beside `path` for writing; on success fsync it and rename it to
    `path` (replacing any old file in one step); on any error remove it and re-raise.

    The file gets the permissions `open()` would give it (0666 less the user's umask), not the
    temporary file's 0600. Temporary files that an earlier writer of `path` left behind, killed
    before it could remove them (SIGKILL, a power cut), are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_umask())
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
