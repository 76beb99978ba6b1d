"""The commit a run records (status.json's environment) is read from the .git files; it must be what
`git rev-parse HEAD` prints, in every layout git keeps HEAD in."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from postrain.jobs.common import git_commit

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs the git command")


def git(cwd, *args) -> str:
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
           "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_NOSYSTEM": "1", "PATH": "/usr/bin:/bin:/usr/local/bin"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()


def test_the_recorded_commit_is_git_rev_parse_head_in_every_layout(tmp_path):
    repo = tmp_path / "repo"
    (repo / "sub").mkdir(parents=True)
    git(repo, "init", "-q", "-b", "main")
    (repo / "a.txt").write_text("a")
    git(repo, "add", "a.txt")
    git(repo, "commit", "-q", "-m", "first")
    first = git(repo, "rev-parse", "HEAD")
    assert git_commit(repo) == first and git_commit(repo / "sub") == first  # a loose branch ref, from a subfolder
    git(repo, "pack-refs", "--all")
    assert not (repo / ".git" / "refs" / "heads" / "main").exists()
    assert git_commit(repo) == first  # the ref only in packed-refs
    (repo / "a.txt").write_text("b")
    git(repo, "commit", "-q", "-am", "second")
    second = git(repo, "rev-parse", "HEAD")
    assert second != first and git_commit(repo) == second
    git(repo, "worktree", "add", "-q", "-b", "side", str(tmp_path / "side"), first)
    assert git_commit(tmp_path / "side") == first  # a linked worktree: .git is a file, branches in the main repo
    git(repo, "checkout", "-q", "--detach", first)
    assert git_commit(repo) == first  # a detached HEAD
    assert git_commit(tmp_path) is None  # outside any work tree
