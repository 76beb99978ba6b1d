"""The GRPO trainer's registry path (`rl:` / `method:`): equal to TRL where TRL has the same option, method
expansion in `postrain config`, load-time refusals, the TRL-source pin, and end-to-end runs."""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from postrain.cli import app
from postrain.trainers import grpo_loss
from tests.conftest import TINY, write_recipe

runner = CliRunner()
TINY_MODEL = "model: {name_or_path: tiny, dtype: float32, tiny: %s}\n" % json.dumps(TINY)
GROUP = 4
# Fixed rewards by row, independent of what the model writes: two groups of 4 with spread, one all-equal group.
REWARDS = [1.0, 0.0, 0.5, 0.0, 2.0, 1.0, 1.0, -1.0, 0.3, 0.3, 0.3, 0.3]


def fixed_reward(completions, **kwargs):
    return REWARDS[: len(completions)]


@pytest.fixture(scope="module")
def tiny():
    from postrain.models.loading import load_model

    model, tokenizer, _ = load_model({"name_or_path": "tiny", "dtype": "float32", "tiny": TINY})
    return model, tokenizer


def make_trainer(tmp_path: Path, tiny, rl=None, **config):
    from datasets import Dataset
    from trl import GRPOConfig

    from postrain.trainers.grpo import PostrainGRPOTrainer

    model, tokenizer = tiny
    args = GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=len(REWARDS),
                      num_generations=GROUP, max_completion_length=5, report_to="none", bf16=False,
                      save_strategy="no", activation_checkpointing=False, **config)
    trainer = PostrainGRPOTrainer(model=model, args=args, reward_funcs=[fixed_reward], processing_class=tokenizer,
                                  train_dataset=Dataset.from_list([{"prompt": f"{i}+1="} for i in range(3)]), rl=rl)
    trainer.current_gradient_accumulation_steps = 2  # as inside Trainer.train: exercises the normalisers
    return trainer


def fixed_batch(trainer) -> dict:
    """12 completions of unequal lengths, old log-probs off the current ones (so ratios are clipped), and
    reference log-probs off them too."""
    gen = torch.Generator().manual_seed(0)
    n, p, t = len(REWARDS), 3, 5
    lengths = torch.tensor([5, 3, 1, 4, 2, 5, 5, 1, 3, 2, 4, 5])
    completion_mask = (torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)).long()
    inputs = {"prompt_ids": torch.randint(3, 60, (n, p), generator=gen), "prompt_mask": torch.ones(n, p, dtype=torch.long),
              "completion_ids": torch.randint(3, 60, (n, t), generator=gen), "completion_mask": completion_mask,
              "advantages": torch.randn(n, generator=gen), "num_items_in_batch": completion_mask.sum()}
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention = torch.cat([inputs["prompt_mask"], completion_mask], 1)
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attention, t)
    inputs["old_per_token_logps"] = logps + 0.3 * torch.randn(n, t, generator=gen)
    inputs["ref_per_token_logps"] = logps + 0.5 * torch.randn(n, t, generator=gen)
    return inputs


def loss_and_grads(trainer, inputs):
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in trainer.model.named_parameters() if p.grad is not None}
    trainer.model.zero_grad()
    return loss.detach(), grads


# TRL's own option, and the rl: parts that compute the same thing.
SAME_AS_TRL = {
    "grpo": ({"loss_type": "grpo", "scale_rewards": "group"},
             {"advantage": "grpo", "policy_loss": "ppo_clip", "aggregation": "seq_mean_token_mean"}),
    "dapo": ({"loss_type": "dapo", "epsilon_high": 0.28},
             {"policy_loss": {"name": "ppo_clip", "epsilon_high": 0.28}, "aggregation": "token_mean"}),
    "dr_grpo": ({"loss_type": "dr_grpo"}, {"aggregation": "seq_mean_token_sum_norm"}),
    "gspo": ({"loss_type": "grpo", "importance_sampling_level": "sequence", "epsilon": 3e-4, "epsilon_high": 4e-4},
             {"policy_loss": "gspo", "aggregation": "seq_mean_token_mean"}),
    "cispo": ({"loss_type": "cispo", "epsilon_high": 5.0}, {"policy_loss": "cispo", "aggregation": "token_mean"}),
    "grpo_kl": ({"loss_type": "grpo", "beta": 0.04, "use_bias_correction_kl": False},
                {"aggregation": "seq_mean_token_mean", "regularizers": [{"name": "kl_k3", "beta": 0.04}]}),
}


