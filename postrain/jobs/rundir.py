"""Keeping a run directory whole: atomic writes, the replacement of an old run, the lock, complete checkpoints.

What a reader of `runs/<name>/` can rely on, whatever stopped the run (an error, a signal, a full disk, a crash):

- Files and folders appear whole or not at all: `status.json`, `model/` and every `checkpoints/checkpoint-N` are
  written under a temporary name, flushed to disk (fsync) and renamed into place (`postrain.files.write_atomic`, `publish`).
- `--overwrite` keeps the previous run until the new one has finished: the new run is written to the sibling
  `<name>.new` (`postrain.files.attempt_dir`) and renamed into place when it is done. When it fails or is interrupted, the previous
  run is left as it was, the attempt stays at `<name>.new` for inspection (a later `--overwrite` replaces it,
  `--resume` continues it from its last checkpoint).
- One run at a time: the run holds `.<name>.lock` beside its directory (an flock, which the kernel releases when
  the process ends, however it ends; a lock file left by a process that is gone is taken over with a note).
- `--resume` takes the last complete checkpoint (`complete_checkpoints`): one whose files are all there and whole
  (trainer_state.json parses, every safetensors file holds what its header promises, every torch archive has its
  central directory); a torn one, e.g. written by an older version on a full disk, is skipped with a note.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import sys
import time
import zipfile
from pathlib import Path

from postrain.errors import RunDirError
from postrain.files import fsync_path, write_atomic  # shared with the reports, below jobs
from postrain.models.loading import MODEL_SUBDIR

PARTIAL_SUFFIX = ".partial"  # a folder being written, renamed into place when whole
CHECKPOINT_PREFIX = "checkpoint-"
LOCK_HELD_ENV = "POSTRAIN_RUN_LOCK_HELD"  # set by the calling process of a launch, which holds the run's lock


def note(message: str, kind: str = "note") -> None:
    """A remark about the run on stderr (not an error: the run goes on); `kind` "warning" for what needs a look."""
    print(f"{kind}: {message}", file=sys.stderr, flush=True)


# --- atomic writes ----------------------------------------------------------------------------------------------

def fsync_tree(root: Path, durable: tuple[Path, ...] = ()) -> None:
    """fsync every file under `root`, then every directory (children before parents), except the folders in
    `durable`: each was made durable when it was published and not written since."""
    root, durable = Path(root), {Path(d) for d in durable}
    folders = []
    for folder, dirs, files in os.walk(root, topdown=True):
        dirs[:] = [d for d in dirs if Path(folder) / d not in durable]
        folders.append(Path(folder))
        for name in files:
            fsync_path(Path(folder) / name)
    for folder in reversed(folders):  # children before parents
        fsync_path(folder)


def partial_dir(final: Path) -> Path:
    """Where a folder that will become `final` is written: `<final>.partial`, emptied first."""
    final = Path(final)
    staging = final.with_name(final.name + PARTIAL_SUFFIX)
    if staging.exists():
        shutil.rmtree(staging)
    return staging


def publish(staging: Path, final: Path, durable: tuple[Path, ...] = ()) -> Path:
    """Make the folder `staging` (whole, written by this process) `final`: fsync its files, rename it. An existing
    `final` is renamed aside first and removed once the new one is in place. `durable`: folders inside `staging`
    that were published themselves (fsynced) and not written since, so not flushed again."""
    staging, final = Path(staging), Path(final)
    fsync_tree(staging, durable)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.replaced-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(staging, final)
    fsync_path(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


# --- a new run beside the old one -------------------------------------------------------------------------------

def replace_with_attempt(attempt: Path, final: Path) -> None:
    """A finished `--overwrite` attempt becomes the run: the previous run is renamed aside, the attempt renamed to
    `final`, and the previous run removed. Paths the trainer recorded inside the attempt (the best checkpoint) are
    rewritten to the final place."""
    attempt, final = Path(attempt), Path(final)
    for state_file in attempt.glob(f"checkpoints/{CHECKPOINT_PREFIX}*/trainer_state.json"):
        _repoint(state_file, attempt, final)  # rewritten atomically (fsynced) where it changes
    # The final model and the checkpoints were each published (fsynced, renamed into place) when written; the
    # rest (metrics, logs, status) is flushed here. A run directory holds a few GB of weights at real sizes.
    durable = tuple(p for p in [attempt / MODEL_SUBDIR, *attempt.glob(f"checkpoints/{CHECKPOINT_PREFIX}*")] if p.is_dir())
    publish(attempt, final, durable)


def _repoint(state_file: Path, attempt: Path, final: Path) -> None:
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        return
    best = state.get("best_model_checkpoint")
    if isinstance(best, str) and best.startswith(str(attempt)):
        state["best_model_checkpoint"] = str(final) + best[len(str(attempt)):]
        write_atomic(state_file, json.dumps(state, indent=2, sort_keys=True) + "\n")


# --- one run per directory --------------------------------------------------------------------------------------

def lock_path(final: Path) -> Path:
    final = Path(final)
    return final.with_name(f".{final.name}.lock")


class RunLock:
    """An exclusive lock on a run directory, held for the run's lifetime: `.<name>.lock` beside it, locked with
    flock (released by the kernel when the process ends, so a crashed run never blocks the next one) and holding
    the holder's pid, host, start time and command line for the message another run gets."""

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd

    @classmethod
    def acquire(cls, final: Path) -> "RunLock | None":
        """Lock the run directory `final`, or RunDirError naming the run that holds it. None when this process'
        launcher holds it for us (a launched worker)."""
        import fcntl  # optional: fcntl, POSIX only: postrain.jobs still imports (plans, --dry-run) where it is missing

        path = lock_path(final)
        if os.environ.get(LOCK_HELD_ENV) == str(path.resolve()):
            return None
        while True:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise RunDirError(f"cannot write beside the run directory {final} (its lock file {path}): "
                                  f"{e.strerror or e}; choose another output_dir") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise RunDirError(
                    f"run directory {final} is in use by another run ({_describe(holder)}; lock file {path}). Wait "
                    f"for it to finish, stop it, or choose another output_dir") from None
            except OSError:
                os.close(fd)  # a filesystem without flock (some network mounts): no lock rather than no run
                note(f"cannot lock {path} on this filesystem; nothing keeps a second run out of {final}")
                return None
            try:  # the file we locked may have been removed by its previous holder meanwhile: lock the new one
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        previous = _read_holder(fd)
        if previous and previous.get("pid") != os.getpid():
            note(f"took over the lock of {final} left by a run that is no longer running ({_describe(previous)})")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                                  "command": " ".join(sys.argv)}).encode(), 0)
        return cls(path, fd)

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            self.path.unlink(missing_ok=True)  # before closing: a waiting run then locks a file of its own
        finally:
            os.close(self.fd)
            self.fd = -1


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "holder unknown"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["started"])) if holder.get("started") else "?"
    return f"pid {holder.get('pid')} on {holder.get('host')}, since {since}: {holder.get('command', '')[:200]}"


