"""Tensor helpers every registry entry shares: float32 views, padding that cannot leak, per-row means, groups.

Padding positions of log-probs or entropies may hold anything, nan and inf included; `masked` removes them with
torch.where, because 0 * nan is nan and so is the gradient of a product with a nan factor.
"""

from __future__ import annotations

import torch


def as_float(x) -> torch.Tensor:
    """`x` as a float32 tensor (entries compute in float32 whatever the input dtype)."""
    return torch.as_tensor(x).float()


def masked(x, mask=None) -> torch.Tensor:
    """float32 `x` with the positions where `mask` is 0 set to 0; `mask=None` keeps everything."""
    x = as_float(x)
    if mask is None:
        return x
    keep = torch.as_tensor(mask).to(x.device).bool()
    return torch.where(keep, x, torch.zeros((), device=x.device))


def token_counts(mask) -> torch.Tensor:
    """Valid tokens per row of an (N, T) mask."""
    return torch.as_tensor(mask).float().sum(-1)


def masked_row_mean(x, mask) -> torch.Tensor:
    """Per-row mean of `x` over the valid tokens of `mask`; an empty row gives 0."""
    return masked(x, mask).sum(-1) / token_counts(mask).to(torch.as_tensor(x).device).clamp(min=1.0)


def grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Rows (N, ...) as (N / group_size, group_size, ...); each group's completions are contiguous."""
    if int(group_size) < 1 or x.shape[0] % int(group_size):
        raise ValueError(f"{x.shape[0]} rows do not split into groups of group_size={group_size}")
    return x.reshape(-1, int(group_size), *x.shape[1:])
