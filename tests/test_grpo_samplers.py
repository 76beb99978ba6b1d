"""Samplers, refill and per-prompt state in the GRPO trainer (`rl.samplers`, stateful advantages).

The loss of a filtered batch is compared with a reference written here from the papers' rules (which rows a
sampler keeps, the group z-score, the PPO clip, each aggregation over the kept rows), not with the registry
entries; the refill loop is driven by rewards that depend on the generation round; tiny end-to-end runs check
that every supported sampler runs and logs its statistics, and that a resumed run continues with the same
per-prompt state as an uninterrupted one.
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
from tests.conftest import TINY, write_recipe

runner = CliRunner()
GROUP = 4
MAX_LEN = 5
# Two groups with spread, one all-equal group (rows 8-11).
REWARDS = [1.0, 0.0, 0.5, 0.0, 2.0, 1.0, 1.0, -1.0, 0.3, 0.3, 0.3, 0.3]
LENGTHS = [5, 3, 1, 4, 2, 5, 5, 1, 3, 2, 4, 5]
EPS = 0.2


@pytest.fixture(scope="module")
def tiny():
    from postrain.models.loading import load_model

    model, tokenizer, _ = load_model({"name_or_path": "tiny", "dtype": "float32", "tiny": TINY})
    return model, tokenizer


def make_trainer(tmp_path: Path, tiny, rl, rewards=None, num_prompts=3, **config):
    from datasets import Dataset
    from trl import GRPOConfig

    from postrain.trainers.grpo import PostrainGRPOTrainer

    def fixed(completions, **kwargs):
        return REWARDS[: len(completions)]

    model, tokenizer = tiny
    args = GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=len(REWARDS),
                      num_generations=GROUP, max_completion_length=MAX_LEN, report_to="none", bf16=False,
                      save_strategy="no", activation_checkpointing=False, **config)
    trainer = PostrainGRPOTrainer(
        model=model, args=args, reward_funcs=[rewards or fixed], processing_class=tokenizer,
        train_dataset=Dataset.from_list([{"prompt": f"{i}+1="} for i in range(num_prompts)]), rl=rl)
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    return trainer


def scored_batch(trainer) -> dict:
    """A generation batch as TRL's `_generate_and_score_completions` leaves it (completions of the lengths above,
    old log-probs off the current ones so that ratios clip), with REWARDS gathered; then the rl: advantages."""
    gen = torch.Generator().manual_seed(0)
    n, p = len(REWARDS), 3
    mask = (torch.arange(MAX_LEN).unsqueeze(0) < torch.tensor(LENGTHS).unsqueeze(1)).long()
    batch = {"prompt_ids": torch.randint(3, 60, (n, p), generator=gen),
             "prompt_mask": torch.ones(n, p, dtype=torch.long),
             "completion_ids": torch.randint(3, 60, (n, MAX_LEN), generator=gen), "completion_mask": mask,
             "advantages": torch.zeros(n), "num_items_in_batch": mask.sum()}
    batch["old_per_token_logps"] = policy_logps(trainer.model, batch) + 0.3 * torch.randn(n, MAX_LEN, generator=gen)
    trainer.rl_rewards_per_func = torch.tensor(REWARDS).unsqueeze(1)
    return grpo_advantages.replace_advantages(trainer, batch)


def policy_logps(model, batch) -> torch.Tensor:
    """log pi(token) of each completion token: one forward pass, written out here (not TRL's helper)."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits[:, batch["prompt_ids"].size(1) - 1:-1]
    return torch.log_softmax(logits.float(), -1).gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)


# --- the reference: which rows each sampler keeps, by the papers' rules -------------------------------------------


def groups_of(values):
    return [list(range(g, g + GROUP)) for g in range(0, len(values), GROUP)]


def zscore(rows):
    """GRPO's group z-score over the given rows: (r - mean) / (unbiased std + 1e-4), 0 for an all-equal group."""
    values = [REWARDS[i] for i in rows]
    if len(set(values)) == 1:
        return {i: 0.0 for i in rows}
    mean, std = statistics.fmean(values), statistics.stdev(values)
    return {i: (REWARDS[i] - mean) / (std + 1e-4) for i in rows}