# --- checkpoints ------------------------------------------------------------------------------------------------

def checkpoint_step(path: Path) -> int | None:
    suffix = Path(path).name[len(CHECKPOINT_PREFIX):]
    return int(suffix) if Path(path).name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else None


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why a checkpoint folder is not whole (None when it is): transformers writes the weights, the optimizer,
    scheduler and RNG states, then trainer_state.json. Checked without loading a tensor: trainer_state.json parses,
    weights are there, each safetensors file is as long as its header says, each torch archive (zip) has its
    central directory, which is written last. Formats it does not know (FSDP's .distcp shards) are taken as they
    are."""
    checkpoint = Path(checkpoint)
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        if not isinstance(state, dict) or "global_step" not in state:
            return "trainer_state.json has no global_step"
    except FileNotFoundError:
        return "trainer_state.json is missing"
    except (OSError, ValueError) as e:
        return f"trainer_state.json does not parse ({type(e).__name__})"
    files = [p for p in checkpoint.rglob("*") if p.is_file()]
    if not any(p.suffix in (".safetensors", ".bin", ".pt", ".distcp") or p.name.endswith(".index.json")
               for p in files):
        return "it holds no weights"
    for path in files:
        if path.suffix == ".safetensors":
            why = _safetensors_problem(path)
        elif path.suffix in (".pt", ".pth", ".bin"):
            why = _torch_archive_problem(path)
        else:
            continue
        if why:
            return f"{path.relative_to(checkpoint)} {why}"
    return None


def _safetensors_problem(path: Path) -> str | None:
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if 8 + header_len > size:
                return f"is truncated ({size} bytes, its header alone takes {8 + header_len})"
            header = json.loads(f.read(header_len))
    except (OSError, ValueError, struct.error):
        return "has no readable safetensors header"
    end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if 8 + header_len + end != size:
        return f"is truncated ({size} of {8 + header_len + end} bytes)"
    return None


def _torch_archive_problem(path: Path) -> str | None:
    with path.open("rb") as f:
        magic = f.read(4)
    if not magic:
        return "is empty"
    if magic != b"PK\x03\x04":  # torch.save writes zip archives; a legacy pickle file cannot be checked
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            archive.infolist()
    except (OSError, zipfile.BadZipFile):
        return "is not a whole torch archive"
    return None


def complete_checkpoints(run_dir: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The run's checkpoints in step order, as (complete ones, [(torn one, why)])."""
    root = Path(run_dir) / "checkpoints"
    found = sorted((p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and checkpoint_step(p) is not None),
                   key=checkpoint_step)
    complete, torn = [], []
    for path in found:
        why = checkpoint_problem(path)
        if why is None:
            complete.append(path)
        else:
            torn.append((path, why))
    return complete, torn
