"""NFT (policy loss `nft`, named method `nft`) against a reference written from the authors' code, NVlabs/NFT
dp_actor.py DataParallelPPOActor.update_policy (neg_weight >= 0, ratio_type="token") with the group accuracy of
ray_nft_trainer.py compute_dapo_nft_outcome_advantage; the degenerate groups; and the equivalence the authors'
README states: strictly on-policy, normalize=1 matches Dr. GRPO and normalize=2 matches standard GRPO."""

import pytest
import torch

from postrain.errors import RecipeError
from postrain.rl import compute_advantages, policy_loss
from postrain.rl.methods import expand_method
from postrain.rl.registry import AGGREGATIONS, POLICY_LOSSES
from postrain.rl.section import check_rl_section

G, T = 4, 6
# groups of 4: 2/4 correct, 3/4, all wrong, all correct, 1/4
REWARDS = torch.tensor([1, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 1, 0, 0], dtype=torch.float32)
N = REWARDS.numel()
LENGTHS = [6, 4, 0, 5, 3, 6, 2, 6, 5, 1, 6, 3, 4, 6, 2, 5, 6, 3, 6, 1]  # row 2 (a wrong answer) is empty
MIXED_ROWS = torch.tensor([1] * 8 + [0] * 8 + [1] * 4, dtype=torch.bool)  # groups 2 and 3 are all-equal
NORMALIZE = {"dr_grpo": 1, "grpo": 2, "none": 0}  # prompt_weight -> the authors' `normalize`


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = -(torch.rand(N, T, generator=g) * 3.0 + 0.05)
    old = (lp + 0.5 * torch.randn(N, T, generator=g)).clamp(max=-1e-3)
    # the log-ratio cap (10) on a correct and on a wrong answer
    old[0, 1] = lp[0, 1] - 11.0
    old[1, 0] = lp[1, 0] - 12.0
    mask = (torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]).float()
    return lp, old, mask


def dirty(x, mask, garbage):
    return torch.where(mask.bool(), x, torch.full_like(x, garbage))


def authors_loss(lp, old, mask, rewards, *, neg_weight=1.0, normalize=1, clamp_negative=1.0, clamp_positive=0.0):
    """dp_actor.py's per-token pg_losses * response_mask (ratio_type='token'), on clean tensors. correct_rate is the
    group's share of correct answers ((mean of the +-1 scores + 1) / 2 in the authors' code); the groups whose
    answers are all equal never reach the loss there (filter_groups keeps std > 0 only), so their rows are 0."""
    correct_rate = rewards.view(-1, G).mean(1).repeat_interleave(G)[:, None]
    kept = ((correct_rate > 0) & (correct_rate < 1)).float()
    negative_approx_kl = lp - old
    ratio = torch.exp(negative_approx_kl.clamp(max=10.0))
    correct_rate = torch.clamp(correct_rate, min=0.02, max=0.98)
    negative_rate = 1.0 - correct_rate

    def clamp_preserve_grad(x, min_val):
        return x + (torch.clamp(x, min=min_val) - x).detach()

    proxy = (1.0 - correct_rate * ratio) / (1.0 - correct_rate * 1.0)
    negative_loss = -torch.log(clamp_preserve_grad(proxy, abs(clamp_negative)))
    positive_loss = -torch.log(clamp_preserve_grad(ratio, clamp_positive))
    correct_mask = rewards[:, None]
    pg_losses = negative_loss * (1.0 - correct_mask) * neg_weight + correct_mask * positive_loss
    if normalize == 1:
        pg_losses = pg_losses * negative_rate
    elif normalize == 2:
        pg_losses = pg_losses * (negative_rate / correct_rate) ** 0.5
    return pg_losses * mask * kept


def nft_tokens(lp, old, mask, rewards=REWARDS, group_size=G, garbage=float("nan"), **params):
    """postrain's per-token NFT loss with garbage in the padding and the dr_grpo advantage; (loss, grad, metrics)."""
    lp = lp.clone().requires_grad_(True)
    adv = compute_advantages("dr_grpo", rewards, group_size)
    per_tok, metrics = POLICY_LOSSES.call("nft", {"logps": dirty(lp, mask, garbage), "mask": mask, "rewards": rewards,
                                                  "old_logps": dirty(old, mask, garbage), "advantages": adv}, params)
    per_tok.sum().backward()
    return per_tok.detach(), lp.grad, metrics


def grad_of(fn, lp):
    lp = lp.clone().requires_grad_(True)
    out = fn(lp)
    out.sum().backward()
    return out.detach(), lp.grad


# ------------------------------------------------------------------------------------------------- the formula