def top_k(rows, score, k):
    return sorted(rows, key=lambda i: (-score(i), i))[:k]


def reference_rows(sampler: str):
    """(rows kept -> advantage) for the samplers whose selection is deterministic."""
    mixed = [g for g in groups_of(REWARDS) if len({REWARDS[i] for i in g}) > 1]
    full = {i: a for g in groups_of(REWARDS) for i, a in zscore(g).items()}
    if sampler in ("reinforce_rej", "dynamic_sampling"):  # 0 < #correct < G: the all-equal group goes
        return {i: a for g in mixed for i, a in zscore(g).items()}
    if sampler == "raft_pp":  # positive samples only
        return {i: full[i] for i in range(len(REWARDS)) if REWARDS[i] > 0}
    if sampler == "gfpo_length":  # the 2 shortest of each group, advantages over those 2
        return {i: a for g in groups_of(REWARDS) for i, a in zscore(top_k(g, lambda i: -LENGTHS[i], 2)).items()}
    if sampler == "gfpo_reward_per_token":  # the 2 highest reward / length of each group
        return {i: a for g in groups_of(REWARDS)
                for i, a in zscore(top_k(g, lambda i: REWARDS[i] / max(LENGTHS[i], 1), 2)).items()}
    if sampler == "cppo_prune":  # the half of the batch with the largest |advantage|
        return {i: full[i] for i in top_k(range(len(REWARDS)), lambda i: abs(full[i]), len(REWARDS) // 2)}
    raise KeyError(sampler)


def reference_loss(logps, old, rows: dict[int, float], multiplicity: dict[int, float], aggregation: str) -> float:
    """The PPO-clip loss over the kept rows only, each counted `multiplicity` times, aggregated as named."""
    seq_sum, seq_mean, tokens, weights, dl_num, dl_den = 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
    for i, adv in rows.items():
        w, n = multiplicity.get(i, 1.0), LENGTHS[i]
        per_token = []
        for t in range(n):
            ratio = math.exp(logps[i][t] - old[i][t])
            per_token.append(-min(ratio * adv, min(max(ratio, 1 - EPS), 1 + EPS) * adv))
        seq_sum += w * sum(per_token)
        seq_mean += w * (sum(per_token) / n if n else 0.0)
        tokens += w * n
        weights += w
        dl_num += w * (sum(per_token) / n if n else 0.0)  # delta_l, alpha = 1: L^-1 * token sum
        dl_den += w * (1.0 / n if n else 0.0)
    return {"token_mean": seq_sum / tokens, "seq_mean_token_mean": seq_mean / weights,
            "seq_mean_token_sum_norm": seq_sum / (weights * MAX_LEN),
            "delta_l": dl_num / (dl_den * MAX_LEN)}[aggregation]


SAMPLERS = {"reinforce_rej": "reinforce_rej",
            "dynamic_sampling": {"name": "dynamic_sampling", "max_num_gen_batches": 1},  # no refill round
            "raft_pp": "raft_pp", "gfpo_length": {"name": "gfpo_length", "k": 2},
            "gfpo_reward_per_token": {"name": "gfpo_reward_per_token", "k": 2},
            "cppo_prune": {"name": "cppo_prune", "pruning_rate": 0.5}, "pf_ppo": "pf_ppo"}
AGGREGATIONS = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm", "delta_l"]


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_filtered_batch_loss_equals_the_loss_over_the_kept_rows(tmp_path, tiny, sampler, aggregation):
    trainer = make_trainer(tmp_path, tiny, {"samplers": [SAMPLERS[sampler]], "aggregation": aggregation,
                                            "policy_loss": {"name": "ppo_clip", "epsilon": EPS}})
    batch = scored_batch(trainer)
    weight = batch["rl_weight"]
    if sampler == "pf_ppo":  # resampling with replacement: as many draws as rows, each row's count is its weight
        assert torch.equal(weight, weight.round()) and weight.sum() == len(REWARDS) and (weight == 0).any()
        full = {i: a for g in groups_of(REWARDS) for i, a in zscore(g).items()}
        rows = {i: full[i] for i in range(len(REWARDS)) if weight[i] > 0}
        multiplicity = dict(enumerate(weight.tolist()))
    else:
        rows, multiplicity = reference_rows(sampler), {}
        assert sorted(torch.nonzero(weight).flatten().tolist()) == sorted(rows)
    assert batch["advantages"].tolist() == pytest.approx([rows.get(i, 0.0) for i in range(len(REWARDS))], abs=1e-5)
    logps = policy_logps(trainer.model, batch)
    expected = reference_loss(logps.tolist(), batch["old_per_token_logps"].tolist(), rows, multiplicity, aggregation)
    loss = trainer._compute_loss(trainer.model, batch)
    assert abs(expected) > 1e-3  # a batch that exercises the loss
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    kept = trainer._metrics["train"]["rl/sampler/kept_fraction"][-1]
    assert kept == pytest.approx((weight > 0).float().mean().item())


def test_a_sampler_that_keeps_everything_gives_trls_normalisers(tmp_path, tiny):
    """The weighted normalisers reduce to the unfiltered ones: keep-all equals no sampler, for every aggregation."""
    for aggregation in AGGREGATIONS:
        plain = make_trainer(tmp_path / "plain", tiny, {"aggregation": aggregation})
        keep_all = make_trainer(tmp_path / "all", tiny, {"aggregation": aggregation, "samplers": [
            {"name": "online_difficulty", "low": 0.0, "high": 1.0, "max_num_gen_batches": 1}]})
        a, b = scored_batch(plain), scored_batch(keep_all)
        assert b["rl_weight"].eq(1).all()
        b["old_per_token_logps"] = a["old_per_token_logps"]
        assert keep_all._compute_loss(keep_all.model, b).item() == pytest.approx(
            plain._compute_loss(plain.model, a).item(), rel=1e-6), aggregation


def test_no_sampler_in_eval(tmp_path, tiny):
    trainer = make_trainer(tmp_path, tiny, {"samplers": ["reinforce_rej"]})
    trainer.model.eval()
    assert "rl_weight" not in scored_batch(trainer)


# --- refill -------------------------------------------------------------------------------------------------------


def by_round(rounds):
    """A reward function whose k-th call (generation round) returns rounds[k] (the last one after that)."""
    calls = []

    def reward(completions, **kwargs):
        calls.append(len(completions))
        return rounds[min(len(calls), len(rounds)) - 1][: len(completions)]

    return reward, calls


FLAT = [0.0] * len(REWARDS)  # every group all-equal: all dropped


@pytest.mark.parametrize("max_rounds, expected_rounds, short", [(0, 3, 0), (10, 3, 0), (2, 2, 1), (1, 1, 3)])
def test_dynamic_sampling_refills_until_enough_groups_are_kept(tmp_path, tiny, max_rounds, expected_rounds, short):
    reward, calls = by_round([FLAT, REWARDS, REWARDS])
    trainer = make_trainer(tmp_path, tiny, {"samplers": [{"name": "dynamic_sampling",
                                                          "max_num_gen_batches": max_rounds}]},
                           rewards=reward, num_prompts=6)
    batch = trainer._generate_and_score_completions([{"prompt": f"{i}+1="} for i in range(3) for _ in range(GROUP)])
    assert len(calls) == expected_rounds
    metrics = trainer._metrics["train"]
    assert metrics["rl/sampler/gen_batches"] == [float(expected_rounds)]
    assert metrics["rl/sampler/short_groups"] == [float(short)]
    # the batch: the kept groups in generation order (round 2's groups 0 and 1, then round 3's group 0), then
    # dropped groups of weight 0 where the rounds ran out
    kept_rewards = (REWARDS[:8] + REWARDS[:4])[: (3 - short) * GROUP]
    trained = trainer.rl_rewards_per_func.view(-1)[batch["rl_weight"] > 0].tolist()
    assert trained == pytest.approx(kept_rewards)
    assert batch["rl_weight"].tolist() == [1.0] * (3 - short) * GROUP + [0.0] * short * GROUP
    assert batch["completion_ids"].shape[0] == len(REWARDS)
    assert trainer.rl_state.counters.get("refill_batches", 0) == expected_rounds - 1


def test_refill_batches_come_from_a_seeded_second_pass_over_the_training_set(tmp_path, tiny):
    rl = {"samplers": [{"name": "dynamic_sampling"}]}
    trainer = make_trainer(tmp_path, tiny, rl, num_prompts=6)
    batches = [[x["prompt"] for x in trainer.rl_refill.next_batch()] for _ in range(3)]
    for batch in batches:  # whole groups of one prompt, 3 prompts per generation batch
        assert [batch[g * GROUP: (g + 1) * GROUP] for g in range(3)] == [[batch[g * GROUP]] * GROUP for g in range(3)]
    assert set(batches[0] + batches[1]) == {f"{i}+1=" for i in range(6)}  # one epoch: every prompt once
    assert trainer.rl_state.counters["refill_batches"] == 3
    # a fresh trainer whose counter says 2 batches were drawn (a resumed run) continues with the third
    resumed = make_trainer(tmp_path / "resumed", tiny, rl, num_prompts=6)
    resumed.rl_state.counters["refill_batches"] = 2
    assert [x["prompt"] for x in resumed.rl_refill.next_batch()] == batches[2]
    # the main loop's order (seed) is not the refill stream's (seed + 1)
    main = [x["prompt"] for x in next(iter(trainer.get_train_dataloader()))]
    assert main != batches[0]


def test_recent_sample_recovery_carries_surplus_groups_to_the_next_step(tmp_path, tiny):
    reward, calls = by_round([FLAT, REWARDS, REWARDS, FLAT])
    trainer = make_trainer(tmp_path, tiny, {"samplers": ["recent_sample_recovery"]}, rewards=reward, num_prompts=6)
    inputs = [{"prompt": f"{i}+1="} for i in range(3) for _ in range(GROUP)]
    trainer._generate_and_score_completions(inputs)
    assert len(calls) == 3  # 0 + 2 + 2 valid groups: 3 for the batch, 1 recovered
    assert trainer.rl_recovered["rewards_per_func"].view(-1).tolist() == pytest.approx(REWARDS[4:8])
    recovered = trainer.rl_recovered["batch"]["completion_ids"].clone()
    batch = trainer._generate_and_score_completions(inputs)  # the next step: all new groups flat
    # the recovered group comes first, then refill (FLAT again: nothing more is valid) until the round limit
    assert batch["rl_weight"].tolist() == [1.0] * GROUP + [0.0] * 2 * GROUP
    assert torch.equal(batch["completion_ids"][:GROUP, :recovered.size(1)], recovered)
    assert trainer._metrics["train"]["rl/sampler/recovered_groups"] == [1.0, 0.0]


# --- per-prompt state ----------------------------------------------------------------------------------------------


def test_dcpo_smooth_reads_and_updates_each_prompts_history(tmp_path, tiny):
    from postrain.trainers.grpo_state import prompt_key

    trainer = make_trainer(tmp_path, tiny, {"advantage": "dcpo_smooth"})
    inputs = [{"prompt": f"{i}+1="} for i in range(3) for _ in range(GROUP)]
    first = trainer._generate_and_score_completions(inputs)["advantages"]
    table = trainer.rl_state.tables["dcpo_smooth"]
    assert set(table) == {prompt_key(f"{i}+1=") for i in range(3)}
    g0 = REWARDS[:GROUP]
    assert table[prompt_key("0+1=")] == pytest.approx([1.0, statistics.fmean(g0), statistics.stdev(g0)])
    torch.testing.assert_close(first[:GROUP], (torch.tensor(g0) - statistics.fmean(g0)) / statistics.stdev(g0))
    # second visit, same rewards: cumulative mean unchanged, pooled std sqrt(((1)s^2 + s^2 + 0)/2) = s
    trainer._generate_and_score_completions(inputs)
    assert table[prompt_key("0+1=")] == pytest.approx([2.0, statistics.fmean(g0), statistics.stdev(g0)], rel=1e-5)
    assert table[prompt_key("2+1=")][0] == 2.0  # an all-equal group is visited too


# --- load-time checks ----------------------------------------------------------------------------------------------


def grpo_recipe(tmp_path: Path, rl: str, trainer: str = "", max_steps: int = 2, reward: str = "varied",
                prompts: int = 16) -> Path:
    (tmp_path / "my_rewards.py").write_text(
        "def varied(completions, **kwargs):\n"
        "    return [float(len(c) % 3) for c in completions]\n"
        "\n"
        "def by_prompt(completions, prompts, **kwargs):  # [0, 1, 0, 1] per group, or all 1 for a third of prompts\n"
        "    return [1.0 if sum(map(ord, str(p))) % 3 == 1 else float(i % 2) for i, p in enumerate(prompts)]\n")
    return write_recipe(tmp_path / "grpo.yaml", f"""
defaults: [base/grpo]
model: {{name_or_path: tiny, dtype: float32, tiny: {json.dumps(TINY)}}}
data: {{train: {{source: "builtin:arithmetic", task: {{n: {prompts}, digits: 1}}}}}}
rewards: [{{fn: "my_rewards.py:{reward}"}}]
trainer: {{max_steps: {max_steps}, per_device_train_batch_size: 8, logging_steps: 1, num_generations: 4,
          max_completion_length: 6, activation_checkpointing: false{trainer}}}
rl: {rl}
""")


def error_of(*args: str) -> str:
    result = runner.invoke(app, ["config", *args])
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    return " ".join(result.output.split())


@pytest.mark.parametrize("rl, expected", [
    ("{samplers: [reinforce_rej, dynamic_sampling]}", "samplers 'reinforce_rej' (rl.samplers[0], from"),
    ("{samplers: [reinforce_rej, dynamic_sampling]}", "both act at the 'group' stage"),
    ("{samplers: [{name: gfpo_length, k: 5}]}", "rl.samplers[0].k (5, rl.samplers[0], from"),
    ("{samplers: [{name: gfpo_length, k: 5}]}", "must lie in 1..trainer.num_generations (4)"),
    ("{samplers: [gfpo_length]}", "has no default for k: set rl.samplers[0].k"),
    ("{samplers: [{name: cppo_prune, pruning_rate: 1.0}]}", "pruning_rate (1.0, rl.samplers[0]"),
    ("{samplers: [{name: dynamic_sampling, max_num_gen_batches: -1}]}", "must be an integer >= 0"),
    ("{samplers: [{name: recent_sample_recovery, batch_groups: 2}]}",
     "rl.samplers[0].batch_groups (rl.samplers[0], from"),
    ("{samplers: [{name: recent_sample_recovery, batch_groups: 2}]}", "is set by the GRPO trainer"),
    ("{policy_loss: gvpo, samplers: [raft_pp]}", "compares the completions of whole groups"),
])
def test_sampler_load_time_errors_name_the_key_and_why(tmp_path, rl, expected):
    assert expected in error_of(str(grpo_recipe(tmp_path, rl)))


# --- end to end --------------------------------------------------------------------------------------------------


def logged(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# One sampler per stage per run: every supported sampler runs, together with those of the other stages.
RUNS = {
    "dynamic_gfpo_cppo_pf": ("{samplers: [dynamic_sampling, {name: gfpo_length, k: 2}, cppo_prune, pf_ppo]}",
                             ["rl/sampler/gen_batches", "rl/sampler/dynamic_sampling/kept_groups",
                              "rl/sampler/cppo_prune/kept_rows", "rl/sampler/pf_ppo/distinct_rows"]),
    "difficulty_tokens_raft": ("{samplers: [{name: online_difficulty, low: 0.1, high: 0.9}, "
                               "{name: gfpo_reward_per_token, k: 3}, raft_pp]}",
                               ["rl/sampler/online_difficulty/kept_groups", "rl/sampler/raft_pp/kept_rows"]),
    "reinforce_rej_dcpo": ("{advantage: dcpo_smooth, samplers: [reinforce_rej]}",
                           ["rl/sampler/reinforce_rej/kept_groups"]),
    "rsr": ("{samplers: [recent_sample_recovery]}", ["rl/sampler/recovered_groups", "rl/sampler/gen_batches"]),
}


@pytest.mark.parametrize("run", list(RUNS))
def test_tiny_runs_with_every_supported_sampler_log_their_statistics(tmp_path, run):
    rl, keys = RUNS[run]
    result = runner.invoke(app, ["grpo", str(grpo_recipe(tmp_path, rl)), f"output_dir={tmp_path / 'run'}"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    steps = [m for m in logged(tmp_path / "run") if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:
        assert {"rl/sampler/kept_fraction", *keys} <= m.keys(), sorted(m)
        assert 0.0 <= m["rl/sampler/kept_fraction"] <= 1.0


def test_a_resumed_run_continues_with_the_same_per_prompt_state(tmp_path):
    """3 steps saving every step; the same run resumed from checkpoint-1 ends with the same state at step 3: the
    per-prompt DCPO history, the refill stream's position and the recovered groups (step 1 recovers one). Rewards
    depend on the prompt only, so which groups are kept does not depend on the sampled text (which varies across
    CPUs)."""
    recipe = grpo_recipe(tmp_path, "{advantage: dcpo_smooth, samplers: [recent_sample_recovery]}",
                         trainer=", save_strategy: steps, save_steps: 1, save_total_limit: null", max_steps=3, reward="by_prompt")
    run = tmp_path / "run"
    result = runner.invoke(app, ["grpo", str(recipe), f"output_dir={run}"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    checkpoints = run / "checkpoints"

    def state(step: int) -> dict:
        return json.loads((checkpoints / f"checkpoint-{step}" / "rl_state.json").read_text())

    at_1, at_3 = state(1), state(3)
    buffer = checkpoints / "checkpoint-3" / "rl_buffer.pt"
    buffer_at_3 = torch.load(buffer) if buffer.exists() else None
    metrics = [m for m in logged(run) if "loss" in m]
    assert at_3["counters"]["generations"] == 3 and at_1 != at_3  # the state moved between the checkpoints
    assert len(at_3["tables"]["dcpo_smooth"]) > 0 and at_3["counters"]["refill_batches"] > 0
    assert (checkpoints / "checkpoint-1" / "rl_buffer.pt").exists()  # the resumed step 2 starts from it
    shutil.rmtree(checkpoints / "checkpoint-2")  # the run stopped after checkpoint-1
    shutil.rmtree(checkpoints / "checkpoint-3")

    result = runner.invoke(app, ["grpo", str(recipe), f"output_dir={run}", "--resume"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert state(3) == at_3
    if buffer_at_3 is None:
        assert not buffer.exists()
    else:
        torch.testing.assert_close(torch.load(buffer), buffer_at_3)
    again = [m for m in logged(run) if "loss" in m]
    assert [m["step"] for m in again] == [1, 2, 3]
    for before, after in zip(metrics, again, strict=True):  # the same training, timings aside
        for key in ("loss", "reward", "rl/advantages/std", "rl/sampler/gen_batches", "rl/sampler/recovered_groups"):
            assert after[key] == pytest.approx(before[key], rel=1e-6), (after["step"], key)


# --- two processes: the refill decision and the assembled batch --------------------------------------------------

WORLD = 2


def _refill_worker(rank: int, port: int, out_dir: str, cache: str):
    """One of two CPU processes (gloo): the trainer refills as on one process; rank 0 saves what both saw."""
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD), POSTRAIN_CACHE=cache)
    torch.set_num_threads(1)
    import torch.distributed as dist
    import trl
    from datasets import Dataset
    from trl import GRPOConfig

    from postrain.models.loading import load_model
    from postrain.trainers.grpo import PostrainGRPOTrainer

    n_local = len(REWARDS) // WORLD  # 6 rows each: group 1 (rows 4-7) is cut across the processes
    rounds = [FLAT, REWARDS, REWARDS]
    calls = []

    def reward(completions, **kwargs):
        calls.append(len(completions))
        return rounds[min(len(calls), len(rounds)) - 1][rank * n_local:(rank + 1) * n_local]

    texts = []  # every generation round's completions, this process' rows
    original = trl.GRPOTrainer._generate_and_score_completions

    def recording(self, inputs):
        out = original(self, inputs)
        texts.append(self.processing_class.batch_decode(out["completion_ids"], skip_special_tokens=True))
        return out

    trl.GRPOTrainer._generate_and_score_completions = recording
    model, tokenizer, _ = load_model({"name_or_path": "tiny", "dtype": "float32", "tiny": {**TINY, "seed": 0}})
    args = GRPOConfig(output_dir=f"{out_dir}/out{rank}", per_device_train_batch_size=n_local, num_generations=GROUP,
                      max_completion_length=MAX_LEN, report_to="none", bf16=False, use_cpu=True, save_strategy="no",
                      activation_checkpointing=False, seed=rank)  # another seed per process: other completions
    trainer = PostrainGRPOTrainer(
        model=model, args=args, reward_funcs=[reward], processing_class=tokenizer,
        train_dataset=Dataset.from_list([{"prompt": f"{i}+1="} for i in range(6)]),
        rl={"advantage": "reinforce_rej", "samplers": [{"name": "dynamic_sampling", "max_num_gen_batches": 3}]})
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    inputs = [{"prompt": f"{i}+1="} for i in range(3) for _ in range(GROUP)][rank * n_local:(rank + 1) * n_local]
    batch = trainer._generate_and_score_completions(inputs)
    loss = trainer._compute_loss(trainer.model, batch).item()
    mine = {"rounds": texts, "calls": len(calls), "loss": loss,
            "batch": tokenizer.batch_decode(batch["completion_ids"], skip_special_tokens=True),
            "weight": batch["rl_weight"], "advantages": batch["advantages"],
            "lengths": batch["completion_mask"].sum(-1), "num_items": batch["num_items_in_batch"],
            "rewards": trainer.rl_rewards_per_func.view(-1),
            "gen_batches": trainer._metrics["train"]["rl/sampler/gen_batches"]}
    everyone = [None] * WORLD
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        torch.save(everyone, f"{out_dir}/results.pt")
    dist.barrier()


@pytest.mark.slow  # two processes each import torch / transformers / TRL: about 25 s on 2 cores
def test_two_processes_take_the_same_refill_decision_and_assemble_whole_groups(tmp_path):
    """12 completions (3 groups of 4) split 6 / 6 with the middle group cut; round 1 all-equal, rounds 2 and 3
    REWARDS: both processes refill twice and train round 2's groups 0, 1 and round 3's group 0, each process
    holding its 6 rows of that batch; the token-mean loss over the processes is the kept rows' loss."""
    import os
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_refill_worker, args=(port, str(tmp_path), os.environ["POSTRAIN_CACHE"]), nprocs=WORLD, join=True)
    results = torch.load(tmp_path / "results.pt", weights_only=False)
    assert [r["calls"] for r in results] == [3, 3] and [r["gen_batches"] for r in results] == [[3.0], [3.0]]
    rounds = [sum((r["rounds"][k] for r in results), []) for k in range(3)]  # each round's 12 rows, in order
    assert rounds[1] != rounds[2]  # generated afresh: the batch below shows where each row came from
    assert sum((r["batch"] for r in results), []) == rounds[1][:8] + rounds[2][:4]
    torch.testing.assert_close(results[0]["rewards"], torch.tensor(REWARDS[:8] + REWARDS[:4]))
    torch.testing.assert_close(results[0]["rewards"], results[1]["rewards"])
    assert torch.cat([r["weight"] for r in results]).eq(1).all()
    # on-policy (ratio 1), the PPO-clip token loss is -A (the raw reward under reinforce_rej); token_mean over
    # both processes' kept tokens
    advantages = torch.cat([r["advantages"] for r in results])
    torch.testing.assert_close(advantages, torch.tensor(REWARDS[:8] + REWARDS[:4]))
    lengths = torch.cat([r["lengths"] for r in results]).float()
    assert results[0]["num_items"] == results[1]["num_items"] == lengths.sum()
    expected = -(advantages * lengths).sum() / lengths.sum()
    # TRL's convention: each process' loss is WORLD x its share, so that DDP's gradient average is right
    assert sum(r["loss"] for r in results) / WORLD == pytest.approx(expected.item(), rel=1e-5)
