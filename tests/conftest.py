"""Shared fixtures: an isolated model cache per test session, a clean working directory per test, tiny recipes.

Every test runs in a fresh directory laid out like the repository root (its sources, as links: `recipes/...` and
the recipes' own relative data paths resolve as they do for a user at the root) and holding nothing else: no
`runs/` a demo left, nothing an earlier test wrote. What the tests see does not depend on where pytest was started
or what that directory holds (`make demo` then `make test`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What a test's working directory holds: the repository's sources, never what runs wrote (runs/) or build outputs.
SOURCES = ("postrain", "recipes", "tests", "docs", "benchmarks", "README.md", "pyproject.toml", "Makefile")


def clean_workdir(folder: Path) -> Path:
    """`folder`, created with links to the repository's sources and nothing else."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in SOURCES:
        if (REPO / name).exists() and not (folder / name).exists():
            (folder / name).symlink_to(REPO / name)
    return folder


@pytest.fixture(scope="session", autouse=True)
def _postrain_env(tmp_path_factory):
    # One model cache per test run, never the user's ~/.cache: shared by the run's xdist workers (their base temp
    # directories sit side by side), so the pretrained model is converted once per run. Building either model is
    # safe when workers race (tiny: atomic rename; packaged: a file lock).
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    os.environ.setdefault("POSTRAIN_CACHE", str(shared / "postrain_cache"))
    os.environ["POSTRAIN_RECIPES"] = str(REPO / "recipes")
    os.environ.pop("POSTRAIN_SMOKE_MODEL", None)  # --smoke in the tests means the tiny model unless a test says so
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)  # tests run in parallel workers; one thread each avoids oversubscription
    cwd = os.getcwd()
    os.chdir(clean_workdir(base / "cwd"))  # module- and session-scoped fixtures run here
    yield
    os.chdir(cwd)


@pytest.fixture(autouse=True)
def _clean_cwd(tmp_path_factory, monkeypatch):
    """Each test starts in a directory of its own (see the module docstring)."""
    monkeypatch.chdir(clean_workdir(tmp_path_factory.mktemp("cwd")))


TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64}


def write_recipe(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def postrain(*args: str) -> str:
    """Run the CLI in-process; fail the test with the output when it exits non-zero."""
    from typer.testing import CliRunner

    from postrain.cli import app

    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def at_step(monkeypatch, trainer_cls: type, step: int, action) -> None:
    """Make `trainer_cls.compute_loss` pass its training loss through `action(loss) -> loss` while optimizer
    step `step` (1-based, as metrics.jsonl counts) is computed: a NaN injected there, a signal sent from inside
    training, ... whatever the step's position in a resumed run."""
    real = trainer_cls.compute_loss

    def compute_loss(self, model, inputs, *args, **kwargs):
        out = real(self, model, inputs, *args, **kwargs)
        if not model.training or self.state.global_step + 1 != step:
            return out
        return (action(out[0]), *out[1:]) if isinstance(out, tuple) else action(out)

    monkeypatch.setattr(trainer_cls, "compute_loss", compute_loss)


def read_jsonl(path: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def source_digest(reference: str) -> str:
    """sha256 of the source of `module:Qualified.name` (a library function postrain copies from or builds on):
    tests pin these so that a library change fails a test naming the postrain code to re-check."""
    import hashlib
    import importlib
    import inspect

    module, _, qualname = reference.partition(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()


def readme_example(heading: str) -> str:
    """The first ```python block of the README section `heading` (e.g. "### Adding a reward"): tests run the
    README's own examples, so that the documented way stays the working one."""
    import re

    text = (REPO / "README.md").read_text()
    section = text[text.index(f"\n{heading}\n"):]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
