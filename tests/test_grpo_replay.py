"""RePO replay in the GRPO trainer (`rl.samplers: [repo_replay]`, postrain.trainers.grpo_replay).

The off-policy term on a fixed batch is compared with a computation written here: a plain forward of each replayed
completion after its prompt, the PPO clip against the stored behaviour log-probs, the split advantages
(z-score over the prompt's replayed rewards), aggregated over the replayed samples; the buffer is checked after two
generation steps; a resumed run must continue with the same buffers and losses.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from postrain.cli import app
from postrain.trainers import grpo_advantages
from tests.conftest import TINY
from tests.test_grpo_samplers import error_of, grpo_recipe as samplers_recipe

runner = CliRunner()
GROUP = 4
MAX_LEN = 5
EPS = 0.2
COEF = 0.5
PROMPTS = ["0+1=", "1+1=", "2+1="]
REWARDS = [1.0, 0.0, 0.5, 0.0, 2.0, 1.0, 1.0, -1.0, 0.3, 0.3, 0.3, 0.3]
LENGTHS = [5, 3, 1, 4, 2, 5, 5, 1, 3, 2, 4, 5]
# What each prompt's buffer holds before the step: (reward, completion length) per sample, oldest first. Prompt 0
# has 6 (ties at the top: the older first), prompt 1 has 5, prompt 2 only 3 (< min_buffer_size: no replay).
BUFFERED = [[(1.0, 3), (0.0, 5), (1.0, 2), (0.5, 4), (2.0, 1), (1.0, 5)],
            [(0.0, 2), (0.0, 4), (1.0, 3), (0.2, 5), (0.0, 1)],
            [(1.0, 3), (0.0, 2), (0.5, 4)]]
REPLAY = {"name": "repo_replay", "strategy": "highest_k", "num_replays": 3, "min_buffer_size": 4,
          "max_buffer_size": 6, "off_policy_loss_coef": COEF}


@pytest.fixture(scope="module")
def tiny():
    from postrain.models.loading import load_model

    model, tokenizer, _ = load_model({"name_or_path": "tiny", "dtype": "float32", "tiny": TINY})
    return model, tokenizer


def make_trainer(tmp_path: Path, tiny, rl, rewards=None, **config):
    from datasets import Dataset
    from trl import GRPOConfig

    from postrain.trainers.grpo import PostrainGRPOTrainer

    def fixed(completions, **kwargs):
        return REWARDS[: len(completions)]

    model, tokenizer = tiny
    config = {"per_device_train_batch_size": len(REWARDS), **config}
    args = GRPOConfig(output_dir=str(tmp_path / "out"), num_generations=GROUP, max_completion_length=MAX_LEN,
                      report_to="none", bf16=False, save_strategy="no", activation_checkpointing=False, **config)
    trainer = PostrainGRPOTrainer(model=model, args=args, reward_funcs=[rewards or fixed], processing_class=tokenizer,
                                  train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS]), rl=rl)
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    return trainer


def policy_logps(model, prompt_ids, completion_ids, completion_mask) -> torch.Tensor:
    """log pi(token) of each completion token after its prompt: one forward pass, written out here."""
    ids = torch.cat([prompt_ids, completion_ids], 1)
    attention = torch.cat([torch.ones_like(prompt_ids), completion_mask], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits[:, prompt_ids.size(1) - 1:-1]
    return torch.log_softmax(logits.float(), -1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)


def inputs_of_batch():
    return [{"prompt": p} for p in PROMPTS for _ in range(GROUP)]


def fixed_batch(trainer, gen) -> tuple[dict, torch.Tensor, list]:
    """A scored generation batch (prompt ids shared within each group), and the buffers filled from BUFFERED with
    behaviour log-probs off the current policy's (so that ratios clip). Returns the batch after the rl:
    advantages and the replay attachment, the prompt ids of each prompt, and the buffered samples."""
    from postrain.trainers.grpo_state import prompt_key

    n = len(REWARDS)
    prompt_of_group = torch.randint(3, 60, (len(PROMPTS), 3), generator=gen)
    mask = (torch.arange(MAX_LEN).unsqueeze(0) < torch.tensor(LENGTHS).unsqueeze(1)).long()
    batch = {"prompt_ids": prompt_of_group.repeat_interleave(GROUP, 0), "prompt_mask": torch.ones(n, 3).long(),
             "completion_ids": torch.randint(3, 60, (n, MAX_LEN), generator=gen), "completion_mask": mask,
             "advantages": torch.zeros(n), "num_items_in_batch": mask.sum()}
    batch["old_per_token_logps"] = policy_logps(trainer.model, batch["prompt_ids"], batch["completion_ids"], mask)
    buffered = []
    for p, samples in enumerate(BUFFERED):
        rows = []
        for reward, length in samples:
            ids = torch.randint(3, 60, (1, length), generator=gen)
            old = policy_logps(trainer.model, prompt_of_group[p:p + 1], ids, torch.ones_like(ids))
            old = old + 0.3 * torch.randn(old.shape, generator=gen)
            trainer.rl_replay_buffer.add(prompt_key(PROMPTS[p]), ids[0], torch.ones(length), old[0], reward)
            rows.append({"ids": ids, "old": old, "reward": reward})
        buffered.append(rows)
    trainer.rl_rewards_per_func = torch.tensor(REWARDS).unsqueeze(1)
    from postrain.trainers import grpo_replay

    batch = grpo_replay.attach_replays(trainer, inputs_of_batch(), grpo_advantages.replace_advantages(trainer, batch))
    return batch, prompt_of_group, buffered


def reference_off_policy_loss(model, prompt_of_group, buffered, aggregation: str) -> float:
    """highest_k (3, ties to the older) of every prompt with >= 4 samples; split z-scores over those 3 rewards;
    PPO clip per token; token mean over all replayed tokens, or the mean of the sequences' token means."""
    token_losses, seq_means = [], []
    for p, rows in enumerate(buffered):
        if len(rows) < 4:
            continue
        top = sorted(range(len(rows)), key=lambda j: -rows[j]["reward"])[:3]
        rewards = [rows[j]["reward"] for j in top]
        mean, std = statistics.fmean(rewards), statistics.stdev(rewards)
        for j, reward in zip(top, rewards):
            adv = (reward - mean) / (std + 1e-4)
            ids = rows[j]["ids"]
            now = policy_logps(model, prompt_of_group[p:p + 1], ids, torch.ones_like(ids))[0].tolist()
            old = rows[j]["old"][0].tolist()
            per_token = []
            for a, b in zip(now, old):
                ratio = math.exp(a - b)
                per_token.append(-min(ratio * adv, min(max(ratio, 1 - EPS), 1 + EPS) * adv))
            token_losses += per_token
            seq_means.append(sum(per_token) / len(per_token))
    if aggregation == "token_mean":
        return sum(token_losses) / len(token_losses)
    return sum(seq_means) / len(seq_means)


