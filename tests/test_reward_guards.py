"""Rewards that never fail silently: NaN and inf are failures under the recipe's policy, every reward runs in a
worker process with wall-clock limits, the one-at-a-time retry is bounded, and code_exec stops programs that
reach for the network, write outside their folder, allocate past their limit or loop forever."""

from __future__ import annotations

import json
import math
import os
import textwrap
import time
from pathlib import Path

import pytest

from postrain.rewards import GuardedReward, RewardError, build_rewards
from postrain.rewards.code_exec import CodeExec, extract_program, parse_tests, same_output
from tests.conftest import TINY, read_jsonl, write_recipe


@pytest.fixture
def user_rewards(tmp_path):
    """A file of user reward functions that misbehave in the ways a reward can."""
    (tmp_path / "user_rewards.py").write_text(textwrap.dedent(
        """
        import os, signal, threading, time

        def nan_on_b(completions, **kwargs):
            return [float("nan") if c == "b" else 1.0 for c in completions]

        def inf_on_b(completions, **kwargs):
            return [float("inf") if c == "b" else 0.5 for c in completions]

        def sleeps_on_b(completions, **kwargs):
            if "b" in completions:
                time.sleep(60)
            return [1.0 for c in completions]

        def slow_and_failing(completions, **kwargs):
            time.sleep(0.4)
            raise RuntimeError("always")

        def dies(completions, **kwargs):
            if "b" in completions:
                os.kill(os.getpid(), signal.SIGKILL)
            return [1.0 for c in completions]

        def chatty(completions, log_metric, log_extra, **kwargs):
            print("a reward that prints does not break the protocol")
            log_metric("chatty/calls", 1.0)
            log_extra("chatty_seen", list(completions))
            return [float(threading.current_thread() is threading.main_thread()) for c in completions]

        def returns_text(completions, **kwargs):
            return ["high" for c in completions]

        def reads_the_step(completions, trainer_state, **kwargs):
            import sys
            assert "transformers" not in sys.modules, "the worker imported transformers"
            return [float(trainer_state.global_step) for c in completions]
        """))
    return lambda name: f"{tmp_path / 'user_rewards.py'}:{name}"


def guarded(reference, **policy) -> GuardedReward:
    (reward,), _ = build_rewards([{"fn": reference}], **policy)
    return reward


PROMPTS = ["first prompt", "second prompt", "third prompt"]


# -- NaN and inf ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn, value", [("nan_on_b", "nan"), ("inf_on_b", "inf")])
def test_non_finite_score_stops_the_run_under_fail_naming_reward_and_row(user_rewards, fn, value):
    reward = guarded(user_rewards(fn), on_error="fail")
    with pytest.raises(RewardError) as error:
        reward(["a", "b", "c"], prompts=PROMPTS)
    message = str(error.value)
    assert f"reward '{fn}'" in message and "completion 1 of 3" in message and "'second prompt'" in message
    assert value in message and "finite" in message


@pytest.mark.parametrize("fn, ok_score", [("nan_on_b", 1.0), ("inf_on_b", 0.5)])
def test_non_finite_score_is_scored_and_counted_under_score(user_rewards, fn, ok_score):
    reward = guarded(user_rewards(fn), on_error="score", error_score=-1.0)
    assert reward(["a", "b", "b", "c"]) == [ok_score, -1.0, -1.0, ok_score]
    counts = reward.pop_counts()
    assert counts["errors"] == 2 and counts["non_finite"] == 2 and counts["timeouts"] == 0
    assert reward.pop_counts()["errors"] == 0  # popped
    assert reward.errors == 2


def test_none_stays_no_reward(tmp_path):
    (tmp_path / "r.py").write_text("def none_for_b(completions, **kw):\n    return [None if c == 'b' else 1 for c in completions]\n")
    reward = guarded(f"{tmp_path / 'r.py'}:none_for_b", on_error="fail")
    assert reward(["a", "b"]) == [1.0, None]
    assert reward.pop_counts()["errors"] == 0


