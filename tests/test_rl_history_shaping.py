"""hapo_length against the authors' compute_len_reward / HistroyTracker (HCY123902/HAPO), written out per row, and
the GRPO trainer keeping its per-prompt history across steps."""

import math

import pytest
import torch

from postrain.errors import RecipeError
from postrain.rl.registry import SHAPING


def _authors_len_reward(history_len, seq_len, is_corr, w_lr):
    """utils.py::compute_len_reward (cosine), MAX_LEN standing for "no history" as 0 does here."""
    if 0 < history_len:
        r = math.cos((seq_len / history_len) * (math.pi / 2)) if seq_len < 2 * history_len else math.cos(math.pi)
        r = max(-0.7, r) if is_corr else min(0, r)
    else:
        r = 0
    return r * w_lr


def _mask(lengths, width=40):
    return (torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).float()


def _call(rewards, lengths, group, state=None, **params):
    data = {"rewards": torch.tensor(rewards), "group_size": group, "mask": _mask(lengths)}
    if state is not None:
        data["state"] = torch.tensor(state).unsqueeze(-1)
    return SHAPING.call("hapo_length", data, params)


@pytest.mark.parametrize("w_lr", [1.0, 0.5])
def test_matches_the_authors_length_reward_and_history_update(w_lr):
    rewards = [1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    lengths = [3, 2, 9, 4, 6, 11, 1, 12, 5, 5, 5, 8]
    history = [6.0] * 4 + [0.0] * 4 + [4.0] * 4   # group 2 has no correct response yet
    shaped, new_state = _call(rewards, lengths, 4, history, w_lr=w_lr)
    expected = [r + _authors_len_reward(h, n, r >= 1, w_lr) for r, n, h in zip(rewards, lengths, history)]
    torch.testing.assert_close(shaped.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    # combined_reward_func, mode "min": the history falls to the shortest correct length of the batch, if lower.
    assert new_state.squeeze(-1).tolist() == [3.0] * 4 + [6.0] * 4 + [4.0] * 4


def test_rewards_follow_the_papers_shape():
    # A correct answer shorter than the history gains, a longer one loses at most 0.7; an incorrect one is never
    # rewarded for brevity; a first visit (no history) is unshaped.
    shaped, _ = _call([1.0, 1.0, 1.0, 0.0, 0.0, 0.0], [2, 10, 30, 2, 10, 30], 6, [10.0] * 6)
    bonus = (shaped - torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])).tolist()
    assert bonus[0] > 0 and bonus[1] == pytest.approx(0.0, abs=1e-6) and bonus[2] == pytest.approx(-0.7)
    assert bonus[3] == 0.0 and bonus[4] == pytest.approx(0.0, abs=1e-6) and bonus[5] == -1.0
    first, state = _call([1.0, 0.0], [4, 7], 2)
    assert first.tolist() == [1.0, 0.0] and state.squeeze(-1).tolist() == [4.0, 4.0]
    with pytest.raises(RecipeError, match=r"w_lr must be in \[0, 1\]"):
        _call([1.0, 0.0], [4, 7], 2, w_lr=1.5)


def test_the_grpo_trainer_keeps_each_prompts_history(tmp_path):
    from postrain.models.loading import load_model
    from postrain.trainers.grpo_state import prompt_key
    from tests.conftest import TINY
    from tests.test_grpo_samplers import GROUP, make_trainer

    model, tokenizer, _ = load_model({"name_or_path": "tiny", "dtype": "float32", "tiny": TINY})
    tiny = (model, tokenizer)
    correct = lambda completions, **kw: [1.0 if i % 2 == 0 else 0.0 for i in range(len(completions))]
    trainer = make_trainer(tmp_path, tiny, {"shaping": [{"name": "hapo_length"}]}, rewards=correct)
    inputs = [{"prompt": f"{i}+1="} for i in range(3) for _ in range(GROUP)]
    out = trainer._generate_and_score_completions(inputs)
    table = trainer.rl_state.tables["hapo_length"]
    lengths = out["completion_mask"].sum(-1).float()
    shortest = min(lengths[0:GROUP:2].tolist())  # rows 0 and 2 of the first group are the correct ones
    assert table[prompt_key("0+1=")] == [shortest]
    # Second visit: the history is read before the update, so rewards now carry the length term.
    trainer._generate_and_score_completions(inputs)
    assert table[prompt_key("0+1=")][0] <= shortest
