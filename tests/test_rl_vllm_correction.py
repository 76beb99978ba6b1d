"""TRL's vLLM importance-sampling correction on the GRPO `rl:` path (postrain.trainers.grpo).

No vLLM here: the trainer generates with transformers, and `_generate` is wrapped to return, as vLLM would,
per-token sampling log-probs, here the trainer's own minus a known shift per row (one None, as vLLM reports an
unscorable token). TRL's own `_generate_and_score_completions` then computes the ratio pi_old / pi_vllm. The
rl: loss and its gradients are compared with TRL's formula written out below (ratio, policy loss, KL,
aggregation) and, where TRL has the same loss, with TRL's own `_compute_loss` on the same batch.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tests.test_grpo_trainer import (GROUP, REWARDS, SAME_AS_TRL, config_of, error_of, generation_batch, grpo_recipe,
                                     loss_and_grads, make_trainer, tiny)  # noqa: F401  (tiny: the model fixture)

MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
CLIP_MIN, CLIP_MAX = 0.5, 2.0
# Per-row shift of log pi_old - log pi_vllm: rows beyond CLIP_MAX, rows below CLIP_MIN, rows near 1, at token and
# at sequence level (1 to 5 tokens). Each generation round rolls it by one row, so pooled rounds differ.
SHIFTS = torch.tensor([1.2, -0.9, 0.02, 0.3, -0.05, 0.8, -0.3, 0.0, 0.15, -1.4, 0.5, -0.1])
# The one token whose sampling log-prob vLLM could not give (row, token): TRL counts it as no difference.
UNSCORED = (5, 0)


def as_if_vllm(trainer, mode: str, clip_min=CLIP_MIN, clip_max=CLIP_MAX, max_tokens: list[int] | None = None):
    """Turn TRL's vLLM importance-sampling correction on in a trainer built without vLLM: generation stays
    transformers', with sampling log-probs = the trainer's log-probs - SHIFTS (rolled by round), plus noise.
    `max_tokens[k]` cuts round k's completions (a shorter round, so that pooling pads)."""
    generate, rounds = trainer._generate, [0]
    noise = torch.Generator().manual_seed(7)

    def vllm_like(prompts):
        trainer.use_vllm = False  # TRL's transformers generation, then back to "vLLM"
        try:
            out = list(generate(prompts))
        finally:
            trainer.use_vllm = True
        if max_tokens is not None:
            out[1] = [ids[:max_tokens[rounds[0]]] for ids in out[1]]
        shifts = SHIFTS.roll(rounds[0])
        rounds[0] += 1
        sampling = []
        for i, logps in enumerate(trainer_logps(trainer, out[0], out[1])):
            values = (logps - shifts[i] - 0.1 * torch.randn(logps.shape, generator=noise)).tolist()
            if (i, 0) == UNSCORED:
                values[0] = None
            sampling.append(values)
        out[4] = sampling
        return tuple(out)

    trainer._generate = vllm_like
    trainer.use_vllm = True
    trainer.vllm_importance_sampling_correction = True
    trainer.vllm_importance_sampling_mode = mode
    trainer.vllm_importance_sampling_clip_min, trainer.vllm_importance_sampling_clip_max = clip_min, clip_max
    return trainer


def trainer_logps(trainer, prompt_ids: list, completion_ids: list) -> list[torch.Tensor]:
    pad = trainer._tokenizer.pad_token_id
    width_p, width_c = max(map(len, prompt_ids)), max(1, max(map(len, completion_ids)))
    ids = [[pad] * (width_p - len(p)) + list(p) + list(c) + [pad] * (width_c - len(c))
           for p, c in zip(prompt_ids, completion_ids)]
    attention = [[0] * (width_p - len(p)) + [1] * (len(p) + len(c)) + [0] * (width_c - len(c))
                 for p, c in zip(prompt_ids, completion_ids)]
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, torch.tensor(ids),
                                                                 torch.tensor(attention), width_c)
    return [logps[i, :len(c)] for i, c in enumerate(completion_ids)]


def generate(trainer) -> dict:
    """One generation batch (TRL's `_generate_and_score_completions`, the rl: path's advantages). The reference
    model is the starting policy; its log-probs are moved away from it so that a KL term weighs in the loss."""
    trainer.model.train()
    batch = trainer._generate_and_score_completions(generation_batch())
    if "ref_per_token_logps" in batch:
        gen = torch.Generator().manual_seed(5)
        batch["ref_per_token_logps"] = batch["ref_per_token_logps"] + 0.5 * torch.randn(
            batch["ref_per_token_logps"].shape, generator=gen)
    return batch