CASES = [{}, {"prompt_weight": "grpo"}, {"prompt_weight": "none"}, {"negative_weight": 0.5},
         {"negative_weight": 0.0}, {"negative_clamp": 0.5}, {"positive_clamp": 0.8}]


@pytest.mark.parametrize("params", CASES, ids=[str(p) or "defaults" for p in CASES])
def test_matches_the_authors_code_values_and_gradients(params):
    lp, old, mask = batch()
    got, grad, _ = nft_tokens(lp, old, mask, **params)
    kwargs = {"neg_weight": params.get("negative_weight", 1.0),
              "normalize": NORMALIZE[params.get("prompt_weight", "dr_grpo")],
              "clamp_negative": params.get("negative_clamp", 1.0), "clamp_positive": params.get("positive_clamp", 0.0)}
    ref, ref_g = grad_of(lambda x: authors_loss(x, old, mask, REWARDS, **kwargs), lp)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_g, rtol=1e-5, atol=1e-6)


def test_inputs_reach_the_clamps_the_reference_exercises():
    # Without these the comparison above would not test the negative clamp, its log floor or the ratio cap.
    lp, old, mask = batch()
    _, grad, metrics = nft_tokens(lp, old, mask)
    q = REWARDS.view(-1, G).mean(1).repeat_interleave(G)[:, None]
    proxy = (1 - q * torch.exp((lp - old).clamp(max=10.0))) / (1 - q)
    wrong = (MIXED_ROWS & (REWARDS == 0))[:, None] & mask.bool()
    assert bool((wrong & (proxy < 1)).any()) and bool((wrong & (proxy < 0)).any())
    assert metrics["nft/negative_clamped"] > 0 and metrics["nft/ratio_capped"] > 0
    assert grad[0, 1] == 0 and grad[1, 0] == 0  # above the log-ratio cap: no gradient
    assert metrics["nft/mixed_group_fraction"] == pytest.approx(12 / 20)


def test_hand_computed_token():
    # one correct and one wrong answer (r_q = 1/2) with R = 2 on the wrong one's token: the implicit negative
    # ratio (1 - 0.5 * 2) / 0.5 = 0 is floored at c- = 1 (value 0), gradient q R / ((1-q) * 1) * w = 2 * 0.5 = 1
    rewards = torch.tensor([1.0, 0.0])
    lp = torch.log(torch.tensor([[0.4], [0.2]]))
    old = torch.log(torch.tensor([[0.4], [0.1]]))
    loss, grad, _ = nft_tokens(lp, old, torch.ones(2, 1), rewards=rewards, group_size=2)
    torch.testing.assert_close(loss, torch.zeros(2, 1))
    torch.testing.assert_close(grad, torch.tensor([[-0.5], [1.0]]))  # -(1 - q) on the positive, +1 on the negative


# ------------------------------------------------------------------------------------------------- degenerate cases

def test_all_equal_groups_give_nothing_even_off_policy():
    lp, old, mask = batch()
    loss, grad, _ = nft_tokens(lp, old, mask)
    assert loss[~MIXED_ROWS].abs().sum() == 0 and grad[~MIXED_ROWS].abs().sum() == 0
    trained = MIXED_ROWS[:, None] & mask.bool()
    trained[0, 1] = trained[1, 0] = False  # above the log-ratio cap
    assert bool((grad[trained] != 0).all())  # every other valid token of a mixed group is trained


def test_group_of_one_gives_nothing():
    lp, old, mask = batch()
    loss, grad, _ = nft_tokens(lp, old, mask, group_size=1)
    assert loss.abs().sum() == 0 and grad.abs().sum() == 0


def test_empty_completion_and_padding_garbage():
    lp, old, mask = batch()
    clean = nft_tokens(lp, old, mask, garbage=0.0)
    assert clean[0][2].abs().sum() == 0 and clean[1][2].abs().sum() == 0  # the empty row
    for garbage in (float("nan"), float("inf"), float("-inf")):
        loss, grad, _ = nft_tokens(lp, old, mask, garbage=garbage)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        torch.testing.assert_close(loss, clean[0])
        torch.testing.assert_close(grad, clean[1])


def test_ratio_underflow_stays_finite():
    # R = exp(-200) underflows to 0 in float32; -log R is computed in log space (the authors' -log(max(R, 0)) is inf)
    rewards = torch.tensor([1.0, 0.0])
    lp = torch.tensor([[-200.5], [-1.0]])
    old = torch.tensor([[-0.5], [-1.0]])
    loss, grad, _ = nft_tokens(lp, old, torch.ones(2, 1), rewards=rewards, group_size=2)
    assert loss[0, 0] == pytest.approx(0.5 * 200.0) and grad[0, 0] == pytest.approx(-0.5)