def test_a_score_that_is_not_a_number_is_a_failure(user_rewards):
    with pytest.raises(RewardError, match="returned str 'high'"):
        guarded(user_rewards("returns_text"))(["a"])


# -- wall-clock limits and the bounded retry ------------------------------------------------------------------------


def test_a_sleeping_reward_is_stopped_under_fail(user_rewards):
    reward = guarded(user_rewards("sleeps_on_b"), on_error="fail", timeout=1.0)
    start = time.monotonic()
    with pytest.raises(RewardError, match=r"reward 'sleeps_on_b' timed out: no scores for 2 completions within 1 s"):
        reward(["a", "b"])
    assert time.monotonic() - start < 10
    assert reward(["a", "c"]) == [1.0, 1.0]  # a new worker answers the next call


def test_a_sleeping_reward_is_scored_and_counted_under_score(user_rewards):
    reward = guarded(user_rewards("sleeps_on_b"), on_error="score", error_score=0.0, timeout=1.0,
                     completion_timeout=0.5)
    start = time.monotonic()
    assert reward(["a", "b", "c"]) == [1.0, 0.0, 1.0]  # only the sleeping completion fails
    assert time.monotonic() - start < 10
    counts = reward.pop_counts()
    assert counts["errors"] == 1
    assert counts["timeouts"] == 2  # the batch call, then the one completion


def test_the_one_at_a_time_retry_is_bounded(user_rewards):
    # 20 completions of a function that takes 0.4 s and always raises: once per completion would be 8 s; the
    # retry gets one more `timeout` (1 s) in all, the completions it does not reach are failed uncalled.
    reward = guarded(user_rewards("slow_and_failing"), on_error="score", error_score=-1.0, timeout=1.0,
                     completion_timeout=0.9)
    start = time.monotonic()
    scores = reward([str(i) for i in range(20)])
    elapsed = time.monotonic() - start
    assert scores == [-1.0] * 20
    assert elapsed < 4.0, elapsed  # a worker start and at most two 1 s budgets, with margin
    counts = reward.pop_counts()
    assert counts["errors"] == 20 and counts["timeouts"] >= 15  # most were never reached


def test_a_crashing_worker_is_a_failure_and_the_next_call_works(user_rewards):
    reward = guarded(user_rewards("dies"), on_error="fail")
    with pytest.raises(RewardError, match="crashed: .*killed by SIGKILL"):
        reward(["a", "b"])
    scored = guarded(user_rewards("dies"), on_error="score", error_score=0.0)
    assert scored(["a", "b", "c"]) == [1.0, 0.0, 1.0]
    assert scored.pop_counts()["errors"] == 1


def test_rewards_run_in_the_main_thread_of_a_worker_and_their_logs_come_back(user_rewards):
    reward = guarded(user_rewards("chatty"))
    metrics, extras = [], []
    scores = reward(["x", "y"], log_metric=lambda *a: metrics.append(a), log_extra=lambda *a: extras.append(a))
    assert scores == [1.0, 1.0]  # math-verify's SIGALRM timeouts need the main thread: a worker's is
    assert metrics == [("chatty/calls", 1.0)] and extras == [("chatty_seen", ["x", "y"])]
    assert reward._worker.process.pid != os.getpid()


def test_trainer_state_reaches_the_worker_as_its_fields_without_importing_transformers(user_rewards):
    """Unpickling TRL's TrainerState in the worker imported transformers and torch (4.6 s on 2 cores), once per run;
    its fields are sent instead and read the same way."""
    from transformers import TrainerState

    reward = guarded(user_rewards("reads_the_step"), on_error="fail")
    assert reward(["x", "y"], trainer_state=TrainerState(global_step=7)) == [7.0, 7.0]