def move_policy(model, scale: float = 0.03) -> None:
    """A step's worth of change after generation, so pi / pi_old != 1 and the clips act."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def fresh(tiny):
    """The tiny model, copied: the tests move its weights."""
    return copy.deepcopy(tiny[0]), tiny[1]


# --- TRL 1.16's formulas, written out (trl/trainer/grpo_trainer.py) ---------------------------------------------

def reference_ratio(batch: dict, mode: str, clip_min=CLIP_MIN, clip_max=CLIP_MAX):
    """_generate_and_score_completions: (raw ratio, ratio) from pi_old and pi_vllm; NaN differences count 0."""
    mask = batch["completion_mask"].float()
    diff = torch.nan_to_num((batch["old_per_token_logps"] - batch["sampling_per_token_logps"]) * mask, nan=0.0)
    if mode.startswith("sequence_"):
        diff = diff.sum(dim=1, keepdim=True)
    raw = torch.exp(diff)
    if mode.endswith("_truncate"):
        return raw, torch.clamp(raw, min=clip_min, max=clip_max)
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    return raw, torch.where((raw < low) | (raw > high), torch.zeros_like(raw), raw)


# case -> (policy loss, clip (low, high), KL beta, aggregation): SAME_AS_TRL's cases (tests/test_grpo_trainer.py)
REFERENCE = {
    "dapo": ("clip", (0.2, 0.28), 0.0, "token"),
    "grpo_kl": ("clip", (0.2, 0.2), 0.04, "sequence_mean"),
    "gspo": ("sequence_clip", (3e-4, 4e-4), 0.0, "sequence_mean"),
    "cispo": ("cispo", (None, 5.0), 0.0, "token"),
    "dr_grpo": ("clip", (0.2, 0.2), 0.0, "token_sum_norm"),
}


def current_logps(trainer, batch) -> torch.Tensor:
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attention,
                                                             batch["completion_ids"].size(1))
    return logps


def reference_per_token(case: str, logps, batch) -> torch.Tensor:
    """_compute_loss's per-token policy loss (before the vLLM ratio and the KL term)."""
    loss, (low, high), _, _ = REFERENCE[case]
    mask = batch["completion_mask"].float()
    adv = batch["advantages"].unsqueeze(1)
    log_ratio = logps - batch["old_per_token_logps"]
    if loss == "sequence_clip":  # importance_sampling_level="sequence": the mean log-ratio of the sequence
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef = torch.exp(log_ratio)
    if loss == "cispo":
        return -torch.clamp(coef, max=high).detach() * adv * logps
    return -torch.min(coef * adv, torch.clamp(coef, 1 - low, 1 + high) * adv)


def reference_kl(logps, batch) -> torch.Tensor:
    ref = batch["ref_per_token_logps"]
    return torch.exp(ref - logps) - (ref - logps) - 1


def aggregate(case: str, per_token, batch, trainer, weight=None) -> torch.Tensor:
    """TRL's loss_type normalisers (current_gradient_accumulation_steps, steps_per_generation); with row weights
    w_i (a sampler's), each row counted w_i times."""
    mask = batch["completion_mask"].float()
    w = torch.ones(mask.size(0)) if weight is None else weight.float()
    accumulation, spg = trainer.current_gradient_accumulation_steps, trainer.args.steps_per_generation
    aggregation = REFERENCE[case][3]
    if aggregation == "token":  # dapo / cispo: num_items_in_batch, rescaled to one accumulation window
        tokens = (w * mask.sum(-1)).sum()
        return (w.unsqueeze(1) * per_token * mask).sum() / (tokens * accumulation / spg)
    if aggregation == "sequence_mean":  # grpo
        rows = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        return (w * rows).sum() / (w.sum() * accumulation / spg)
    assert weight is None
    return (per_token * mask).sum() / (mask.size(0) * trainer.max_completion_length) / accumulation  # dr_grpo


