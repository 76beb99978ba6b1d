"""What the GRPO trainer's samplers and stateful advantages keep between steps, and how batches are pooled.

`PromptState` is the one store of per-prompt history (and of the counters a resumed run needs to continue the
same way). Prompts are keyed by `prompt_key`: a hash of the prompt as the dataset gives it (its text, or its chat
turns), not a dataset index, because TRL hands the trainer rows without their index; a prompt that occurs twice
in a dataset therefore shares one history. The store is updated only from gathered (all-process) rewards, so it is
identical on every process; the trainer writes it into each checkpoint as JSON and reads it back on resume.

A pooled batch is a dict of per-row tensors of the whole generation batch (every process' rows, gathered): prompt
columns left-padded, completion columns right-padded, as TRL pads them.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

# Columns TRL left-pads (prompts); every other per-row column is right-padded.
LEFT_PADDED = frozenset({"prompt_ids", "prompt_mask"})


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


def pad_columns(x: torch.Tensor, width: int, *, left: bool, value: float) -> torch.Tensor:
    """(N, T, ...) -> (N, width, ...), padding on the left or the right with `value`."""
    extra = width - x.size(1)
    if extra <= 0:
        return x
    pad = torch.full((x.size(0), extra, *x.shape[2:]), value, dtype=x.dtype, device=x.device)
    return torch.cat([pad, x] if left else [x, pad], dim=1)


def cat_batches(batches: list[dict[str, torch.Tensor]], pad_values: dict[str, float]) -> dict[str, torch.Tensor]:
    """Pooled batches with the same columns, one after the other; 2-D+ columns padded to the widest."""
    keys = batches[0].keys()
    for b in batches[1:]:
        if b.keys() != keys:
            raise RuntimeError(f"generation rounds returned different columns: {sorted(keys)} vs {sorted(b.keys())}")
    out = {}
    for key in keys:
        parts = [b[key] for b in batches]
        if parts[0].dim() >= 2:
            width = max(p.size(1) for p in parts)
            parts = [pad_columns(p, width, left=key in LEFT_PADDED, value=pad_values.get(key, 0)) for p in parts]
        out[key] = torch.cat(parts, dim=0)
    return out


def take_rows(batch: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[index.to(v.device)] for k, v in batch.items()}


def group_rows(groups: torch.Tensor, group_size: int) -> torch.Tensor:
    """Row indices of the given group indices, each group's rows contiguous, in the order of `groups`."""
    return (groups.view(-1, 1) * group_size + torch.arange(group_size, device=groups.device)).view(-1)