def test_a_worker_started_ahead_of_the_first_call_answers_it(user_rewards):
    """The GRPO job starts each worker before it loads the model; the first call then waits for that child."""
    reward = guarded(user_rewards("inf_on_b"))
    reward.start()
    worker = reward._worker
    child = worker.process
    assert child is not None and child.pid != os.getpid() and not worker._ready
    assert reward(["x"]) == [0.5] and worker.process is child and worker.starts == 1
    reward.start()  # a live worker is kept
    assert worker.process is child and worker.starts == 1


def test_math_verify_runs_in_its_worker_with_its_own_timeout():
    (reward,), _ = build_rewards([{"name": "math_verify"}])
    assert reward(["\\boxed{\\frac{1}{2}}", "\\boxed{3}"], answer=["0.5", "4"]) == [1.0, 0.0]
    assert reward._worker is not None and reward._worker.process is not None


def test_limits_are_checked():
    from postrain.rewards import RewardSpecError

    with pytest.raises(RewardSpecError, match="reward_errors.timeout must be a number of seconds > 0"):
        build_rewards([{"name": "exact_match"}], timeout=0)
    with pytest.raises(RewardSpecError, match="completion_timeout"):
        build_rewards([{"name": "exact_match"}], completion_timeout=-1)


# -- code_exec -------------------------------------------------------------------------------------------------------


def program(body: str) -> str:
    return f"```python\n{body}\ndef add(a, b):\n    return a + b\n```"


ADD_TESTS = ["assert add(1, 2) == 3", "assert add(2, 2) == 4"]


@pytest.fixture(scope="module")
def code():
    return CodeExec(timeout_s=2.0, memory_mb=256)


@pytest.mark.parametrize("name, body, outcome", [
    ("opens a socket", "import socket\nsocket.socket()", "blocked"),
    ("opens a socket, catching the error", "import socket\ntry:\n    socket.socket()\nexcept Exception:\n    pass",
     "blocked"),
    ("resolves a name", "import socket\nsocket.getaddrinfo('example.com', 80)", "blocked"),
    ("writes outside its folder", "open({outside!r}, 'w').write('x')", "blocked"),
    ("writes outside through pathlib", "import pathlib\npathlib.Path({outside!r}).write_text('x')", "blocked"),
    ("writes outside through a symlink", "import os\nos.symlink({outside_dir!r}, 'l')\nopen('l/f', 'w').write('x')",
     "blocked"),
    ("removes a file outside", "import os\nos.remove({victim!r})", "blocked"),
    ("reads a file outside", "open('/etc/hostname').read()", "blocked"),
    ("allocates past its limit", "x = bytearray(1 << 30)", "memory_limit"),
    ("loops forever", "while True:\n    pass", "timeout"),
    ("sleeps forever", "import time\ntime.sleep(1000)", "timeout"),
    ("forks", "import os\nos.fork()", "blocked"),
    ("starts a process", "import subprocess\nsubprocess.run(['true'])", "blocked"),
    ("calls the C library", "import ctypes\nctypes.CDLL(None).getpid()", "blocked"),
    ("raises its limits", "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))", "blocked"),
    ("writes without end", "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", "output_limit"),
    ("exits before the tests", "import os\nos._exit(0)", "crash"),
    ("does not compile", "def broken(:", "error"),
])
def test_code_that_misbehaves_is_stopped_and_scored_as_failed(code, tmp_path, name, body, outcome):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    outside = tmp_path / "escaped.txt"
    text = program(body.format(outside=str(outside), outside_dir=str(tmp_path), victim=str(victim)))
    start = time.monotonic()
    scores = code([text], tests=[ADD_TESTS])
    assert scores == [0.0]
    assert code.pop_counts()[outcome] == 1, name
    assert not outside.exists() and not (tmp_path / "f").exists() and victim.read_text() == "keep me"
    assert time.monotonic() - start < 30


