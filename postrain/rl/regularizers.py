"""Regularizers (REGULARIZERS): per-token (N, T) penalties to ADD to the per-token policy loss before aggregation
(0 at padding), plus `kl_penalty`, the element-wise k1/k2/k3 KL estimators.

Exception: `high_entropy_tokens` returns a 0/1 (N, T) float mask to MULTIPLY into the per-token loss (it selects
tokens rather than penalising them; `selects_tokens=True` on the entry says so). Padding positions of logps / entropies may hold garbage; every entry removes
them with torch.where.
"""

from __future__ import annotations

import torch

from postrain.rl.registry import REGULARIZERS
from postrain.tensors import masked


def kl_penalty(estimator: str, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor | None = None):
    """Element-wise KL(pi || pi_ref) estimate from samples of pi (Schulman, "Approximating KL divergence", 2020).

    With d = ref_logps - logps (= log(pi_ref/pi)): k1 = -d, k2 = d^2 / 2, k3 = exp(d) - d - 1 (TRL's per-token KL,
    computed as expm1(d) - d). k3 overflows float32 only where its value does (d > 88.7).
    Computed in float32; positions where `mask` is 0 are returned as 0 (garbage there cannot leak)."""
    d = masked(ref_logps, mask) - masked(logps, mask)
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d**2
    if estimator == "k3":
        # expm1(d) − d, not exp(d) − d − 1: the same value, but at small gaps the latter cancels catastrophically in
        # float32 and goes negative (e.g. d = −5e-4 gives −6e-8), while k3 is >= 0 by construction.
        return torch.expm1(d) - d
    raise ValueError(f"unknown KL estimator {estimator!r}: valid: k1, k2, k3")


@REGULARIZERS.register(
    "kl_k1", paper="On the Design of KL-Regularized Policy Gradient Algorithms for LLM Reasoning", arxiv="2505.17508",
    catalog="rl:extra",
    notes="k1 from Schulman's KL-approximation note, analysed as a loss term in RPG (2505.17508). beta default is "
          "DeepSeekMath's 0.04 (no k1-specific default in the sources).")
def kl_k1(logps, ref_logps, mask, *, beta: float = 0.04):
    """beta * k1, k1 = log(pi / pi_ref): unbiased for KL(pi || pi_ref) but high variance, can be negative."""
    return beta * kl_penalty("k1", logps, ref_logps, mask)


@REGULARIZERS.register(
    "kl_k2", paper="On the Design of KL-Regularized Policy Gradient Algorithms for LLM Reasoning", arxiv="2505.17508",
    catalog="rl:extra",
    notes="k2 from Schulman's KL-approximation note; RPG (2505.17508, ICLR 2026 version in complex-reasoning/RPG) "
          "names it only as REINFORCE++'s estimator (App. A) and analyses k3; its own KL terms act against "
          "pi_old, not a reference model, and use beta 1e-4 (App. H). beta default is DeepSeekMath's 0.04.")
def kl_k2(logps, ref_logps, mask, *, beta: float = 0.04):
    """beta * k2, k2 = (log(pi / pi_ref))^2 / 2: biased, low variance, always >= 0."""
    return beta * kl_penalty("k2", logps, ref_logps, mask)


@REGULARIZERS.register(
    "kl_k3", paper="DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models",
    catalog="rl:1",
    arxiv="2402.03300", trl="beta",
    notes="GRPO's KL term; identical to TRL 1.16 per_token_kl * beta (without use_bias_correction_kl).")
def kl_k3(logps, ref_logps, mask, *, beta: float = 0.04):
    """beta * k3, k3 = pi_ref/pi - log(pi_ref/pi) - 1: unbiased for KL(pi || pi_ref), always >= 0 (GRPO, beta 0.04)."""
    return beta * kl_penalty("k3", logps, ref_logps, mask)


@REGULARIZERS.register(
    "entropy_bonus", paper="Proximal Policy Optimization Algorithms", arxiv="1707.06347",
    catalog="rl:extra",
    notes="c2 = 0.01 (PPO Atari setting). TRL's entropy_coef subtracts coef * token-mean entropy, which equals this "
          "entry under aggregation=token_mean.")
def entropy_bonus(entropies, mask, *, entropy_coef: float = 0.01):
    """-entropy_coef * H_t: rewards per-token entropy (exploration bonus; PPO's c2 = 0.01)."""
    return -entropy_coef * masked(entropies, mask)


@REGULARIZERS.register(
    "target_entropy", paper="Confucius3-Math: A Lightweight High-Performance Reasoning LLM for Chinese K-12 "
                             "Mathematics Learning", arxiv="2506.18330",
    catalog="rl:20",
    notes="Targeted Entropy Regularization, paper sec. 6.1: loss += coef |H - H_target|, H_target 0.55, coef 0.001 "
          "(from the method catalog, confidence 'paper').")
def target_entropy(entropies, mask, mean_entropy=None, *, entropy_target: float = 0.55, entropy_coef: float = 0.001):
    """Two-sided entropy target: penalty_t = coef * s * (H_t - H_target), s = sign(H_bar - H_target) (detached).

    Its token mean is exactly coef * |H_bar - H_target| with the same gradient (H_bar = token mean of H over the
    mask): pushes entropy down when above the target and up when below. Exact under aggregation=token_mean;
    pass `mean_entropy` (the token mean over all processes) when rows are split over processes."""
    h = masked(entropies, mask)
    if mean_entropy is None:
        mean_entropy = h.sum() / mask.float().sum().clamp(min=1.0)
    sign = torch.sign(torch.as_tensor(mean_entropy, dtype=torch.float32) - entropy_target).detach()
    return masked(entropy_coef * sign * (h - entropy_target), mask)


@REGULARIZERS.register(
    "high_entropy_tokens", paper="Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive Effective "
                                  "Reinforcement Learning for LLM Reasoning", arxiv="2506.01939",
    catalog="rl:trl",
    trl="top_entropy_quantile",
    selects_tokens=True,  # the trainer multiplies the policy loss by it, before any penalty is added
    notes="checked against TRL 1.16 GRPOTrainer.get_high_entropy_mask (quantile over all valid tokens, >=). "
          "Returns a mask to multiply into the per-token loss, not a penalty.")
def high_entropy_tokens(entropies, mask, all_entropies=None, *, top_entropy_quantile: float = 0.2):
    """Keep only the top-rho entropy tokens: 1.0 where H_t >= quantile_{1-rho}(H over valid tokens), else 0.

    A MASK to multiply into the per-token loss (rho = 20% in the paper). The threshold comes from this batch's
    valid tokens, or from `all_entropies` (1-D, the valid entropies of all processes) when rows are split."""
    valid = mask.bool()
    pool = entropies.float()[valid] if all_entropies is None else all_entropies.float().reshape(-1)
    if pool.numel() == 0:
        return torch.zeros_like(mask, dtype=torch.float32)
    threshold = torch.quantile(pool, 1.0 - top_entropy_quantile)
    keep = valid & (torch.where(valid, entropies.float(), torch.full((), -1.0, device=mask.device)) >= threshold)
    return keep.float().detach()
