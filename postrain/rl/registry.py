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

# Ranges every entry of a family obeys when it has the parameter (refused at load time otherwise): a clip range
# [1 - epsilon, 1 + epsilon_high] with a non-positive width clips every ratio, and dual-clip's bound c must exceed 1
# (Ye et al. 2020, arXiv 1912.09729: c > 1); a KL or entropy coefficient below 0 rewards the opposite.
ADVANTAGES = Registry("advantage", what="advantage estimator")
POLICY_LOSSES = Registry("policy_loss", what="policy loss",
                         ranges={"epsilon": "> 0", "epsilon_high": "> 0", "dual_clip_c": "> 1"})
AGGREGATIONS = Registry("aggregation", what="loss aggregation")
REGULARIZERS = Registry("regularizer", what="regularizer", ranges={"beta": ">= 0", "entropy_coef": ">= 0"})
SHAPING = Registry("shaping", what="reward shaping")
SAMPLERS = Registry("sampler", what="sampler")  # max_num_gen_batches (0: no limit): postrain.rl.section checks it