@pytest.mark.parametrize("case", list(SAME_AS_TRL))
def test_rl_loss_and_gradients_equal_trls_own_option(tmp_path, tiny, case):
    native_config, rl = SAME_AS_TRL[case]
    native = make_trainer(tmp_path / "native", tiny, **native_config)
    ours = make_trainer(tmp_path / "rl", tiny, rl=rl, beta=native_config.get("beta", 0.0))
    inputs = fixed_batch(native)
    if case != "grpo_kl":  # TRL reads reference log-probs only where beta != 0
        inputs.pop("ref_per_token_logps")
    native_loss, native_grads = loss_and_grads(native, inputs)
    our_loss, our_grads = loss_and_grads(ours, inputs)
    assert native_loss.abs() > 1e-4  # a batch that exercises the loss
    assert our_loss == pytest.approx(native_loss.item(), rel=1e-5, abs=1e-7)
    assert native_grads.keys() == our_grads.keys()
    for name, grad in native_grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)
    native_clip, our_clip = native._metrics["train"], ours._metrics["train"]
    # (gspo's clip fractions are not compared: TRL counts sequences, the registry entry counts their tokens)
    for key in ("entropy", "kl") + (("clip_ratio/low_mean", "clip_ratio/high_mean") if case != "gspo" else ()):
        if key in native_clip:
            assert our_clip[key] == pytest.approx(native_clip[key], rel=1e-5), key


def test_disco_in_the_trainer_equals_the_registry_entry_with_its_kl_constraint_active(tmp_path, tiny):
    """DisCO reads binary rewards and whole groups, and its KL constraint comes from all-reduced statistics
    (disco_kl_stats); on one process the trainer's loss must be the entry's, divided by the accumulation steps."""
    from postrain.rl import policy_loss

    trainer = make_trainer(tmp_path, tiny, rl={"policy_loss": "disco", "aggregation": "seq_mean_token_mean"})
    inputs = fixed_batch(trainer)
    rewards = torch.tensor([1.0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    inputs.update(rl_rewards=rewards, rl_row_index=torch.arange(len(REWARDS)))
    loss, grads = loss_and_grads(trainer, inputs)

    trainer.model.zero_grad()
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attention, ids.size(1) - 3)
    want, metrics = policy_loss("disco", logps=logps, old_logps=inputs["old_per_token_logps"],
                                mask=inputs["completion_mask"], rewards=rewards, group_size=GROUP,
                                aggregation="seq_mean_token_mean")
    (want / 2).backward()
    assert metrics["disco/constraint_coef"] > 0  # the KL term is in play
    assert loss == pytest.approx(want.item() / 2, rel=1e-5)
    for name, p in trainer.model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-7, msg=name)
    trainer.model.zero_grad()


def test_the_vocabulary_forward_gives_trls_log_probs_and_entropies(tmp_path, tiny):
    """TW-GRPO's input: the unfused forward that keeps the whole next-token distribution scores the completion
    tokens exactly as TRL's fused head does (temperature included), and its distribution is the one they come
    from."""
    trainer = make_trainer(tmp_path, tiny, temperature=0.7)
    inputs = fixed_batch(trainer)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        want, want_entropy, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attention, 5,
                                                                           compute_entropy=True)
        logps, entropy, vocab, _ = grpo_loss.vocab_logps_and_entropies(trainer, trainer.model, ids, attention, 5)
    valid = inputs["completion_mask"].bool()
    torch.testing.assert_close(logps[valid], want[valid], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy[valid], want_entropy[valid], rtol=1e-4, atol=1e-5)
    assert vocab.shape == (*ids.shape[:1], 5, trainer.model.config.vocab_size)
    torch.testing.assert_close(vocab.exp().sum(-1), torch.ones(vocab.shape[:2]))