def test_code_exec_scores_asserts_and_stdio_and_counts_outcomes(code):
    stdio = {"inputs": ["3\n", "5\n"], "outputs": ["6\n", "10"]}
    completions = [
        program(""),                                          # passes both asserts
        "```python\ndef add(a, b):\n    return a - b\n```",   # fails them
        "```py\nprint(int(input()) * 2)\n```",                # stdin/stdout: passes both
        "```python\nprint(int(input()) * 3)\n```",            # wrong output
        "",                                                   # no program
    ]
    tests = [ADD_TESTS, ADD_TESTS, stdio, json.dumps(stdio), ADD_TESTS]
    assert code(completions, tests=tests) == [1.0, 0.0, 1.0, 0.0, 0.0]
    counts = code.pop_counts()
    assert (counts["passed"], counts["failed"], counts["no_code"]) == (2, 2, 1)
    fraction = CodeExec(score="fraction", timeout_s=2.0)
    half = "```python\ndef add(a, b):\n    return 3\n```"
    assert fraction([half], tests=[ADD_TESTS]) == [0.5]


def test_code_exec_environment_is_scrubbed(code, monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "do-not-leak")
    body = "import os\nassert 'SECRET_TOKEN' not in os.environ and os.getcwd() == os.environ['HOME']"
    assert code([program(body)], tests=[ADD_TESTS]) == [1.0]


def test_code_exec_helpers():
    assert extract_program("text\n```python\na = 1\n```\nmore\n```python\nb = 2\n```") == "b = 2\n"
    assert extract_program("```\nc = 3\n```") == "c = 3\n"
    assert extract_program("d = 4") == "d = 4"
    assert parse_tests(["assert f()"]) == ("asserts", ["assert f()"])
    assert parse_tests('{"inputs": ["1"], "outputs": ["2"]}') == ("stdio", [("1", "2")])
    with pytest.raises(ValueError, match="fn_name"):
        parse_tests({"inputs": [[1]], "outputs": [1], "fn_name": "f"})
    with pytest.raises(ValueError, match="same non-zero length"):
        parse_tests({"inputs": ["1"], "outputs": []})
    assert same_output("1 \n2\n\n", "1\n2") and not same_output("1\n2", "1\n3")


def test_code_exec_in_its_worker_reports_counts_through_the_guard():
    (reward,), _ = build_rewards([{"name": "code_exec", "args": {"timeout_s": 2}}], on_error="score")
    assert reward([program(""), "```python\nwhile True: pass\n```"], tests=[ADD_TESTS, ADD_TESTS]) == [1.0, 0.0]
    counts = reward.pop_counts()
    assert counts["passed"] == 1 and counts["timeout"] == 1 and counts["errors"] == 0
    assert set(reward.count_names) >= {"errors", "timeouts", "non_finite", "passed", "blocked", "memory_limit"}


# -- in a GRPO run ---------------------------------------------------------------------------------------------------


def grpo_recipe(tmp_path: Path, reward_fn: str, policy: str, extra: str = "") -> Path:
    return write_recipe(tmp_path / "grpo.yaml", f"""
        defaults: [base/grpo]
        name: guards
        model: {{name_or_path: tiny, dtype: float32, tiny: {json.dumps(TINY)}}}
        data: {{train: {{source: "builtin:arithmetic", task: {{n: 16, digits: 1}}}}}}
        rewards: [{{fn: "{reward_fn}"}}]
        reward_errors: {{policy: {policy}, score: 0.0{extra}}}
        trainer: {{max_steps: 2, per_device_train_batch_size: 4, num_generations: 2, max_completion_length: 4,
                  logging_steps: 1, learning_rate: 1.0e-3}}
        """.replace("\n        ", "\n"))