def reference_loss(case: str, trainer, batch, ratio, weight=None, ratio_after_kl: bool = False):
    logps = current_logps(trainer, batch)
    per_token = reference_per_token(case, logps, batch)
    beta = REFERENCE[case][2]
    if ratio_after_kl:  # the wrong order, to show the test tells them apart
        per_token = (per_token + beta * reference_kl(logps, batch)) * ratio
    else:
        per_token = per_token * ratio
        if beta:
            per_token = per_token + beta * reference_kl(logps, batch)
    return aggregate(case, per_token, batch, trainer, weight)


def reference_loss_and_grads(case: str, trainer, *args, **kwargs):
    trainer.model.zero_grad()
    loss = reference_loss(case, trainer, *args, **kwargs)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in trainer.model.named_parameters() if p.grad is not None}
    trainer.model.zero_grad()
    return loss.detach(), grads


def assert_same(loss, grads, want_loss, want_grads):
    assert loss == pytest.approx(want_loss.item(), rel=1e-5, abs=1e-7)
    assert grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)


def valid(batch) -> torch.Tensor:
    return batch["completion_mask"].bool()


def assert_bounds_act(raw: torch.Tensor, batch) -> None:
    """The batch has ratios above CLIP_MAX, below CLIP_MIN and inside, where it counts."""
    values = raw.flatten() if raw.size(1) == 1 else raw[valid(batch)]
    assert (values > CLIP_MAX).any() and (values < CLIP_MIN).any()
    assert ((values > CLIP_MIN) & (values < CLIP_MAX) & ((values - 1).abs() > 1e-3)).any()


def rl_trainer(tmp_path, tiny, case: str, mode: str, max_tokens: list[int] | None = None, **extra_rl):
    """An rl: trainer with SAME_AS_TRL[case]'s parts (and `extra_rl`), generating as if by vLLM."""
    native_config, rl = SAME_AS_TRL[case]
    trainer = make_trainer(tmp_path / "rl", fresh(tiny), rl={**rl, **extra_rl}, beta=native_config.get("beta", 0.0))
    return as_if_vllm(trainer, mode, max_tokens=max_tokens)


# --- the loss -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ["dapo", "gspo", "cispo", "grpo_kl"])
def test_rl_loss_applies_trls_ratio_as_trls_formula_and_trls_own_loss_do(tmp_path, tiny, case, mode):
    ours = rl_trainer(tmp_path, tiny, case, mode)
    batch = generate(ours)
    raw, ratio = reference_ratio(batch, mode)
    assert ratio.shape == ((12, 1) if mode.startswith("sequence_") else batch["completion_mask"].shape)
    torch.testing.assert_close(batch["importance_sampling_ratio"], ratio)  # TRL computed what its formula says
    assert torch.isnan(batch["sampling_per_token_logps"][UNSCORED])
    assert_bounds_act(raw, batch)
    move_policy(ours.model)

    loss, grads = loss_and_grads(ours, batch)
    want_loss, want_grads = reference_loss_and_grads(case, ours, batch, ratio)
    assert_same(loss, grads, want_loss, want_grads)
    # the correction is in play: without it (ratio 1) the loss is another
    uncorrected = reference_loss(case, ours, batch, torch.ones_like(ratio)).item()
    assert abs(uncorrected - want_loss.item()) > 1e-3 * max(abs(want_loss.item()), 1e-3)
    if case == "grpo_kl":  # the ratio weighs the policy term only, not the KL added after it
        after_kl = reference_loss(case, ours, batch, ratio, ratio_after_kl=True).item()
        assert abs(after_kl - want_loss.item()) > 1e-3 * abs(want_loss.item())

    native_config, _ = SAME_AS_TRL[case]  # TRL's own loss on the same batch and weights
    native = make_trainer(tmp_path / "native", (ours.model, tiny[1]), **native_config)
    native.use_vllm, native.vllm_importance_sampling_correction = True, True
    native.vllm_importance_sampling_mode = mode
    native.vllm_importance_sampling_clip_min, native.vllm_importance_sampling_clip_max = CLIP_MIN, CLIP_MAX
    assert_same(loss, grads, *loss_and_grads(native, {k: v for k, v in batch.items() if not k.startswith("rl_")}))


