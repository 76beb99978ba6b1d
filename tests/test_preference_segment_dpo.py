"""SDPO (`sdpo_segment`) against a reference written from the authors' LLaMA-Factory code, token by token.

The authors (AlibabaResearch/DAMO-ConvAI SDPO/LLaMA-Factory) tokenize each conversation of a pair as an SFT
example, with labels on the agent's ("gpt") tokens and -100 on the partner's ("human"); sft_2_dialogue_dpo then
finds the first position where the two label rows differ, walks back to the start of that agent turn and sets every
label before it to -100 in both rows; the loss is TRL's sigmoid DPO on the log-probs summed over the labelled
tokens. The reference below does exactly that on per-token log-probs of two whole conversations; the entry gets
per-turn sums of the segments' agent turns, as postrain's DPO trainer hands them over.
"""

import math

import torch

from postrain.preference import PREFERENCE, preference_loss

IGNORE = -100


def _conversation(g, turns, start_id):
    """Tokens of a dialogue: (role, token id, policy log-prob, reference log-prob) per token; turns: (role, length).
    Ids count up from start_id, so two conversations share ids exactly where they share tokens."""
    tokens, next_id = [], start_id
    for role, length in turns:
        for _ in range(length):
            logp = -6 * torch.rand((), generator=g, dtype=torch.float64).item()
            ref = -6 * torch.rand((), generator=g, dtype=torch.float64).item()
            tokens.append((role, next_id, logp, ref))
            next_id += 1
    return tokens


def _authors_labels(conversation):
    return [token_id if role == "gpt" else IGNORE for role, token_id, _, _ in conversation]


def _authors_segment_masking(labels_w, labels_l):
    """sft_2_dialogue_dpo: the first differing label, back to its turn's start; labels before it become -100."""
    pos = next(i for i, (a, b) in enumerate(zip(labels_w, labels_l)) if a != b)
    assert labels_w[pos] != IGNORE and labels_l[pos] != IGNORE  # the segments start at an agent turn
    while labels_w[pos] != IGNORE:
        pos -= 1
    return [IGNORE] * pos + labels_w[pos:], [IGNORE] * pos + labels_l[pos:]


def _oracle(chosen, rejected, beta):
    labels_w, labels_l = _authors_segment_masking(_authors_labels(chosen), _authors_labels(rejected))
    logratio = {}
    for side, conversation, labels in (("w", chosen, labels_w), ("l", rejected, labels_l)):
        policy = sum(t[2] for t, label in zip(conversation, labels) if label != IGNORE)
        reference = sum(t[3] for t, label in zip(conversation, labels) if label != IGNORE)
        logratio[side] = policy - reference
    return -math.log(1 / (1 + math.exp(-beta * (logratio["w"] - logratio["l"]))))


def _agent_turn_sums(conversation, history_length):
    """Per agent-turn sums of the segment (the tokens after the shared history), as postrain's trainer gives them."""
    turns, previous_role = [], None
    for role, _, logp, ref in conversation[history_length:]:
        if role == "gpt":
            if previous_role != "gpt":
                turns.append([0.0, 0.0])
            turns[-1][0] += logp
            turns[-1][1] += ref
        previous_role = role
    return turns


# Shared history (human, gpt, human), then the segments: the chosen has 2 agent turns, the rejected 3; a pair whose
# segments are one agent turn each; a pair whose history is a single human turn.
PAIRS = [
    ([("human", 4), ("gpt", 3), ("human", 2)], [("gpt", 3), ("human", 2), ("gpt", 4)],
     [("gpt", 2), ("human", 3), ("gpt", 1), ("human", 2), ("gpt", 5)]),
    ([("human", 2), ("gpt", 2), ("human", 2), ("gpt", 1), ("human", 1)], [("gpt", 6)], [("gpt", 2)]),
    ([("human", 5)], [("gpt", 1), ("human", 4), ("gpt", 2), ("human", 1), ("gpt", 3)], [("gpt", 4), ("human", 2),
                                                                                       ("gpt", 2)]),
]


def _batch(g):
    """Whole conversations for the reference and per-turn tensors (B, J) for the entry, nan in padding turns."""
    conversations, sums = [], {"chosen": [], "rejected": []}
    for history_turns, chosen_turns, rejected_turns in PAIRS:
        history = _conversation(g, history_turns, 0)
        n = len(history)
        chosen = history + _conversation(g, chosen_turns, 1000)
        rejected = history + _conversation(g, rejected_turns, 2000)
        conversations.append((chosen, rejected))
        sums["chosen"].append(_agent_turn_sums(chosen, n))
        sums["rejected"].append(_agent_turn_sums(rejected, n))
    width = max(len(t) for side in sums.values() for t in side)
    batch = {}
    for side, rows in sums.items():
        pad = [[float("nan"), float("nan")]] * width
        full = [row + pad[:width - len(row)] for row in rows]
        batch[f"{side}_turn_logps"] = torch.tensor([[t[0] for t in row] for row in full])
        batch[f"ref_{side}_turn_logps"] = torch.tensor([[t[1] for t in row] for row in full])
        batch[f"{side}_turn_mask"] = torch.tensor([[1.0] * len(row) + [0.0] * (width - len(row)) for row in rows])
    return conversations, batch


def test_sdpo_segment_matches_the_authors_label_masking_and_dpo():
    g = torch.Generator().manual_seed(11)
    for _ in range(3):
        conversations, batch = _batch(g)
        for beta in (0.1, 1.0):
            losses = preference_loss("sdpo_segment", **batch, beta=beta)
            expected = torch.tensor([_oracle(w, l, beta) for w, l in conversations], dtype=torch.float64)
            torch.testing.assert_close(losses.double(), expected, rtol=1e-5, atol=1e-6)


def test_one_turn_segments_are_plain_dpo_and_the_gradient_raises_the_chosen_turns():
    chosen = torch.tensor([[-3.0, -4.0], [-2.0, float("nan")]], requires_grad=True)
    batch = {"chosen_turn_logps": chosen, "ref_chosen_turn_logps": torch.tensor([[-3.5, -4.5], [-2.5, 0.0]]),
             "rejected_turn_logps": torch.tensor([[-6.0, float("inf")], [-1.0, -1.0]]),
             "ref_rejected_turn_logps": torch.tensor([[-5.0, 0.0], [-1.5, -0.5]]),
             "chosen_turn_mask": torch.tensor([[1.0, 1.0], [1.0, 0.0]]),
             "rejected_turn_mask": torch.tensor([[1.0, 0.0], [1.0, 1.0]])}
    losses = preference_loss("sdpo_segment", **batch, beta=0.1)
    # pair 0: (0.5 + 0.5) - (-1.0) = 2.0; pair 1: 0.5 - (0.5 - 0.5) = 0.5
    expected = torch.tensor([-math.log(1 / (1 + math.exp(-0.1 * 2.0))), -math.log(1 / (1 + math.exp(-0.1 * 0.5)))])
    torch.testing.assert_close(losses, expected.float(), rtol=1e-6, atol=1e-6)
    losses.sum().backward()
    assert torch.isfinite(chosen.grad).all()  # the nan padding turn carries no gradient
    assert (chosen.grad[0] < 0).all() and chosen.grad[1, 0] < 0 and chosen.grad[1, 1] == 0


def test_sdpo_segment_is_registered_with_the_authors_default():
    variant = PREFERENCE.get("sdpo_segment")
    assert variant.params == {"beta": 0.1}
    assert variant.extra["catalog"] == "preference:87" and "DAMO-ConvAI" in variant.notes
