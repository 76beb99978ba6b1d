"""The preference-loss registry and its one calling convention.

Every entry maps a batch of preference data to **per-example losses of shape (B,)**. Inputs are summed
log-probabilities of whole completions (shape (B,)); an entry whose paper averages over tokens divides by
`chosen_lengths` / `rejected_lengths` itself. Entries that need more (scores, per-token log-probs, K-response
lists) take further keyword tensors, named in their signature. A loss that couples the examples of a batch (a
batch-level β, a distributionally robust log-mean-exp) returns its batch loss at every position, so that the
mean over the batch is the paper's loss and its gradient.
"""

from __future__ import annotations

from typing import Any

from postrain.registry import Registry

# beta scales the implicit reward (or its margin) of every DPO-family loss: 0 or below makes no preference or the
# opposite one. cDPO's label smoothing is the probability that a label is flipped, at most 0.5 (TRL's docs).
PREFERENCE = Registry("preference", what="preference loss",
                      ranges={"beta": "> 0", "label_smoothing": "in [0, 0.5]", "desirable_weight": "> 0",
                              "undesirable_weight": "> 0"})


def data_names() -> set[str]:
    """Every data input some preference loss reads (a trainer may pass them all; each entry takes its own)."""
    return {name for variant in PREFERENCE for name in variant.data}


def preference_loss(name: str, **kwargs: Any):
    """Per-example losses (B,) of the registered preference loss `name`.

    Keyword arguments are data tensors (those the entry does not read are ignored, so a whole batch can be
    passed) and the entry's hyperparameters (unknown ones raise, naming the valid ones).
    """
    variant = PREFERENCE.get(name)
    known_data = data_names()
    data = {k: v for k, v in kwargs.items() if k in variant.data or k in known_data}
    params = {k: v for k, v in kwargs.items() if k not in data}
    return PREFERENCE.call(name, data, params)