# ------------------------------------------------------------------------------------------------- on-policy = GRPO

def _on_policy_grads(advantages_for_ppo, aggregation, **params):
    lp, _, mask = batch()
    adv = compute_advantages("dr_grpo", REWARDS, G)
    agg_params = {"max_completion_length": T} if "max_completion_length" in AGGREGATIONS.get(aggregation).params \
        else {}

    def nft_loss(x):
        return policy_loss("nft", logps=x, old_logps=None, advantages=adv, mask=mask, aggregation=aggregation,
                           aggregation_params=agg_params, rewards=REWARDS, **params)[0]

    def ppo_loss(x):
        return policy_loss("ppo_clip", logps=x, old_logps=None, advantages=advantages_for_ppo, mask=mask,
                           aggregation=aggregation, aggregation_params=agg_params)[0]

    return grad_of(nft_loss, lp)[1], grad_of(ppo_loss, lp)[1]


AGGS = [a for a in AGGREGATIONS.entries]


@pytest.mark.parametrize("aggregation", AGGS)
def test_on_policy_gradient_equals_dr_grpo(aggregation):
    # normalize=1 (prompt weight 1 - r_q): -(1 - r_q) grad log pi on positives, +r_q grad log pi on negatives,
    # i.e. ppo_clip's gradient with Dr. GRPO's advantage r - r_q, factor 1.
    nft_g, ppo_g = _on_policy_grads(compute_advantages("dr_grpo", REWARDS, G), aggregation)
    assert ppo_g.abs().sum() > 0
    torch.testing.assert_close(nft_g, ppo_g, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("aggregation", ["seq_mean_token_mean", "token_mean"])
def test_on_policy_gradient_equals_grpo_with_population_std(aggregation):
    # normalize=2 (weight sqrt((1 - r_q) / r_q)) gives GRPO's z-score with the Bernoulli (population) std
    # sqrt(r_q (1 - r_q)); TRL's grpo advantage uses the unbiased std + 1e-4, a factor sqrt((G - 1) / G) apart.
    groups = REWARDS.view(-1, G)
    mean = groups.mean(1, keepdim=True)
    z = torch.where((mean > 0) & (mean < 1), (groups - mean) / (mean * (1 - mean)).clamp(min=1e-12).sqrt(), 0.0)
    nft_g, ppo_g = _on_policy_grads(z.reshape(-1), aggregation, prompt_weight="grpo")
    torch.testing.assert_close(nft_g, ppo_g, rtol=1e-5, atol=1e-7)
    trl_grpo = compute_advantages("grpo", REWARDS, G)
    _, trl_g = _on_policy_grads(trl_grpo, aggregation)
    assert not torch.allclose(nft_g, trl_g, rtol=1e-3, atol=0)  # the std convention matters


def test_on_policy_gradient_with_uniform_prompt_weight():
    # normalize=0: advantage +1 on positives and -r_q / (1 - r_q) on negatives
    groups = REWARDS.view(-1, G)
    mean = groups.mean(1, keepdim=True).expand_as(groups)
    mixed = (mean > 0) & (mean < 1)
    adv = torch.where(mixed, torch.where(groups == 1, 1.0, -mean / (1 - mean).clamp(min=1e-12)), 0.0).reshape(-1)
    nft_g, ppo_g = _on_policy_grads(adv, "token_mean", prompt_weight="none")
    torch.testing.assert_close(nft_g, ppo_g, rtol=1e-5, atol=1e-7)


def test_off_policy_differs_from_grpo():
    # the equivalence is strictly on-policy: with pi != pi_old the implicit negative policy changes the weights
    lp, old, mask = batch()
    adv = compute_advantages("dr_grpo", REWARDS, G)

    def loss(name, **params):  # a wide PPO clip: the difference is not the clip's
        return lambda x: policy_loss(name, logps=x, old_logps=old, advantages=adv, mask=mask,
                                     aggregation="token_mean", rewards=REWARDS, **params)[0]

    _, nft_g = grad_of(loss("nft"), lp)
    _, ppo_g = grad_of(loss("ppo_clip", epsilon=10.0), lp)
    assert not torch.allclose(nft_g, ppo_g, rtol=1e-2, atol=1e-4)


# ------------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("change, message", [
    ({"rewards": torch.tensor([1.0, 0.5, 0.0, 1.0])}, "binary rewards"),
    ({"advantages": torch.tensor([2.0, -2.0, 0.0, 0.0])}, "rl.advantage: dr_grpo"),
    ({"advantages": torch.zeros(4, T)}, "one advantage per sequence"),
    ({"prompt_weight": "std"}, "prompt_weight must be one of dr_grpo, grpo, none"),
    ({"negative_clamp": 0.0}, "negative_clamp must be > 0"),
    ({"negative_weight": -1.0}, "negative_weight must be >= 0"),
])
def test_runtime_errors(change, message):
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    data = {"logps": torch.zeros(4, T), "old_logps": torch.zeros(4, T), "mask": torch.ones(4, T), "rewards": rewards,
            "advantages": compute_advantages("dr_grpo", rewards, 4)}
    params = {k: v for k, v in change.items() if k not in data}
    data.update({k: v for k, v in change.items() if k in data})
    with pytest.raises(ValueError, match=message):
        POLICY_LOSSES.call("nft", data, params)


