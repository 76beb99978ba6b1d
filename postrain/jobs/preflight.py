"""What a run needs from the machine, checked before it reads data or writes anything: an output directory that
can be made and written.

Without it, an `output_dir` below a file or on a read-only filesystem failed with an OSError traceback when the
run directory was made, after the data had loaded.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from postrain.errors import OutputDirError


def check_output_dir(output_dir: str | os.PathLike) -> None:
    """OutputDirError, in one line, unless `output_dir` is (or can be made as) a directory this process can write.

    The nearest existing folder (the directory itself, or the ancestor it would be made in) is probed by making
    and removing an empty folder in it: permission bits alone say nothing for root or on a read-only mount."""
    target = Path(output_dir).expanduser()
    if target.exists() and not target.is_dir():
        raise OutputDirError(f"output_dir {str(output_dir)!r} exists and is a file, not a directory; choose another "
                             f"with output_dir=...")
    existing = target
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise OutputDirError(f"output_dir {str(output_dir)!r} cannot be made: {str(existing)!r} is a file, not a "
                             f"directory")
    try:
        probe = tempfile.mkdtemp(prefix=".postrain-write-check-", dir=existing)
    except OSError as e:
        raise OutputDirError(f"output_dir {str(output_dir)!r} cannot be written: {_why(e, existing)}") from None
    os.rmdir(probe)


def _why(error: OSError, folder: Path) -> str:
    if error.errno == errno.EROFS:
        return f"{str(folder)!r} is on a read-only filesystem"
    if error.errno in (errno.EACCES, errno.EPERM):
        return f"no permission to create files in {str(folder)!r}"
    if error.errno == errno.ENOSPC:
        return f"no space left on the device of {str(folder)!r}"
    if error.errno == errno.ENOENT:
        return f"{str(folder)!r} does not accept new files"
    return f"{str(folder)!r}: {error.strerror or error}"
