"""Files: every write in the course is atomic (a temporary file in the same folder, then a
rename), so a crash or a full disk never leaves a half-written checkpoint, JSON or figure."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_write(path, mode: str = "wb"):
    """Open a temporary file beside `path` for writing; on success fsync it and rename it to
    `path` (replacing any old file in one step); on any error remove it and re-raise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
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