def test_trls_sampling_metrics_are_logged_on_the_rl_path(tmp_path, tiny):
    ours = rl_trainer(tmp_path, tiny, "dapo", "token_mask")
    batch = generate(ours)
    _, ratio = reference_ratio(batch, "token_mask")
    logged = ours._metrics["train"]
    delta = (batch["old_per_token_logps"] - batch["sampling_per_token_logps"]).abs()[valid(batch)]
    delta = delta[~torch.isnan(delta)]
    assert logged["sampling/sampling_logp_difference/mean"][-1] == pytest.approx(delta.mean().item(), rel=1e-5)
    assert logged["sampling/importance_sampling_ratio/mean"][-1] == pytest.approx(
        ratio[valid(batch)].mean().item(), rel=1e-5)
    assert logged["sampling/importance_sampling_ratio/min"][-1] == 0.0  # masked tokens count in TRL's statistics


@pytest.mark.parametrize("case, mode", [("dapo", "token_truncate"), ("grpo_kl", "sequence_mask"),
                                        ("dr_grpo", "token_mask")])
def test_high_entropy_tokens_and_unbounded_caps_compose(tmp_path, tiny, case, mode):
    """With the entropy mask (a token selector, applied before the ratio as TRL does) and one-sided bounds
    (None = unbounded, TRL's clip_min default)."""
    ours = rl_trainer(tmp_path, tiny, case, mode,
                      regularizers=[*SAME_AS_TRL[case][1].get("regularizers", []),
                                    {"name": "high_entropy_tokens", "top_entropy_quantile": 0.5}])
    low, high = (None, CLIP_MAX) if mode.endswith("truncate") else (CLIP_MIN, None)
    ours.vllm_importance_sampling_clip_min, ours.vllm_importance_sampling_clip_max = low, high
    batch = generate(ours)
    _, ratio = reference_ratio(batch, mode, low, high)
    torch.testing.assert_close(batch["importance_sampling_ratio"], ratio)
    move_policy(ours.model)
    loss, grads = loss_and_grads(ours, batch)

    native_config, _ = SAME_AS_TRL[case]
    native = make_trainer(tmp_path / "native", (ours.model, tiny[1]), top_entropy_quantile=0.5, **native_config)
    native.use_vllm, native.vllm_importance_sampling_correction = True, True
    native.vllm_importance_sampling_mode = mode
    native.vllm_importance_sampling_clip_min, native.vllm_importance_sampling_clip_max = low, high
    assert_same(loss, grads, *loss_and_grads(native, batch))
    without = make_trainer(tmp_path / "plain", (ours.model, tiny[1]), top_entropy_quantile=0.5, **native_config)
    assert loss_and_grads(without, batch)[0] != pytest.approx(loss.item(), rel=1e-3)  # the ratio is in play


# --- with samplers: row weights and DAPO's refill -------------------------------------------------------------


@pytest.mark.parametrize("case, mode", [("dapo", "token_mask"), ("grpo_kl", "sequence_truncate")])
def test_sampler_row_weights_compose_with_the_ratio(tmp_path, tiny, case, mode):
    """PF-PPO's multiplicities (rows drawn 0, 1, 2... times) weigh rows on top of the ratio."""
    ours = rl_trainer(tmp_path, tiny, case, mode, samplers=[{"name": "pf_ppo"}])
    batch = generate(ours)
    weight = batch["rl_weight"]
    assert (weight == 0).any() and (weight > 1).any()  # rows dropped and rows repeated
    _, ratio = reference_ratio(batch, mode)
    torch.testing.assert_close(batch["importance_sampling_ratio"], ratio)
    move_policy(ours.model)
    loss, grads = loss_and_grads(ours, batch)
    assert_same(loss, grads, *reference_loss_and_grads(case, ours, batch, ratio, weight=weight))
    assert reference_loss(case, ours, batch, torch.ones_like(ratio), weight=weight).item() != pytest.approx(
        loss.item(), rel=1e-3)


