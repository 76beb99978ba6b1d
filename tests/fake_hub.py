"""A FAKE huggingface_hub.HfApi for the push tests: no network, no token. It records every call and, at upload
time, the files of the uploaded folder (what the hub would have received)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace


class RepoUrl(str):
    repo_id: str


class FakeHfApi:
    calls: list[tuple[str, dict]] = []
    existing_public: set[str] = set()  # repositories that exist and are public
    fail_upload: Exception | None = None
    namespace = "fake-user"  # a repo id without a namespace is the logged-in user's

    def __init__(self, *args, **kwargs):
        pass

    @classmethod
    def reset(cls) -> None:
        cls.calls, cls.existing_public, cls.fail_upload = [], set(), None

    def _full(self, repo_id: str) -> str:
        return repo_id if "/" in repo_id else f"{self.namespace}/{repo_id}"

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        url = RepoUrl(f"https://hub.fake/{self._full(repo_id)}")  # huggingface_hub's RepoUrl is a str too
        url.repo_id = self._full(repo_id)
        return url

    def repo_info(self, repo_id, **kwargs):
        self.calls.append(("repo_info", {"repo_id": repo_id, **kwargs}))
        return SimpleNamespace(private=repo_id not in self.existing_public)

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        self.calls.append(("upload_folder", {**kwargs, "files": files}))
        if self.fail_upload is not None:
            raise self.fail_upload
        return SimpleNamespace(oid="0123abc", commit_url=f"https://hub.fake/{kwargs['repo_id']}/commit/0123abc")


def calls_named(name: str) -> list[dict]:
    return [kwargs for called, kwargs in FakeHfApi.calls if called == name]
