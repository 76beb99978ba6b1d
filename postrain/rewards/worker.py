"""A reward function in its own worker process, so that a call can be given a wall-clock limit and stopped.

A reward called in the training process cannot be interrupted: a user function that sleeps or loops holds every
step, and math-verify's own timeouts use SIGALRM, which works only in a process's main thread. Each reward that
runs in a worker gets one long-lived child process (`python -m postrain.rewards.worker`), started on its first
call; the reward runs there in the main thread. A call that outlives its limit has the child killed (SIGKILL)
and raises RewardTimeout; the next call starts a fresh child. The limit counts from the call: the child's start
(the interpreter, the reward's imports) is waited for before, up to STARTUP_TIMEOUT_S. A child that dies (a crash, the kernel's
out-of-memory killer) raises WorkerDied. Exceptions raised by the reward come back as RewardCallError with the
original type, message and the file:line where they were raised.

The child gets the reward pickled (a built-in reward's object) or by reference (a user function,
`module:function` or an absolute `file.py:function`, imported there), the parent's sys.path and working
directory. What the reward prints goes to stderr (its stdout carries the protocol). `log_extra` and
`log_metric`, TRL's callbacks into the trainer, cannot cross processes: the child records the calls and the
parent replays them. A reward's own counters (`pop_counts`, e.g. code_exec's timeouts) are read in the child after
each call and returned with the scores. The child ignores SIGINT (the training process decides what Ctrl-C
does) and exits when its parent closes the pipe.

TRL's `trainer_state` is sent as a namespace of its fields (`state_fields`), so that the child need not import
transformers to read it. As in TRL's multiprocess rollouts, arguments are pickled: a dataset column of objects that do not pickle fails
the call (RewardCallError, naming the argument).
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import traceback
import types
import weakref
from typing import Any

from postrain.rewards.references import load_function

# TRL's callbacks into the trainer: replaced by recorders in the child, replayed by the parent.
CALLBACK_ARGUMENTS = ("log_extra", "log_metric")
# How long a worker may take to start (the interpreter, postrain.rewards, the reward's own imports) before a call.
STARTUP_TIMEOUT_S = 120.0


class RewardCallError(Exception):
    """The reward raised in its worker: `kind` is the original exception type's name, `where` file:line."""

    def __init__(self, kind: str, message: str, where: str = "", details: str = ""):
        super().__init__(message)
        self.kind, self.where, self.details = kind, where, details


class RewardTimeout(Exception):
    """The call did not return within its limit; the worker was killed."""


class WorkerDied(Exception):
    """The worker process ended without answering (a crash, a kill by the kernel's out-of-memory killer)."""


_LIVE: "weakref.WeakSet[RewardWorker]" = weakref.WeakSet()


def _close_all() -> None:
    for worker in list(_LIVE):
        worker.close()


atexit.register(_close_all)


def state_fields(state: Any) -> Any:
    """TRL's `trainer_state` argument (transformers' TrainerState) as a namespace of the same fields.

    Unpickling a TrainerState in the child imports transformers and torch: 4.6 s on 2 CPU cores, paid on the first
    call of every run, where TRL's in-process reward pays nothing. The fields (global_step, epoch, max_steps,
    log_history, ...) are plain values and read the same way (`trainer_state.global_step`); only isinstance checks
    against TrainerState see the difference.
    """
    if not dataclasses.is_dataclass(state) or isinstance(state, type):
        return state
    return types.SimpleNamespace(**{f.name: getattr(state, f.name) for f in dataclasses.fields(state)})