@pytest.mark.parametrize("name", ["tw_grpo", "gtpo"])
def test_token_weighting_losses_in_the_trainer_equal_the_entry_fed_by_a_plain_forward(tmp_path, tiny, name):
    """tw_grpo reads the vocabulary log-probs and gtpo the completion ids: the trainer hands them over, with the
    rows put back in generation order (a shuffled micro-batch here), so its loss and gradients are the entry's on
    a plain forward of the same batch, divided by the accumulation steps."""
    from postrain.rl import policy_loss

    # the random tiny model's token entropy (about log V) is above GTPO's 0.7, which would filter every completion
    params = {"entropy_threshold": 100.0} if name == "gtpo" else {}
    trainer = make_trainer(tmp_path, tiny, rl={"policy_loss": {"name": name, **params}, "aggregation": "token_mean"})
    inputs = fixed_batch(trainer)
    if name == "gtpo":  # shared opening tokens between completions of opposite sign, so the conflict mask acts
        inputs["completion_ids"][:, :2] = 7
    shuffle = torch.randperm(len(REWARDS), generator=torch.Generator().manual_seed(1))
    shuffled = {k: (v[shuffle] if isinstance(v, torch.Tensor) and v.dim() else v) for k, v in inputs.items()}
    shuffled["rl_row_index"] = shuffle
    loss, grads = loss_and_grads(trainer, shuffled)

    trainer.model.zero_grad()
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    outputs = trainer.model(input_ids=ids, attention_mask=attention)
    vocab = outputs.logits[:, -6:-1].float().log_softmax(-1)  # temperature 1.0
    logps = vocab.gather(-1, inputs["completion_ids"].unsqueeze(-1)).squeeze(-1)
    entropies = -(vocab.exp() * vocab).sum(-1)
    want, metrics = policy_loss(name, logps=logps, old_logps=inputs["old_per_token_logps"],
                                advantages=inputs["advantages"], mask=inputs["completion_mask"], group_size=GROUP,
                                vocab_logps=vocab, entropies=entropies, completion_ids=inputs["completion_ids"],
                                aggregation="token_mean", **params,
                                aggregation_params={"global_tokens": inputs["num_items_in_batch"].float()})
    (want / 2).backward()
    if name == "gtpo":
        assert 0 < metrics["gtpo/conflict_fraction"] < 1
    assert abs(loss.item()) > 1e-4 and loss == pytest.approx(want.item() / 2, rel=1e-5)
    for param_name, p in trainer.model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[param_name], p.grad, rtol=1e-4, atol=1e-6, msg=param_name)
    trainer.model.zero_grad()


def test_a_different_part_changes_the_loss(tmp_path, tiny):
    """The equality above is not vacuous: another aggregation gives another loss on the same batch."""
    a = make_trainer(tmp_path / "a", tiny, rl={"aggregation": "seq_mean_token_mean"})
    b = make_trainer(tmp_path / "b", tiny, rl={"aggregation": "token_mean"})
    inputs = fixed_batch(a)
    assert loss_and_grads(a, inputs)[0] != pytest.approx(loss_and_grads(b, inputs)[0].item(), rel=1e-3)