@pytest.fixture
def run_rewards(tmp_path):
    """User rewards for a GRPO run on built-in arithmetic: every second completion (by position) scores NaN or
    inf, or every call sleeps."""
    (tmp_path / "run_rewards.py").write_text(textwrap.dedent(
        """
        import time

        def nan_half(completions, **kwargs):
            return [float("nan") if i % 2 else 1.0 for i in range(len(completions))]

        def inf_half(completions, **kwargs):
            return [float("inf") if i % 2 else 1.0 for i in range(len(completions))]

        def sleepy(completions, **kwargs):
            time.sleep(30)
            return [1.0 for c in completions]
        """))
    return lambda name: f"{tmp_path / 'run_rewards.py'}:{name}"


@pytest.mark.slow
@pytest.mark.parametrize("fn", ["nan_half", "inf_half"])
def test_grpo_run_counts_non_finite_rewards_and_continues_under_score(tmp_path, run_rewards, fn):
    from typer.testing import CliRunner

    from postrain.cli import app

    path = grpo_recipe(tmp_path, run_rewards(fn), "score")
    result = CliRunner().invoke(app, ["grpo", str(path), f"output_dir={tmp_path / 'run'}"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    steps = [row for row in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in row]
    assert len(steps) == 2
    for row in steps:  # 4 completions a step, every second one non-finite
        assert row[f"rewards/{fn}/non_finite"] == 2 and row[f"rewards/{fn}/errors"] == 2
        assert math.isfinite(row["loss"]) and row[f"rewards/{fn}/mean"] == pytest.approx(0.5)
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "done"


@pytest.mark.slow
def test_grpo_run_stops_on_a_nan_reward_under_fail(tmp_path, run_rewards):
    from typer.testing import CliRunner

    from postrain.cli import app

    path = grpo_recipe(tmp_path, run_rewards("nan_half"), "fail")
    result = CliRunner().invoke(app, ["grpo", str(path), f"output_dir={tmp_path / 'run'}"])
    assert result.exit_code == 2, result.output
    assert "reward 'nan_half' scored completion 1 of 4" in result.output and "nan" in result.output
    assert "Traceback" not in result.output
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "failed"
    assert not (tmp_path / "run" / "model").exists()


@pytest.mark.slow
def test_grpo_run_counts_a_sleeping_reward_and_continues_under_score(tmp_path, run_rewards):
    from typer.testing import CliRunner

    from postrain.cli import app

    path = grpo_recipe(tmp_path, run_rewards("sleepy"), "score", ", timeout: 1, completion_timeout: 0.5")
    start = time.monotonic()
    result = CliRunner().invoke(app, ["grpo", str(path), f"output_dir={tmp_path / 'run'}"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert time.monotonic() - start < 120  # without limits: 30 s per call, the retry once per completion
    steps = [row for row in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in row]
    assert len(steps) == 2
    for row in steps:  # every completion failed: timed out, or not reached within the retry's budget
        assert row["rewards/sleepy/errors"] == 4 and row["rewards/sleepy/timeouts"] >= 3
        assert row["rewards/sleepy/mean"] == 0.0


def test_default_time_limits_leave_the_recipe_hash_unchanged():
    from postrain.jobs import load_recipe
    from postrain.recipes.loader import recipe_hash
    from tests.conftest import REPO

    recipe = load_recipe(str(REPO / "recipes/demo/grpo.yaml"))
    assert recipe.cfg["reward_errors"]["timeout"] == 300.0
    without = {**recipe.cfg, "reward_errors": {"policy": "fail", "score": 0.0}}  # a recipe resolved before them
    assert recipe.hash == recipe_hash(without)
    assert load_recipe(str(REPO / "recipes/demo/grpo.yaml"), ["reward_errors.timeout=5"]).hash != recipe.hash


def test_code_exec_is_registered_with_its_sources():
    from postrain.rewards import REWARDS

    source = REWARDS.get("code_exec").extra["source"]
    assert "2107.03374" in source and "2108.07732" in source and "2105.09938" in source
    assert REWARDS.get("llm_judge").extra["source"] and REWARDS.get("llm_judge").fn.runs_in_worker is False