# ------------------------------------------------------------------------------------------------- recipe level

def test_metadata():
    v = POLICY_LOSSES.get("nft")
    assert v.arxiv == "2505.18116" and v.extra["catalog"] == "rl:79"
    assert set(v.data) == {"logps", "old_logps", "advantages", "mask", "rewards"}  # no group_size: any split
    assert v.params == {"negative_weight": 1.0, "prompt_weight": "dr_grpo", "negative_clamp": 1.0,
                        "positive_clamp": 0.0, "log_ratio_max": 10.0, "accuracy_clamp": 0.02}


def test_named_method_expands_to_the_authors_setup():
    name, section = expand_method("nft")
    assert section["advantage"] == {"name": "dr_grpo"}
    assert section["policy_loss"] == {"name": "nft", "negative_weight": 1.0, "prompt_weight": "dr_grpo",
                                      "negative_clamp": 1.0}
    assert section["aggregation"] == {"name": "seq_mean_token_sum_norm"}
    assert section["samplers"] == [{"name": "dynamic_sampling", "max_num_gen_batches": 10}]
    # steps_per_generation > 1 is allowed: the loss reads no whole groups
    check_rl_section("grpo", {"rl": section, "trainer": {"steps_per_generation": 16}}, {})


@pytest.mark.parametrize("rl, message", [
    ({"advantage": "grpo", "policy_loss": "nft"}, "set rl.advantage: dr_grpo (now 'grpo'"),
    ({"advantage": "dr_grpo", "policy_loss": "nft", "shaping": [{"name": "dapo_overlong"}]},
     "needs binary 0 / 1 rewards"),
    ({"advantage": "dr_grpo", "policy_loss": {"name": "nft", "prompt_weight": "std"}},
     "rl.policy_loss.prompt_weight ('std'"),
    ({"advantage": "dr_grpo", "policy_loss": {"name": "nft", "negative_clamp": 0}},
     "rl.policy_loss.negative_clamp (0"),
    ({"advantage": "dr_grpo", "policy_loss": {"name": "nft", "accuracy_clamp": 0.5}},
     "rl.policy_loss.accuracy_clamp (0.5"),
])
def test_load_time_errors(rl, message):
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(".", r"\.")):
        check_rl_section("grpo", {"rl": rl, "trainer": {}}, {})


def test_grpo_job_trains_with_method_nft_over_several_micro_batches_per_generation(tmp_path):
    # End to end through the GRPO trainer: binary rewards by completion length, 2 micro-batches per generation
    # (TRL shuffles the rows; the loss needs no whole groups), the loss's metrics logged and a real gradient.
    import json

    from typer.testing import CliRunner

    from postrain.cli import app
    from tests.conftest import TINY, write_recipe

    (tmp_path / "my_rewards.py").write_text(
        "def parity(completions, **kwargs):\n"
        "    return [float(len(c) % 2) for c in completions]\n")
    recipe = write_recipe(tmp_path / "grpo.yaml", f"""
defaults: [base/grpo]
model: {{name_or_path: tiny, dtype: float32, tiny: {json.dumps(TINY)}}}
data: {{train: {{source: "builtin:arithmetic", task: {{n: 16, digits: 1}}}}}}
rewards: [{{fn: "my_rewards.py:parity"}}]
method: nft
trainer: {{max_steps: 2, per_device_train_batch_size: 8, steps_per_generation: 2, logging_steps: 1,
          num_generations: 4, max_completion_length: 6, activation_checkpointing: false}}
""")
    result = CliRunner().invoke(app, ["grpo", str(recipe), f"output_dir={tmp_path / 'run'}"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in logged if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2]
    assert all({"nft/mixed_group_fraction", "nft/negative_clamped", "ratio/mean"} <= m.keys() for m in steps)
    assert any(m["nft/mixed_group_fraction"] > 0 and m["grad_norm"] > 0 for m in steps)
