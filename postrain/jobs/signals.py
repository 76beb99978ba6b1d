"""SIGTERM and SIGINT (Ctrl-C) during a run: stop cleanly, say so in status.json, and leave something to resume.

While a run directory is being written (`postrain.jobs.common.running`), both signals are handled:

- during training, the first signal asks the loop to stop at the end of the step it is in: that step is logged,
  a checkpoint is saved (whatever `trainer.save_strategy` says) and the run ends with `Interrupted`; on several
  processes every process stops at the same step (the request is agreed on at each step's end);
- outside training (loading, an eval's generation, a merge), or on a second signal (more than SAME_REQUEST_S
  after the first), `Interrupted` is raised at once, and the run keeps the checkpoints it had.

Under a launch the calling process does not handle the signal itself: torch's elastic agent forwards it to every
worker and kills those still running 30 s later, so a step longer than that ends without its checkpoint (the
run keeps its previous one).

`Interrupted` marks the run `interrupted` (with the signal, the step and the checkpoint to resume from) and the
command exits with 128 + the signal number, as a shell reports a process ended by that signal: 130 for SIGINT,
143 for SIGTERM (a job scheduler sees a terminated job, not a failed one). `--resume` continues from the checkpoint.
"""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager

from postrain.jobs.rundir import note

HANDLED = (signal.SIGTERM, signal.SIGINT)
# A repeat of the signal within this many seconds is the same request: under a launch a worker gets the signal
# twice, from the terminal or the job scheduler (sent to every process) and forwarded by the launcher.
SAME_REQUEST_S = 2.0


class Interrupted(BaseException):
    """The run was stopped by a signal. A BaseException, as KeyboardInterrupt is: no `except Exception` in a
    library swallows it on its way out."""

    def __init__(self, signum: int, step: int | None = None, checkpoint: str | None = None):
        super().__init__(signum, step, checkpoint)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.detail: str | None = None  # what became of the run directory (postrain.jobs.common.running)

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        at = f" at step {self.step}" if self.step is not None else ""
        return f"interrupted by {self.signal_name}{at}" + (f": {self.detail}" if self.detail else "")


class _State:
    depth = 0                      # nesting of `handled()`
    training = False               # a training loop polls `stop_requested()` at each step's end
    requested: int | None = None   # the signal that asked the loop to stop
    requested_at = 0.0
    previous: dict = {}


def _handler(signum, frame) -> None:
    now = time.monotonic()
    if _State.training and _State.requested is not None and now - _State.requested_at < SAME_REQUEST_S:
        return
    if _State.training and _State.requested is None:
        _State.requested, _State.requested_at = signum, now
        note(f"{signal.Signals(signum).name} received: finishing this step, saving a checkpoint, then stopping "
             f"(send it again to stop at once)")
        return
    raise Interrupted(signum)


@contextmanager
def handled():
    """Handle SIGTERM / SIGINT for the body (a run writing its directory); the previous handlers afterwards.
    Signals can only be handled in the main thread; elsewhere the body runs as it would without this."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _State.depth == 0:
        _State.previous = {s: signal.getsignal(s) for s in HANDLED}
        _State.requested = None
        for s in HANDLED:
            signal.signal(s, _handler)
    _State.depth += 1
    try:
        yield
    finally:
        _State.depth -= 1
        if _State.depth == 0:
            for s, h in _State.previous.items():
                signal.signal(s, h if h is not None else signal.SIG_DFL)
            _State.requested, _State.training = None, False


@contextmanager
def training():
    """The body is a training loop that polls `stop_requested()` at each step's end: a first signal waits for it."""
    _State.training, _State.requested = True, None
    try:
        yield
    finally:
        _State.training = False


def stop_requested() -> int | None:
    """The signal that asked this process' training loop to stop, or None."""
    return _State.requested


def request_stop(signum: int) -> None:
    """Ask the training loop to stop as if `signum` had arrived (another process of the launch received it)."""
    if _State.requested is None:
        _State.requested = signum
