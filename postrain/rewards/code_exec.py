"""`code_exec`: run the program a completion writes against the row's tests, in a limited subprocess.

Tests, per row, from the dataset column `tests_column` (default `tests`), in either of two common conventions:

- a list of Python statements, usually asserts, run after the program in its namespace (MBPP's `test_list`,
  arXiv 2108.07732: map it with `columns: {tests: test_list}`; code run before the program through
  `setup_column`, text or a list of statements, e.g. MBPP's `test_imports`);
- a mapping, or its JSON text, `{"inputs": [...], "outputs": [...]}`: the program is run once per input on its
  standard input and its standard output compared with the output (APPS' `input_output`, arXiv 2105.09938, as
  TACO, CodeContests conversions and verl's prime_code read it). Call-based APPS problems (`fn_name`) are refused.

The program is the completion's last ```python (or ```py, or plain ```) fenced block, else the whole completion.
Score: `all` (default, as verl's prime_code and DeepCoder score): 1.0 when every test passes, else 0.0;
`fraction`: the fraction of tests passed (open-r1's code reward). Outputs compare line by line, trailing whitespace
and trailing blank lines ignored.

Each run is `python -I -B code_sandbox.py` (postrain.rewards.code_sandbox) in a fresh temporary folder, removed
afterwards, with an environment holding only PATH, HOME and TMPDIR (that folder), the locale and one thread for
numeric libraries; standard input is the test's input (or empty), standard output goes to a file outside the
folder, read afterwards. The limits, from human-eval's `reliability_guard` (OpenAI, arXiv 2107.03374) as verl's
prime_code runs it, made stricter:

- wall clock (`timeout_s`, default 10 s per run, verl prime_code's and SandboxFusion's 10 s): the process group is
  killed; CPU seconds (`cpu_time_s`, default the same), RLIMIT_CPU;
- memory (`memory_mb`, default 1024): RLIMIT_AS, the address space, so a large allocation fails (MemoryError);
- every file the program writes, its standard output included (`file_size_mb`, default 16): RLIMIT_FSIZE;
- no network: creating a socket or resolving a name is refused;
- no processes: fork, exec, spawn, subprocess, os.system, signals to other processes are refused;
- no writes outside the folder, and no reads outside it except the interpreter's own folders (what `import`
  needs): refused; ctypes is refused (it could call the C library past the other rules).

What is refused ends the run, which scores 0 and counts as `blocked`. The guard is a PEP 578 audit hook in the
program's own interpreter: it stops Python code, also code that catches exceptions, but it is not an operating
system boundary. NOT isolated: there is no network or filesystem namespace (unshare, seccomp and containers are
not used, so a C extension already installed in site-packages, or an exploit of the interpreter, can do what its
user can); the program runs as the training process' user and sees the machine's process list and clock;
reading the interpreter's own folders is allowed; and the program shares its interpreter with the test harness,
so a program written to attack the harness (walking its frames to forge a result) could fake a pass on assert
tests (stdin/stdout tests are compared in the parent, out of its reach). For untrusted code at scale, run a
sandbox service (SandboxFusion, E2B) behind a user reward function.

Per call, each completion's outcome is counted (logged by the GRPO trainer as `rewards/code_exec/<outcome>`):
`passed` (every test), `failed` (a test failed or printed the wrong output), `error` (the program raised or does
not compile), `timeout` (wall clock or CPU), `memory_limit`, `output_limit` (a file or the output grew past
file_size_mb), `blocked` (refused by the guard), `crash` (killed otherwise, or ended without reporting), `no_code`
(an empty program). A completion counts once, by its first test that did not pass.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from postrain.errors import DataError

from postrain.rewards.registry import REWARDS, RewardFunction, RewardSpecError, completion_text, missing_column_message

HARNESS = Path(__file__).with_name("code_sandbox.py")
BLOCKED_EXIT, MEMORY_EXIT = 86, 87  # the harness' exit codes (postrain.rewards.code_sandbox)
OUTCOMES = ("passed", "failed", "error", "timeout", "memory_limit", "output_limit", "blocked", "crash", "no_code")
# The outcome a completion counts as when its tests end differently: the first that is not a pass, by run order.
_FENCE = re.compile(r"```(python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_SCORES = ("all", "fraction")


def extract_program(text: str) -> str:
    """The last ```python / ```py fenced block, else the last plain ``` block, else the whole text."""
    blocks = _FENCE.findall(text)
    tagged = [code for language, code in blocks if language]
    if tagged:
        return tagged[-1]
    if blocks:
        return blocks[-1][1]
    return text


def parse_tests(value: Any) -> tuple[str, Any]:
    """("asserts", [statements]) or ("stdio", [(input, output), ...]) from one row's tests; ValueError otherwise."""
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.startswith("{"):
            try:
                value = json.loads(stripped)
            except json.JSONDecodeError as e:
                raise ValueError(f"tests text that starts with '{{' must be JSON ({e})") from None
        else:
            return "asserts", [value]
    if isinstance(value, dict):
        if value.get("fn_name"):
            raise ValueError("call-based tests (fn_name) are not supported; give stdin/stdout pairs or asserts")
        inputs, outputs = value.get("inputs"), value.get("outputs")
        if not isinstance(inputs, list) or not isinstance(outputs, list) or len(inputs) != len(outputs) or not inputs:
            raise ValueError("stdin/stdout tests need 'inputs' and 'outputs', two lists of the same non-zero length")
        return "stdio", [(_as_text(i), _as_text(o)) for i, o in zip(inputs, outputs)]
    if isinstance(value, (list, tuple)) and value and all(isinstance(t, str) for t in value):
        return "asserts", list(value)
    raise ValueError(f"tests must be a list of Python statements or {{inputs, outputs}}, got {type(value).__name__}")


def _setup_text(value: Any) -> str:
    """A row's setup code: text, or a list of statements (MBPP's test_imports) joined by lines."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return "\n".join(map(str, value))
    return str(value)


def _as_text(value: Any) -> str:
    if isinstance(value, list):
        return "\n".join(map(str, value))
    return str(value)


def same_output(actual: str, expected: str) -> bool:
    """Line by line, trailing whitespace of each line and trailing blank lines ignored."""
    def lines(text: str) -> list[str]:
        out = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
        while out and not out[-1]:
            out.pop()
        return out

    return lines(actual) == lines(expected)


@REWARDS.register("code_exec", paper="Evaluating Large Language Models Trained on Code", arxiv="2107.03374",
                  source="human-eval execution.py reliability_guard (arXiv 2107.03374), as verl's prime_code runs "
                         "it; tests as MBPP's test_list (arXiv 2108.07732) or APPS' input_output (arXiv 2105.09938)")
class CodeExec(RewardFunction):
    """Scores the program of each completion by running it against its row's tests (see the module docstring for
    the conventions, limits and what is and is not isolated)."""

    count_names = OUTCOMES

    def __init__(self, *, tests_column: str = "tests", setup_column: str | None = None, score: str = "all",
                 timeout_s: float = 10.0, cpu_time_s: float | None = None, memory_mb: int = 1024,
                 file_size_mb: int = 16, parallel: int = 4, python: str | None = None):
        super().__init__()
        if score not in _SCORES:
            raise RewardSpecError(f"score must be one of {', '.join(_SCORES)}, got {score!r}")
        for key, value, low in (("timeout_s", timeout_s, 0), ("memory_mb", memory_mb, 16),
                                ("file_size_mb", file_size_mb, 0), ("parallel", parallel, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > low:
                raise RewardSpecError(f"{key} must be a number > {low}, got {value!r}")
        if cpu_time_s is not None and (isinstance(cpu_time_s, bool) or not isinstance(cpu_time_s, (int, float))
                                       or not cpu_time_s > 0):
            raise RewardSpecError(f"cpu_time_s must be a number > 0 (or null: timeout_s), got {cpu_time_s!r}")
        self.tests_column, self.setup_column = tests_column, setup_column
        self.columns = (tests_column,) + ((setup_column,) if setup_column else ())
        self.score, self.timeout_s, self.parallel = score, float(timeout_s), int(parallel)
        self.limits = {"cpu_seconds": float(cpu_time_s or timeout_s), "memory_bytes": int(memory_mb) << 20,
                       "file_bytes": int(file_size_mb) << 20}
        self.python = python or sys.executable
        self._counts = dict.fromkeys(OUTCOMES, 0)
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def check_values(self, dataset, where: str) -> None:
        """Each row's tests in a form code_exec runs, checked when the data loads (a DataError naming the row)."""

        for index, value in enumerate(dataset[self.tests_column]):
            try:
                parse_tests(value)
            except ValueError as e:
                raise DataError(f"{where}, row {index}, column {self.tests_column!r} (reward {self.name!r}): {e}") \
                    from None

    def pop_counts(self) -> dict[str, int]:
        with self._lock:
            counts, self._counts = self._counts, dict.fromkeys(OUTCOMES, 0)
        return counts

    def __call__(self, completions: list, **columns: Any) -> list[float]:
        if self.tests_column not in columns:
            available = sorted(key for key, value in columns.items() if isinstance(value, (list, tuple)))
            raise ValueError(missing_column_message(self.name, self.tests_column, available))
        tests = columns[self.tests_column]
        setups = columns.get(self.setup_column) if self.setup_column else None
        if len(tests) != len(completions):
            raise ValueError(f"column {self.tests_column!r} has {len(tests)} values for {len(completions)} completions")
        parsed = [parse_tests(value) for value in tests]  # a malformed row raises: the error policy decides
        jobs = [(extract_program(completion_text(c)), mode, cases, _setup_text(setups[i] if setups else None))
                for i, (c, (mode, cases)) in enumerate(zip(completions, parsed))]
        with ThreadPoolExecutor(max_workers=min(self.parallel, len(jobs)) or 1) as pool:
            results = list(pool.map(lambda job: self.run_program(*job), jobs))
        with self._lock:
            for outcome, _ in results:
                self._counts[outcome] += 1
        return [fraction if self.score == "fraction" else float(outcome == "passed") for outcome, fraction in results]

    # -- one program ----------------------------------------------------------------------------------------------

    def run_program(self, program: str, mode: str, cases: list, setup: str = "") -> tuple[str, float]:
        """(outcome, fraction of tests passed) of one program on its tests."""
        if not program.strip():
            return "no_code", 0.0
        if mode == "asserts":
            outcome, passed = self._run_once(program, "asserts", cases, setup, stdin="")
            return outcome, passed / len(cases)
        passed, first_failure = 0, None
        for given, expected in cases:
            outcome, output = self._run_once(program, "stdio", [], setup, stdin=given)
            if outcome == "passed" and not same_output(output, expected):
                outcome = "failed"
            if outcome == "passed":
                passed += 1
            elif first_failure is None:
                first_failure = outcome
                if self.score == "all":  # the score is 0 already: the remaining runs cannot change it
                    break
        return first_failure or "passed", passed / len(cases)

    def _run_once(self, program: str, mode: str, tests: list, setup: str, stdin: str) -> tuple[str, Any]:
        """One harness run. asserts: (outcome, tests passed); stdio: (outcome, standard output)."""
        scratch = Path(tempfile.mkdtemp(prefix="postrain-code-"))
        try:
            workdir = scratch / "work"
            workdir.mkdir()
            (workdir / "solution.py").write_text(program, encoding="utf-8")
            nonce = secrets.token_hex(16)
            config = json.dumps({"nonce": nonce, "mode": mode, "tests": tests, "setup": setup,
                                 "limits": self.limits})
            config_read, config_write = os.pipe()
            result_read, result_write = os.pipe()
            output_path = scratch / "stdout"
            env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(workdir), "TMPDIR": str(workdir),
                   "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                   "MKL_NUM_THREADS": "1"}
            with open(output_path, "wb") as output, tempfile.TemporaryFile() as given:
                given.write(stdin.encode("utf-8"))
                given.seek(0)
                try:
                    process = subprocess.Popen(
                        [self.python, "-I", "-B", str(HARNESS), str(config_read), str(result_write)],
                        cwd=workdir, env=env, stdin=given, stdout=output, stderr=subprocess.DEVNULL,
                        pass_fds=(config_read, result_write), start_new_session=True)
                finally:
                    os.close(config_read)
                    os.close(result_write)
                with os.fdopen(config_write, "w", encoding="utf-8") as f:
                    f.write(config)
                lines: list[str] = []
                reader = threading.Thread(target=_read_lines, args=(result_read, lines), daemon=True)
                reader.start()
                timed_out = False
                try:
                    code = process.wait(timeout=self.timeout_s)
                except subprocess.TimeoutExpired:
                    timed_out = True
                    _kill_group(process)  # before the process is reaped: its group id cannot be reused yet
                    code = process.wait()
                reader.join(timeout=5)
            records = [r for r in (_json(line) for line in lines) if isinstance(r, dict) and r.get("nonce") == nonce]
            outcome = _outcome(code, timed_out, records)
            if mode == "asserts":
                passed = sum(1 for r in records if r.get("ok") is True)
                return outcome if outcome != "passed" or passed == len(tests) else "failed", passed
            output = output_path.read_bytes()[: self.limits["file_bytes"]].decode("utf-8", errors="replace")
            return outcome, output
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def _outcome(code: int, timed_out: bool, records: list[dict]) -> str:
    done = next((r for r in records if r.get("done")), None)
    if timed_out or code in (-signal.SIGXCPU, -signal.SIGKILL) and done is None:
        return "timeout"
    if any("blocked" in r for r in records) or code == BLOCKED_EXIT:
        return "blocked"
    if code == MEMORY_EXIT or (done is not None and done.get("memory")):
        return "memory_limit"
    if code == -signal.SIGXFSZ or (done is not None and done.get("output_limit")):
        return "output_limit"
    if done is None:
        return "crash"
    if done.get("error"):
        return "error"
    if any(r.get("ok") is False for r in records):
        return "failed"
    return "passed" if code == 0 else "crash"


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_lines(fd: int, lines: list[str]) -> None:
    with os.fdopen(fd, "r", encoding="utf-8", errors="replace") as f:
        for line in f:
            if len(lines) < 100_000:
                lines.append(line)


def _json(line: str) -> Any:
    try:
        return json.loads(line)
    except ValueError:
        return None
