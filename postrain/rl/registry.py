"""The registries of online-RL parts, one per axis, each with one calling convention.

Shapes: N completions (num_prompts * group_size, each group's completions contiguous), T completion tokens.
  advantage    fn(rewards (N,), group_size, mask (N, T) | None, ...; *, params) -> (N,) or (N, T)
  policy_loss  fn(logps, old_logps, advantages, mask, ...; *, params) -> per-token loss (N, T) and a dict of
               per-token or scalar metrics; the aggregation entry turns it into one scalar
  aggregation  fn(per_token_loss (N, T), mask (N, T); *, params) -> scalar
  regularizer  fn(logps, ref_logps / entropies, mask, ...; *, params) -> per-token (N, T) penalty
  shaping      fn(rewards (N,), group_size, ...; *, params) -> shaped rewards (N,)
  sampler      fn(rewards (N,), group_size, ...; *, params) -> keep mask / weights over groups or completions
Every entry is a pure function over tensors: no trainer state, no I/O. State an entry carries across steps
(a momentum, a per-prompt tracker) goes in and out as explicit tensors.
"""

from __future__ import annotations

from postrain.registry import Registry

ADVANTAGES = Registry("advantage", what="advantage estimator")
POLICY_LOSSES = Registry("policy_loss", what="policy loss")
AGGREGATIONS = Registry("aggregation", what="loss aggregation")
REGULARIZERS = Registry("regularizer", what="regularizer")
SHAPING = Registry("shaping", what="reward shaping")
SAMPLERS = Registry("sampler", what="sampler")
