"""What the GRPO trainer's `rl:` path keeps between steps, and how it is saved beside each checkpoint.

`PromptState` is the one store of per-prompt history (an entry's `prompt_state`, GRESO's streaks) and of the
counters a resumed run needs to continue the same way (generations, refill batches, draw rounds). Prompts are keyed
by `prompt_key`: a hash of the prompt as the dataset gives it (its text, or its chat turns), not a dataset index,
because TRL hands the trainer rows without their index; a prompt that occurs twice in a dataset therefore shares
one history. The store is updated only from gathered (all-process) rewards, so it is identical on every process.

Beside each checkpoint (TRL's own pattern: its adaptive-entropy controller writes entropy_ctrl_state.json the same
way): the store as JSON (rl_state.json), recent_sample_recovery's groups carried to the next step (rl_buffer.pt)
and RePO's replay buffer (rl_replay.pt).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch
from accelerate.utils import gather_object

RL_STATE_FILE = "rl_state.json"
RL_BUFFER_FILE = "rl_buffer.pt"
REPLAY_FILE = "rl_replay.pt"


def prompt_key(prompt: Any) -> str:
    """A stable id for a prompt (str or list of chat turns): the first 16 hex digits of its sha256."""
    text = prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class PromptState:
    """Per-prompt rows by table (a table per stateful part), and named counters; JSON-serialisable."""

    def __init__(self) -> None:
        self.tables: dict[str, dict[str, list[float]]] = {}
        self.counters: dict[str, int] = {}

    def rows(self, table: str, keys: list[str], width: int, default: float) -> torch.Tensor:
        """(len(keys), width) float32: each key's row, `default` for a key never seen."""
        stored = self.tables.get(table, {})
        return torch.tensor([stored.get(k, [default] * width) for k in keys], dtype=torch.float32).view(-1, width)

    def update(self, table: str, keys: list[str], values: torch.Tensor) -> None:
        """Store each key's row (a key given twice keeps its last row)."""
        stored = self.tables.setdefault(table, {})
        for key, row in zip(keys, values.detach().float().cpu().tolist(), strict=True):
            stored[key] = row

    def count(self, name: str, by: int = 1) -> int:
        """Add `by` to counter `name`; its value before."""
        before = self.counters.get(name, 0)
        self.counters[name] = before + by
        return before

    def state_dict(self) -> dict[str, Any]:
        return {"tables": self.tables, "counters": self.counters}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tables = {t: {k: list(v) for k, v in rows.items()} for t, rows in state.get("tables", {}).items()}
        self.counters = dict(state.get("counters", {}))


def save(folder: str, state: PromptState, recovered: dict[str, Any] | None, replay: Any | None) -> None:
    """The store, the recovered groups (if any) and the replay buffer (if any: anything with `state_dict`) into
    the checkpoint folder."""
    with open(os.path.join(folder, RL_STATE_FILE), "w") as f:
        json.dump(state.state_dict(), f)
    if recovered is not None:
        torch.save(recovered, os.path.join(folder, RL_BUFFER_FILE))
    if replay is not None:
        torch.save(replay.state_dict(), os.path.join(folder, REPLAY_FILE))


def load(checkpoint: str, state: PromptState, replay: Any | None, device) -> dict[str, Any] | None:
    """Read what `save` wrote back into `state` and `replay` (files a checkpoint lacks leave them as they are);
    returns the recovered groups (None where there were none), on `device`."""
    path = os.path.join(checkpoint, RL_STATE_FILE)
    if os.path.exists(path):
        with open(path) as f:
            state.load_state_dict(json.load(f))
    path = os.path.join(checkpoint, REPLAY_FILE)
    if replay is not None and os.path.exists(path):
        replay.load_state_dict(torch.load(path, map_location="cpu"))
    path = os.path.join(checkpoint, RL_BUFFER_FILE)
    return torch.load(path, map_location=device) if os.path.exists(path) else None


def prompt_keys(parts, inputs: list[dict]) -> list[str] | None:
    """Every process' prompt ids, in gathered row order, where a part (postrain.rl.section.RLParts) keeps
    per-prompt state; None where none does."""
    if not parts.advantage.prompt_state and not any(p.prompt_state for p in parts.shaping):
        return None
    return gather_object([prompt_key(x.get("prompt")) for x in inputs])