class RewardWorker:
    """One child process running one reward. `call(completions, columns, timeout)` -> (scores, counts)."""

    def __init__(self, payload: tuple[str, Any]):
        # ("object", <pickled reward bytes>) or ("reference", "module:function" / "/abs/file.py:function")
        self.payload = payload
        self.process: subprocess.Popen | None = None
        self.starts = 0
        self._ready = False  # the child answered "ready" to its init message
        self._lock = threading.Lock()
        _LIVE.add(self)

    def start(self) -> None:
        """Start the child now without waiting for it, so that its start (the interpreter, the reward's imports)
        overlaps the trainer's own setup instead of delaying the first call; the first call waits for it."""
        with self._lock:
            if self.process is None or self.process.poll() is not None:
                self._spawn()

    def _spawn(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from postrain.rewards.worker import serve; serve()"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None, cwd=os.getcwd(), close_fds=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
        )
        self.starts += 1
        self._ready = False
        _send(self.process.stdin, ("init", self.payload))

    def _await_ready(self) -> None:
        # The limits are the reward's: the interpreter's start and the reward's import are waited for apart.
        reply = self._receive(STARTUP_TIMEOUT_S, what="start")
        if reply[0] != "ready":
            raise WorkerDied(f"the reward's worker process answered {reply[0]!r} when it started")
        self._ready = True

    def call(self, completions: list, columns: dict[str, Any], timeout: float | None) -> tuple[list, dict]:
        callbacks = {key: columns[key] for key in CALLBACK_ARGUMENTS if callable(columns.get(key))}
        sent = {key: state_fields(value) if key == "trainer_state" else value
                for key, value in columns.items() if key not in callbacks}
        for key, value in sent.items():
            try:
                pickle.dumps(value)
            except Exception as e:
                raise RewardCallError("PicklingError", f"the argument {key!r} cannot be sent to the reward's worker "
                                      f"process ({type(e).__name__}: {e})") from None
        with self._lock:
            if self.process is None or self.process.poll() is not None:
                self._spawn()
            if not self._ready:
                self._await_ready()
            try:
                _send(self.process.stdin, ("call", completions, sent, sorted(callbacks)))
            except (BrokenPipeError, OSError):
                raise self._died() from None
            reply = self._receive(timeout)
        status, *rest = reply
        if status == "error":
            raise RewardCallError(*rest)
        scores, counts, calls = rest
        for name, args in calls:  # replay log_extra / log_metric in this process
            callbacks[name](*args)
        return scores, counts

    def _receive(self, timeout: float | None, what: str = "call"):
        stdout = self.process.stdout
        if timeout is not None:
            ready, _, _ = select.select([stdout], [], [], max(timeout, 0.0))
            if not ready:
                self._kill()
                if what == "start":
                    raise WorkerDied(f"the reward's worker process did not start within {timeout:g} s")
                raise RewardTimeout(f"no answer within {timeout:g} s")
        try:
            return _receive(stdout)
        except (EOFError, OSError, pickle.UnpicklingError):
            raise self._died() from None

    def _died(self) -> WorkerDied:
        code = self.process.wait() if self.process is not None else None
        self.process = None
        if code is not None and code < 0:
            name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
            why = f"killed by {name}" + (" (the kernel's out-of-memory killer sends SIGKILL)" if -code == 9 else "")
        else:
            why = f"exit code {code}"
        return WorkerDied(f"the reward's worker process ended without answering ({why})")

    def _kill(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        if process is not None:
            for stream in (process.stdin, process.stdout):
                try:
                    stream.close()
                except OSError:
                    pass

    def close(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        try:
            process.stdin.close()  # the child exits on end of input
            process.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            process.kill()
            process.wait()
        try:
            process.stdout.close()
        except OSError:
            pass

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _send(stream, message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def _receive(stream) -> Any:
    head = stream.read(8)
    if len(head) < 8:
        raise EOFError
    (length,) = struct.unpack("<Q", head)
    data = stream.read(length)
    if len(data) < length:
        raise EOFError
    return pickle.loads(data)


# -- the child ----------------------------------------------------------------------------------------------------


def _load(payload: tuple[str, Any]):
    kind, value = payload
    if kind == "reference":
        return load_function(value)
    return pickle.loads(value)


def _error_reply(error: BaseException) -> tuple:
    frames = traceback.extract_tb(error.__traceback__)
    where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    details = "".join(traceback.format_exception(type(error), error, error.__traceback__))[-4000:]
    return ("error", type(error).__name__, str(error), where, details)


def serve() -> None:
    """The child's loop: read a call, run the reward in this (main) thread, answer."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    requests = sys.stdin.buffer
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # what the reward prints must not enter the protocol
    reward, load_error = None, None
    while True:
        try:
            message = _receive(requests)
        except EOFError:
            return
        if message[0] == "init":
            try:
                reward = _load(message[1])
            except BaseException as e:  # reported on the first call
                load_error = e
            _send(replies, ("ready",))
            continue
        _, completions, columns, callbacks = message
        if load_error is not None:
            _send(replies, _error_reply(load_error))
            continue
        calls: list[tuple[str, tuple]] = []
        for name in callbacks:
            columns[name] = (lambda name: lambda *args: calls.append((name, args)))(name)
        try:
            scores = reward(completions, **columns)
            scores = None if scores is None else list(scores)
            pop = getattr(reward, "pop_counts", None)
            counts = pop() if callable(pop) else {}
            reply = ("ok", scores, counts, calls)
            pickle.dumps(reply)
        except BaseException as e:
            reply = _error_reply(e)
        _send(replies, reply)


if __name__ == "__main__":
    serve()