def off_policy_term(trainer, batch) -> float:
    """The trainer's loss with the replayed samples minus its loss without them."""
    on_policy = {k: v for k, v in batch.items() if not k.startswith("rl_replay")}
    return (trainer._compute_loss(trainer.model, batch) - trainer._compute_loss(trainer.model, on_policy)).item()


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
def test_off_policy_term_equals_an_independent_computation(tmp_path, tiny, aggregation):
    trainer = make_trainer(tmp_path, tiny, {"samplers": [REPLAY], "aggregation": aggregation,
                                            "policy_loss": {"name": "ppo_clip", "epsilon": EPS}})
    batch, prompt_of_group, buffered = fixed_batch(trainer, torch.Generator().manual_seed(0))
    assert batch["rl_replay_valid"].sum() == 6 and batch["rl_replay_num_sequences"] == 6
    # prompt 0's 3 replays ride on its rows 0-2, prompt 1's on rows 4-6; prompt 2 has none
    assert batch["rl_replay_valid"][:, 0].tolist() == [True] * 3 + [False] + [True] * 3 + [False] * 5
    expected = reference_off_policy_loss(trainer.model, prompt_of_group, buffered, aggregation)
    assert abs(expected) > 1e-3
    assert off_policy_term(trainer, batch) == pytest.approx(COEF * expected, rel=1e-4)
    logged = trainer._metrics["train"]
    assert logged["rl/replay/off_policy_loss"][-1] == pytest.approx(expected, rel=1e-4)
    assert logged["rl/replay/replayed"] == [6.0]


