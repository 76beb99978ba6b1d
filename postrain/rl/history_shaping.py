"""Reward shaping that reads and returns a per-prompt history (catalog rows re-examined against the authors' code).

Same convention as postrain.rl.shaping, plus `state`: each row's prompt history before this batch (rows of a group
share it), and a stateful entry returns `(shaped rewards (N,), new_state (N, width))`. The GRPO trainer keeps the
state per prompt (postrain.trainers.grpo_state.PromptState, saved with checkpoints) for the entries that declare
`prompt_state=(width, first-visit value)`.
"""

from __future__ import annotations

import math

import torch

from postrain.errors import RecipeError
from postrain.rl.registry import SHAPING
from postrain.tensors import grouped, token_counts


@SHAPING.register(
    "hapo_length", paper="HAPO: Training Language Models to Reason Concisely via History-Aware Policy Optimization",
    arxiv="2505.11225", catalog="rl:31",
    prompt_state=(1, 0.0),  # the trainer keeps the prompt's history h per prompt, 0 before its first visit
    notes="checked against the authors' code, HCY123902/HAPO utils.py::compute_len_reward (cosine type) and "
          "grpo_trainer.py::combined_reward_func / HistroyTracker (mode 'min': the history is read before the "
          "batch and then lowered to the batch's shortest correct response), train_grpo.sh (w_lr 1.0, type_lr "
          "cosine). Differences: lengths are completion tokens (the authors re-tokenize the decoded text); the "
          "history is updated per group (the authors per prompt id across the batch: the same only when a prompt "
          "appears once per batch) and on training batches only (the authors' tracker also records evaluation "
          "prompts, in a separate index range); the 'linear' length reward, the 'mean' history mode and the "
          "repetition penalty (default 0 in the authors' script) are not registered")
def hapo_length(rewards, group_size, mask, state=None, *, w_lr: float = 1.0):
    """HAPO: r + w_lr · r_len, r_len from the prompt's history h (the shortest correct response seen so far).

    With L the completion's length: r_len = cos(π/2 · L/h) if L < 2h, else −1; then max(−0.7, r_len) for a
    correct completion (reward > 0) and min(0, r_len) for an incorrect one, so a correct answer shorter than h
    gains up to +1, a longer one loses at most 0.7, and an incorrect one is never rewarded for being short. A
    prompt with no correct response yet (h = 0, `state` None) gets r_len = 0. Returns (shaped rewards (N,),
    new_state (N, 1)): h lowered to the group's shortest correct completion (unchanged if none is correct).
    w_lr = 1.0 from the authors' script; it must lie in [0, 1] so that any correct response still outscores any
    incorrect one (their README). The correctness reward is the recipe's own (0 / 1 in the paper)."""
    if not 0.0 <= w_lr <= 1.0:
        raise RecipeError(f"hapo_length: w_lr must be in [0, 1] so that every correct response keeps a higher "
                          f"reward than every incorrect one (the authors' README), got {w_lr!r}")
    r = rewards.float()
    length = token_counts(mask).to(r.device)
    h = (torch.zeros_like(r) if state is None else torch.as_tensor(state).float().to(r.device).reshape(-1))
    correct = r > 0
    known = h > 0
    ratio = length / torch.where(known, h, torch.ones_like(h))
    cosine = torch.where(length < 2 * h, torch.cos(ratio * (math.pi / 2)), torch.full_like(r, -1.0))
    r_len = torch.where(correct, cosine.clamp(min=-0.7), cosine.clamp(max=0.0))
    r_len = torch.where(known, r_len, torch.zeros_like(r_len))
    # New history: min(h, shortest correct completion of the group); h = 0 stands for "none yet".
    big = torch.full_like(length, float("inf"))
    shortest = grouped(torch.where(correct, length, big), group_size).min(-1, keepdim=True).values
    shortest = shortest.expand(-1, int(group_size)).reshape(-1)
    old = torch.where(known, h, big)
    new_h = torch.minimum(old, shortest)
    new_h = torch.where(torch.isinf(new_h), torch.zeros_like(new_h), new_h)
    return r + w_lr * r_len, new_h.unsqueeze(-1)