@pytest.mark.parametrize("mode", ["token_mask", "sequence_truncate"])
def test_dapo_refill_pools_the_ratio_with_its_rows(tmp_path, tiny, mode):
    """dynamic_sampling drops the all-equal group and refills from a second round, whose completions are cut to
    3 tokens: the assembled batch's ratio rows are those of its log-prob rows, padded as TRL pads (ratio 1)."""
    ours = rl_trainer(tmp_path, tiny, "dapo", mode, max_tokens=[5, 3],
                      samplers=[{"name": "dynamic_sampling", "max_num_gen_batches": 2}])
    batch = generate(ours)
    assert ours._metrics["train"]["rl/sampler/gen_batches"][-1] == 2
    mask = batch["completion_mask"]
    assert mask[-GROUP:, 3:].sum() == 0 and mask[:-GROUP, 3:].sum() > 0  # the last group is the second round's
    _, ratio = reference_ratio(batch, mode)
    torch.testing.assert_close(batch["importance_sampling_ratio"], ratio)  # every position, padding included
    assert not torch.allclose(ratio[-GROUP:], ratio[:GROUP])  # the rounds' shifts differ, so misplaced rows show
    move_policy(ours.model)
    loss, grads = loss_and_grads(ours, batch)
    assert_same(loss, grads, *reference_loss_and_grads("dapo", ours, batch, ratio, weight=batch["rl_weight"]))


# --- a loss over whole groups -----------------------------------------------------------------------------------