def test_trls_shuffle_and_split_keep_each_replay_with_its_prompt(tmp_path, tiny):
    """steps_per_generation 2: TRL shuffles the generation batch and splits it in two; the two micro-batches'
    off-policy terms add up to the term of the whole batch (token mean over all replayed tokens)."""
    from trl.trainer.utils import shuffle_sequence_dict, split_tensor_dict

    trainer = make_trainer(tmp_path, tiny, {"samplers": [REPLAY], "policy_loss": {"name": "ppo_clip",
                                                                                  "epsilon": EPS}},
                           per_device_train_batch_size=len(REWARDS) // 2, steps_per_generation=2)
    trainer.current_gradient_accumulation_steps = 2
    batch, prompt_of_group, buffered = fixed_batch(trainer, torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    halves = split_tensor_dict(shuffle_sequence_dict(batch), 2)
    for half in halves:  # every replay row still sits on a row of its prompt
        valid = half["rl_replay_valid"].any(-1)
        for row in torch.nonzero(valid).flatten().tolist():
            assert half["prompt_ids"][row].tolist() in prompt_of_group[:2].tolist()
    total = sum(off_policy_term(trainer, half) for half in halves)
    expected = reference_off_policy_loss(trainer.model, prompt_of_group, buffered, "token_mean")
    assert total == pytest.approx(COEF * expected, rel=1e-4)


def test_the_buffer_after_two_generation_steps(tmp_path, tiny):
    """Step 1 replays nothing (empty buffers) and stores its 4 samples per prompt; step 2 replays the 2 highest of
    those (chosen before step 2's own samples enter) and the buffers then keep the last 6."""
    from postrain.trainers.grpo_state import prompt_key

    rl = {"samplers": [{**REPLAY, "num_replays": 2}]}
    trainer = make_trainer(tmp_path, tiny, rl)
    first = trainer._generate_and_score_completions(inputs_of_batch())
    assert "rl_replay_valid" not in first
    buffer = trainer.rl_replay_buffer
    behaviour = policy_logps(trainer.model, first["prompt_ids"][:, -first["prompt_mask"].sum(-1).min():],
                             first["completion_ids"], first["completion_mask"])
    for p, prompt in enumerate(PROMPTS):
        entries = buffer.entries[prompt_key(prompt)]
        assert [e["reward"] for e in entries] == pytest.approx(REWARDS[p * GROUP:(p + 1) * GROUP])
        for i, e in enumerate(entries):
            row = p * GROUP + i
            n = int(first["completion_mask"][row].nonzero().max()) + 1
            assert torch.equal(e["ids"], first["completion_ids"][row, :n])
            if bool(first["prompt_mask"][row].all()):  # an unpadded prompt: the plain forward above is exact
                torch.testing.assert_close(e["logps"], behaviour[row, :n], rtol=1e-4, atol=1e-4)
    step_1 = {k: [dict(e) for e in v] for k, v in buffer.entries.items()}

    second = trainer._generate_and_score_completions(inputs_of_batch())
    assert trainer._metrics["train"]["rl/replay/replayed"] == [0.0, 6.0]
    for p, prompt in enumerate(PROMPTS):
        rows = range(p * GROUP, (p + 1) * GROUP)
        replayed = [second["rl_replay_ids"][r, 0] for r in rows if second["rl_replay_valid"][r, 0]]
        top = sorted(range(GROUP), key=lambda j: -REWARDS[p * GROUP + j])[:2]  # ties: the older first
        expected = [step_1[prompt_key(prompt)][j]["ids"] for j in top]
        assert [r[:e.numel()].tolist() for r, e in zip(replayed, expected)] == [e.tolist() for e in expected]
        entries = buffer.entries[prompt_key(prompt)]
        assert len(entries) == 6
        assert all(torch.equal(a["ids"], b["ids"]) for a, b in zip(entries[:2], step_1[prompt_key(prompt)][2:]))


# --- load-time checks ------------------------------------------------------------------------------------------


def grpo_recipe(tmp_path: Path, rl: str, trainer: str = "", max_steps: int = 2) -> Path:
    """The samplers' test recipe on 4 prompts, so that prompts recur and buffers fill within a few steps."""
    return samplers_recipe(tmp_path, rl, trainer, max_steps, prompts=4)


@pytest.mark.parametrize("rl, expected", [
    ("{samplers: [repo_replay, dynamic_sampling]}", "cannot be combined with 'dynamic_sampling'"),
    ("{samplers: [repo_replay], shaping: [{name: redit, sigma: 0.1}]}", "remove rl.shaping"),
    ("{samplers: [repo_replay], advantage: dcpo_smooth}", "advantage 'dcpo_smooth' (rl.advantage, from"),
    ("{samplers: [repo_replay], policy_loss: gvpo}", "policy loss 'gvpo' (rl.policy_loss, from"),
    ("{samplers: [{name: repo_replay, max_buffer_size: 4}]}",
     "rl.samplers[0].max_buffer_size (4, rl.samplers[0], from"),
    ("{samplers: [{name: repo_replay, strategy: best_k}]}", "must be one of all, random_k, highest_k"),
    ("{samplers: [{name: repo_replay, num_replays: 0}]}", "num_replays (0, rl.samplers[0]"),
    ("{samplers: [{name: repo_replay, strategy: max_variance_k, max_buffer_size: 40, num_replays: 20}]}",
     "keep it under 200000"),
])
def test_load_time_errors_name_the_key_and_why(tmp_path, rl, expected):
    assert expected in error_of(str(grpo_recipe(tmp_path, rl)))


# --- end to end -------------------------------------------------------------------------------------------------


def logged(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_resumed_run_continues_with_the_same_buffers(tmp_path):
    """4 prompts, 2 per step (an epoch every 2 steps), 4 samples each: step 3 revisits 2 prompts of steps 1-2 and
    replays 2 samples of each. 3 steps saving every step, then the same run resumed from checkpoint-1 (inside the
    first epoch: transformers does not replay the sampler's order of a later epoch) must end with the same buffers
    and log the same losses."""
    rl = "{samplers: [{name: repo_replay, num_replays: 2, min_buffer_size: 4, max_buffer_size: 6}]}"
    recipe = grpo_recipe(tmp_path, rl, trainer=", save_strategy: steps, save_steps: 1, save_total_limit: null", max_steps=3)
    run = tmp_path / "run"
    result = runner.invoke(app, ["grpo", str(recipe), f"output_dir={run}"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    checkpoints = run / "checkpoints"
    buffer = checkpoints / "checkpoint-3" / "rl_replay.pt"
    at_3 = torch.load(buffer)
    assert sorted(len(v) for v in at_3["entries"].values()) == [4, 4, 6, 6]
    metrics = [m for m in logged(run) if "loss" in m]
    assert [m["rl/replay/replayed"] for m in metrics] == [0.0, 0.0, 4.0]
    assert "rl/replay/off_policy_loss" in metrics[2] and "rl/replay/off_policy_loss" not in metrics[1]
    shutil.rmtree(checkpoints / "checkpoint-2")
    shutil.rmtree(checkpoints / "checkpoint-3")

    result = runner.invoke(app, ["grpo", str(recipe), f"output_dir={run}", "--resume"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    again = torch.load(buffer)
    assert again["entries"].keys() == at_3["entries"].keys()
    for key, entries in at_3["entries"].items():
        for a, b in zip(entries, again["entries"][key], strict=True):
            assert a["reward"] == b["reward"] and torch.equal(a["ids"], b["ids"])
            torch.testing.assert_close(a["logps"], b["logps"])
    resumed = [m for m in logged(run) if "loss" in m]
    assert [m["step"] for m in resumed] == [1, 2, 3]
    for before, after in zip(metrics, resumed, strict=True):
        for key in ("loss", "reward", "rl/replay/replayed", "rl/replay/off_policy_loss"):
            if key in before:
                assert after[key] == pytest.approx(before[key], rel=1e-6), (after["step"], key)