def generation_batch():
    return [{"prompt": f"{i}+1="} for i in range(len(REWARDS) // GROUP) for _ in range(GROUP)]


@pytest.mark.parametrize("scale, advantage", [("group", "grpo"), ("batch", "lite_ppo"), ("none", "dr_grpo")])
def test_advantages_and_their_log_equal_trls_for_the_same_rewards(tmp_path, tiny, scale, advantage):
    native = make_trainer(tmp_path / "native", tiny, scale_rewards=scale)
    ours = make_trainer(tmp_path / "rl", tiny, rl={"advantage": advantage})
    native.model.train()
    trl_out = native._generate_and_score_completions(generation_batch())
    our_out = ours._generate_and_score_completions(generation_batch())
    torch.testing.assert_close(our_out["advantages"], trl_out["advantages"], rtol=1e-5, atol=1e-6)
    assert trl_out["advantages"][-GROUP:].abs().max() == 0 and trl_out["advantages"].abs().max() > 0.1
    logged = ours._metrics["train"]
    assert logged["rl/advantages/mean"][-1] == pytest.approx(trl_out["advantages"].mean().item(), abs=1e-6)
    assert logged["rl/advantages/max"][-1] == pytest.approx(trl_out["advantages"].max().item(), rel=1e-5)
    assert list(ours._logs["advantages"]) == pytest.approx(list(native._logs["advantages"]), abs=1e-5)


def test_unscorable_rows_get_zero_advantage_and_leave_the_group_mean_alone(tmp_path, tiny):
    def with_none(completions, **kwargs):
        return [None, 1.0, 0.0, 0.5] * (len(completions) // GROUP)

    ours = make_trainer(tmp_path / "rl", tiny, rl={"advantage": "dr_grpo"})
    ours.reward_funcs = [with_none]
    ours.model.train()
    adv = ours._generate_and_score_completions(generation_batch())["advantages"].view(-1, GROUP)
    assert (adv[:, 0] == 0).all()
    torch.testing.assert_close(adv[0, 1:], torch.tensor([0.5, -0.5, 0.0]))  # r - mean(1, 0, 0.5), TRL's nanmean


def test_shaping_applies_to_whole_gathered_groups(tmp_path, tiny):
    """dapo_overlong shaping on lengths (all completions reach max_completion_length=5 or stop earlier): the
    shaped reward logged is the raw one minus the penalty, and advantages come from the shaped rewards."""
    ours = make_trainer(tmp_path / "rl", tiny, rl={"advantage": "dr_grpo", "shaping": [
        {"name": "dapo_overlong", "overlong_buffer_len": 5, "penalty_factor": 10.0}]})
    ours.model.train()
    out = ours._generate_and_score_completions(generation_batch())
    lengths = out["completion_mask"].sum(-1).float()
    shaped = torch.tensor(REWARDS) - 10.0 * (lengths / 5).clamp(0, 1)
    expected = (shaped.view(-1, GROUP) - shaped.view(-1, GROUP).mean(-1, keepdim=True)).view(-1)
    torch.testing.assert_close(out["advantages"], expected, rtol=1e-5, atol=1e-5)
    assert ours._metrics["train"]["rl/shaped_reward/mean"][-1] == pytest.approx(shaped.mean().item(), rel=1e-5)


# --- recipes: method expansion and load-time errors ----------------------------------------------------------


def grpo_recipe(tmp_path: Path, extra: str = "", trainer: str = "") -> Path:
    (tmp_path / "my_rewards.py").write_text(
        "def varied(completions, **kwargs):\n"
        "    return [float(len(c) % 3) for c in completions]\n")
    return write_recipe(tmp_path / "grpo.yaml", f"""
defaults: [base/grpo]
{TINY_MODEL}
data: {{train: {{source: "builtin:arithmetic", task: {{n: 16, digits: 1}}}}}}
rewards: [{{fn: "my_rewards.py:varied"}}]
trainer: {{max_steps: 2, per_device_train_batch_size: 8, logging_steps: 1, num_generations: 4,
          max_completion_length: 6, activation_checkpointing: false{trainer}}}
{extra}
""")


def config_of(*args: str) -> dict:
    import yaml

    result = runner.invoke(app, ["config", *args])
    assert result.exit_code == 0, result.output
    return yaml.safe_load(result.output.split("\n", 1)[1])


def error_of(*args: str) -> str:
    result = runner.invoke(app, ["config", *args])
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    return " ".join(result.output.split())


def test_method_expansion_shows_in_config_and_the_recipe_overrides_one_part(tmp_path):
    recipe = str(grpo_recipe(tmp_path, "method: dapo\nrl: {shaping: [{name: dapo_overlong, overlong_buffer_len: 3}]}"))
    rl = config_of(recipe)["rl"]
    assert rl["advantage"] == {"name": "grpo"} and rl["aggregation"] == {"name": "token_mean"}
    assert rl["policy_loss"] == {"name": "ppo_clip", "epsilon": 0.2, "epsilon_high": 0.28}
    assert rl["shaping"] == [{"name": "dapo_overlong", "overlong_buffer_len": 3}]  # the recipe's list wins
    # same part name: parameter by parameter; another name: the part is replaced whole
    assert config_of(recipe, "rl.policy_loss.epsilon_high=0.3")["rl"]["policy_loss"] == {
        "name": "ppo_clip", "epsilon": 0.2, "epsilon_high": 0.3}
    assert config_of(recipe, "rl.policy_loss={name: cispo}")["rl"]["policy_loss"] == {"name": "cispo"}
    assert config_of(recipe, "method={name: dapo, epsilon_high: 0.35}")["rl"]["policy_loss"]["epsilon_high"] == 0.35
    assert config_of(str(grpo_recipe(tmp_path)))["rl"] is None  # no method, no rl: TRL's own path
    # a key the method set is blamed on the method
    assert "rl.shaping[0].overlong_buffer_len (4096, rl.shaping[0], from method dapo) must lie in 1..max_completion_length (6" \
        in error_of(str(grpo_recipe(tmp_path, "method: dapo")))


def test_at_least_25_methods_each_with_paper_and_loadable_parts():
    from postrain.rl.methods import METHODS, expand_method
    from postrain.rl.section import parse_rl_section

    assert len(METHODS) >= 25
    for variant in METHODS:
        assert variant.paper and variant.arxiv
        args = {"sigma": 0.1} if variant.name == "redit" else {}
        parse_rl_section(expand_method({"name": variant.name, **args})[1])  # every part and parameter registered


@pytest.mark.parametrize("override, expected", [
    ("rl.policy_loss.name=ppo_clipp", "unknown policy loss 'ppo_clipp' (rl.policy_loss, from command line): did you mean 'ppo_clip'"),
    ("rl.policy_loss.epsilonn=0.1", "unknown parameter 'epsilonn' for policy loss 'ppo_clip' (rl.policy_loss, from command line)"),
    ("method=dapoo", "unknown named method 'dapoo'"),
    ("method={name: dapo, eps: 1}", "unknown parameter 'eps' for named method 'dapo'"),
    ("trainer.loss_type=grpo", "trainer.loss_type ('grpo', from command line) conflicts with rl: (from"),
    ("trainer.scale_rewards=batch", "use rl.advantage"),
    ("trainer.top_entropy_quantile=0.2", "high_entropy_tokens"),
    ("trainer.use_liger_kernel=true", "trainer.use_liger_kernel"),
    ("rl.advantage=aapo", "advantage estimator 'aapo' (rl.advantage, from command line) reads `ref_rewards`"),
    ("rl.advantage=spo_tracker", "advantage estimator 'spo_tracker' (rl.advantage, from command line) cannot run "
                                 "in the GRPO trainer: it is single-stream"),
    ("rl.samplers=[spo_prioritized]", "sampler 'spo_prioritized' (rl.samplers[0], from command line) cannot run"),
    ("rl.shaping=[dra_diversity]", "reads `embeddings`"),
    ("rl.shaping=[redit]", "has no default for sigma: set rl.shaping[0].sigma"),
    ("rl.shaping=[dapo_overlong]", "overlong_buffer_len (4096"),
])
def test_load_time_errors_name_the_key_and_why(tmp_path, override, expected):
    recipe = str(grpo_recipe(tmp_path, "method: dapo\nrl: {shaping: [{name: dapo_overlong, overlong_buffer_len: 3}]}"))
    assert expected in error_of(recipe, override)


def test_group_losses_need_whole_groups_per_micro_batch(tmp_path):
    recipe = str(grpo_recipe(tmp_path, "method: gvpo"))
    config_of(recipe)
    assert "must hold whole groups" in error_of(recipe, "trainer.gradient_accumulation_steps=2")


# --- the pin on TRL's source ------------------------------------------------------------------------------------

# sha256 (first 16 hex) of TRL 1.16's source of each GRPOTrainer method postrain overrides or reproduces parts of
# (postrain/trainers/grpo.py says which lines). A new TRL changing one fails here: re-read that method against
# postrain's trainer, then update the digest.
TRL_GRPO_SOURCE = {
    "_calculate_rewards": "736ae29b083840b5",
    "_generate_and_score_completions": "1fa48922792dcd5c",
    "_compute_loss": "80295546bbdbf6f7",
    "_get_per_token_logps_and_entropies": "ea73c3909275851d",
    "get_high_entropy_mask": "ce6e86287bac23d6",
    "_prepare_inputs": "f824e7fb07147956",
    "_save_checkpoint": "ec91bde123649111",
    "_load_optimizer_and_scheduler": "5c1772becdfd7fdb",
    "get_train_dataloader": "2bffe5a57c539e17",
    "_get_train_sampler": "36497afb4d311dc9",
    "_generate_single_turn": "e0f02e4fc094cefd",  # shared prefill wraps its `unwrapped_model.generate` call
}


@pytest.mark.parametrize("method", list(TRL_GRPO_SOURCE))
def test_trl_grpo_methods_postrain_builds_on_are_unchanged(method):
    from trl import GRPOTrainer

    source = inspect.getsource(getattr(GRPOTrainer, method))
    assert hashlib.sha256(source.encode()).hexdigest()[:16] == TRL_GRPO_SOURCE[method], (
        f"TRL's GRPOTrainer.{method} changed: re-check postrain/trainers/grpo.py against it")


# --- end to end -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["dapo", "gvpo", "{name: grpo, beta: 0.04}"])
def test_postrain_grpo_runs_named_methods_and_logs_their_metrics(tmp_path, method):
    recipe = grpo_recipe(tmp_path, f"method: {method}\nrl: {{shaping: [{{name: dapo_overlong, overlong_buffer_len: 3}}]}}"
                         if method == "dapo" else f"method: {method}")
    result = runner.invoke(app, ["grpo", str(recipe), f"output_dir={tmp_path / 'run'}"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in logged if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2]
    assert all({"rl/advantages/mean", "rl/advantages/std", "entropy"} <= m.keys() for m in steps)
    assert any(m["rl/advantages/std"] > 0 for m in steps)  # varied rewards: a real learning signal
    if method == "dapo":
        assert all("rl/shaped_reward/mean" in m and "clip_ratio/high_mean" in m for m in steps)
    if "beta" in method:
        assert all("kl" in m for m in steps)  # the reference model was built for the KL regularizer