def reference_gvpo(trainer, batch, ratio, beta: float = 0.1) -> torch.Tensor:
    """GVPO (arXiv 2504.19599) per row, the ratio on each token, TRL's grpo aggregation (seq mean / accumulation)."""
    logps = current_logps(trainer, batch)
    mask = batch["completion_mask"].float()
    rho = (beta * ((logps - batch["old_per_token_logps"]) * mask).sum(-1)).view(-1, GROUP)
    rewards = batch["rl_rewards"].view(-1, GROUP)
    resid = (rho - rho.detach().mean(1, keepdim=True)) - (rewards - rewards.mean(1, keepdim=True))
    per_row = (0.5 * resid ** 2 / (GROUP - 1)).view(-1, 1)
    per_token = per_row * mask * ratio
    return (per_token.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / trainer.current_gradient_accumulation_steps


@pytest.mark.parametrize("mode", ["sequence_mask", "token_truncate"])
def test_group_loss_keeps_each_rows_ratio_when_rows_are_put_back_in_group_order(tmp_path, tiny, mode):
    """gvpo reads whole groups: the trainer restores generation order after TRL's shuffle, the ratio with it."""
    trainer = as_if_vllm(make_trainer(tmp_path, fresh(tiny), rl={"policy_loss": "gvpo",
                                                                 "aggregation": "seq_mean_token_mean"}), mode)
    batch = generate(trainer)
    _, ratio = reference_ratio(batch, mode)
    move_policy(trainer.model)
    shuffled = torch.randperm(len(REWARDS), generator=torch.Generator().manual_seed(1))
    mixed = {k: (v[shuffled] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.size(0) == len(REWARDS) else v)
             for k, v in batch.items()}
    loss, grads = loss_and_grads(trainer, mixed)

    trainer.model.zero_grad()
    want = reference_gvpo(trainer, batch, ratio)
    want.backward()
    want_grads = {k: p.grad.clone() for k, p in trainer.model.named_parameters() if p.grad is not None}
    assert_same(loss, grads, want.detach(), want_grads)
    assert reference_gvpo(trainer, batch, torch.ones_like(ratio)).item() != pytest.approx(loss.item(), rel=1e-3)


# --- load time ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_a_vllm_recipe_with_rl_loads_in_every_mode(tmp_path, mode):
    cfg = config_of(str(grpo_recipe(tmp_path, "method: dapo\nrl: {shaping: [{name: dapo_overlong, "
                                              "overlong_buffer_len: 3}]}",
                                    f", use_vllm: true, vllm_importance_sampling_mode: {mode}")))
    assert cfg["trainer"]["use_vllm"] is True and cfg["rl"]["policy_loss"]["name"] == "ppo_clip"


@pytest.mark.parametrize("override, expected", [
    ("trainer.vllm_importance_sampling_mode=token_clip",
     "trainer.vllm_importance_sampling_mode ('token_clip', from command line) is not a vLLM importance-sampling "
     "mode of TRL: did you mean 'token_mask'? use one of token_truncate, token_mask, sequence_truncate, "
     "sequence_mask"),
    ("trainer.vllm_importance_sampling_clip_max=0.9",
     "trainer.vllm_importance_sampling_clip_max (0.9, from command line) must be > 1 with mode sequence_mask: "
     "a ratio above it zeroes its token or sequence"),
    ("trainer.vllm_importance_sampling_cap=1.0",
     "trainer.vllm_importance_sampling_cap (1.0, from command line) must be > 1 with mode sequence_mask"),
    ("trainer.vllm_importance_sampling_clip_min=1.2",
     "trainer.vllm_importance_sampling_clip_min (1.2, from command line) must lie in [0, 1) with mode "
     "sequence_mask"),
    ("trainer.vllm_importance_sampling_mode=token_truncate trainer.vllm_importance_sampling_clip_max=0.5",
     "trainer.vllm_importance_sampling_clip_max (0.5, from command line) must be >= 1 with mode token_truncate"),
    ("trainer.vllm_importance_sampling_mode=sequence_truncate trainer.vllm_importance_sampling_clip_min=2.0",
     "trainer.vllm_importance_sampling_clip_min (2.0, from command line) must lie in [0, 1] with mode "
     "sequence_truncate"),
    ("trainer.vllm_importance_sampling_mode=token_truncate trainer.vllm_importance_sampling_clip_max=null",
     "trainer.vllm_importance_sampling_clip_min (None, TRL's default) and trainer.vllm_importance_sampling_clip_max "
     "(None, from command line): mode token_truncate clamps the ratio to [clip_min, clip_max], so set at least one"),
    ("trainer.vllm_importance_sampling_mode=token_truncate trainer.vllm_importance_sampling_clip_min=1 "
     "trainer.vllm_importance_sampling_clip_max=1",
     "trainer.vllm_importance_sampling_clip_min (1, from command line) must be below "
     "trainer.vllm_importance_sampling_clip_max (1, from command line)"),
])
def test_bad_vllm_correction_settings_are_refused_naming_the_key(tmp_path, override, expected):
    recipe = str(grpo_recipe(tmp_path, "rl: {}", ", use_vllm: true"))
    assert expected in error_of(recipe, *override.split())


def test_bad_settings_of_a_correction_that_is_off_are_trls_business(tmp_path):
    recipe = str(grpo_recipe(tmp_path, "rl: {}"))
    config_of(recipe, "trainer.vllm_importance_sampling_clip_max=0.9")  # no vLLM
    config_of(recipe, "trainer.use_vllm=true", "trainer.vllm_importance_sampling_correction=false",
              "trainer.vllm_importance_sampling_mode=token_clip")


def test_repo_replay_is_refused_with_the_correction_and_says_why(tmp_path):
    recipe = str(grpo_recipe(tmp_path, "method: repo_replay", ", use_vllm: true"))
    assert ("sampler 'repo_replay' (rl.samplers[0], from method repo_replay) cannot be combined with "
            "trainer.use_vllm") in error_of(recipe)
    assert "the replay buffer stores the trainer's behaviour log-probs of each sample, not vLLM's" in error_of(recipe)
    config_of(recipe, "trainer.vllm_importance_sampling_correction=false")  # the way out the error names


def test_variants_say_which_entries_read_the_behaviour_logps(monkeypatch):
    import json

    from rich.console import Console
    from typer.testing import CliRunner

    from postrain import cli
    from postrain.cli import app

    result = CliRunner().invoke(app, ["variants", "--json"])
    rows = {(r["family"], r["name"]): r for r in json.loads(result.output)}
    for (family, name), row in rows.items():  # the parts: from their signature
        if family != "method":
            assert row["reads_behaviour_logps"] == any(d.split()[0] == "old_logps" for d in row["data"]), name
    assert rows["policy_loss", "ppo_clip"]["reads_behaviour_logps"] is True
    assert rows["policy_loss", "gpg_pg"]["reads_behaviour_logps"] is False
    assert rows["advantage", "reinforce_pp"]["reads_behaviour_logps"] is True
    # a named method: through the parts it expands to (rloo: gpg_pg), unknown while an argument has no default
    assert rows["method", "dapo"]["reads_behaviour_logps"] is True
    assert rows["method", "rloo"]["reads_behaviour_logps"] is False
    assert rows["method", "redit"]["reads_behaviour_logps"] is None
    monkeypatch.setattr(cli, "console", Console(width=250))  # one line per entry
    table = CliRunner().invoke(app, ["variants", "--family", "policy_loss"]).output
    assert "reads old_logps" in table
    cells = [[c.strip() for c in row.split("│")[1:-1]] for row in table.splitlines() if row.count("│") > 5]
    last_column = {c[0]: c[-1] for c in cells if c[0]}  # name -> reads old_logps
    assert last_column["ppo_clip"] == "yes" and last_column["gpg_pg"] == "no"
