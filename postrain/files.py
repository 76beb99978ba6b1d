"""Files as postrain writes them, and the names in a run directory that its writers (postrain.jobs) and its
readers (postrain.reports) share. Standard library only: every layer may import it.

postrain/jobs/rundir.py says what a reader of a run directory can rely on (whole files, the `--overwrite` attempt
beside the old run, the lock); the pieces of that the reports read live here, below both.
"""

from __future__ import annotations

import os
from pathlib import Path

ATTEMPT_SUFFIX = ".new"  # `--overwrite`: the new run is written to `<name>.new` until it has finished
SAMPLES_DIR = "eval_samples"  # a training run's evaluations during training (`eval_during_training:`)


def fsync_path(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to disk. A filesystem that cannot fsync a directory is
    left as it is: the rename that follows is still atomic there."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so that a reader sees the old content or the new, never a torn file: a temporary
    file beside it, fsync, rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent)


def attempt_dir(final: Path) -> Path:
    """Where `--overwrite` writes the new run until it has finished: the sibling `<name>.new`."""
    final = Path(final)
    return final.with_name(final.name + ATTEMPT_SUFFIX)


def is_attempt_of(path: Path, final: Path) -> bool:
    return Path(path).resolve() == attempt_dir(final).resolve()
