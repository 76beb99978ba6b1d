"""The DPO trainer's state for β-DPO (margin statistics, selection) and Group Robust PO (group weights): the loss on a
fixed batch equals the registry entry called with state computed by hand from a plain forward; the state evolves as
the formulas say; a resumed run equals the uninterrupted one; two processes agree with one; bad settings and data
fail at load / data time; the TRL / transformers methods the checkpoint hooks rely on are pinned."""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from postrain.errors import DataError, RecipeError
from postrain.trainers.dpo_state import SEED_STRIDE, STATE_FILE, BetaDPOState, DPOLossState, GroupRobustState
from tests.conftest import TINY, source_digest

# The CLI, TRL and the trainer are imported inside the tests that use them: the two-process test's workers import
# this module, and should not spend their time importing TRL.
TINY_SPEC = {"name_or_path": "tiny", "dtype": "float32", "tiny": TINY}
TINY_MODEL = "model: {name_or_path: tiny, dtype: float32, tiny: %s}\n" % json.dumps(TINY)
GROUPS = ("north", "south", "west")


def invoke(*args):
    from typer.testing import CliRunner

    from postrain.cli import app

    return CliRunner().invoke(app, list(args))


def make_trainer(losses, dataset=None, ref_seed: int = 5, **config):
    """A PostrainDPOTrainer on the tiny model against another tiny model (seed `ref_seed`) as the reference, so the
    margins are not all zero (tests.test_dpo_trainer.make_trainer, with every DPOConfig option open)."""
    import datasets
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import DPOConfig

    from postrain.data.tasks import arithmetic
    from postrain.models.loading import load_model
    from postrain.trainers.dpo import PostrainDPOTrainer

    model, tokenizer, _ = load_model(TINY_SPEC)
    ref = load_model({**TINY_SPEC, "tiny": {**TINY, "seed": ref_seed}})[0]
    if dataset is None:
        dataset = datasets.Dataset.from_list(arithmetic(n=8, digits=1))
    options = {"per_device_train_batch_size": 8, "logging_steps": 1, "report_to": "none", "bf16": False,
               "max_length": 32, "save_strategy": "no", **config}
    args = DPOConfig(**{**options, "output_dir": str(options["output_dir"])})
    trainer = PostrainDPOTrainer(model=model, ref_model=ref, args=args, train_dataset=dataset,
                                 processing_class=tokenizer, losses=losses)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


def grouped_rows(n: int = 8, groups=GROUPS) -> list[dict]:
    from postrain.data.tasks import arithmetic

    rows = arithmetic(n=n, digits=1)
    # uneven groups (north 4 of 8, south 2, west 2 at n=8), so the fractions are not uniform
    return [{**row, "group": groups[0] if i % 2 == 0 else groups[1 + (i // 2) % 2]} for i, row in enumerate(rows)]


def grouped_dataset(n: int = 8):
    import datasets

    return datasets.Dataset.from_list(grouped_rows(n))


def first_batch(trainer):
    trainer.model.train()
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def plain_margins(trainer, batch) -> torch.Tensor:
    """Δ = (ℓ_w − ℓ_ref,w) − (ℓ_l − ℓ_ref,l) from plain forwards (logits, log-softmax, completion mask), not the
    trainer's fused head."""
    def logps(model):
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        tokens = torch.log_softmax(logits.float(), -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
        summed = (tokens * batch["completion_mask"][:, 1:]).sum(-1)
        return summed.chunk(2)

    (pw, pl), (rw, rl) = logps(trainer.model), logps(trainer.ref_model)
    return (pw - rw) - (pl - rl)


def entry_args(trainer, batch) -> dict:
    """The summed log-probs the entry is called with (the trainer's own forward, checked against the plain one)."""
    from postrain.trainers.dpo import PAIR_COLUMNS

    inputs = {k: v for k, v in batch.items() if k not in PAIR_COLUMNS and k != "group_ids"}
    with torch.no_grad():
        _, tokens, mask, _ = trainer._policy_forward(trainer.model, inputs)
        ref = trainer._reference_token_logps(inputs, mask.size(1))
    chosen, rejected = tokens.sum(1).chunk(2)
    ref_chosen, ref_rejected = ref.sum(1).chunk(2)
    return {"chosen_logps": chosen, "rejected_logps": rejected, "ref_chosen_logps": ref_chosen,
            "ref_rejected_logps": ref_rejected}


def hand_mask(margins, m0, s0, seed, draw, keep) -> torch.Tensor:
    weights = torch.exp(-0.5 * ((margins.double() - m0) / s0) ** 2)
    index = torch.multinomial(weights, keep, replacement=False,
                              generator=torch.Generator().manual_seed(seed * SEED_STRIDE + draw))
    return torch.zeros(margins.numel()).index_fill_(0, index, 1.0)


# --- β-DPO -----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def beta_trainer(tmp_path_factory):
    return make_trainer([{"name": "beta_dpo", "rho": 0.25}], output_dir=tmp_path_factory.mktemp("beta"), seed=3)


def test_beta_dpo_loss_is_the_entry_with_the_state_computed_by_hand(beta_trainer):
    from postrain.preference.pairwise_variants import beta_dpo

    trainer = beta_trainer
    trainer.loss_state.states["beta_dpo"].load_state_dict({"margin_ema_mean": 0.0, "margin_ema_std": 0.0, "draws": 0})
    batch = first_batch(trainer)
    margins = plain_margins(trainer, batch)
    assert margins.abs().min() > 1e-3 and margins.std() > 1e-2  # a reference other than the policy: real margins
    args = entry_args(trainer, batch)
    assert torch.allclose((args["chosen_logps"] - args["ref_chosen_logps"])
                          - (args["rejected_logps"] - args["ref_rejected_logps"]), margins, atol=1e-4)

    m0, s0 = 0.1 * margins.double().mean().item(), 0.1 * margins.double().std().item()  # EMA from 0, momentum 0.9
    mask = hand_mask(margins, m0, s0, seed=3, draw=0, keep=6)  # (1 − 0.25)·8 pairs
    expected = beta_dpo(**args, margin_ema_mean=torch.tensor(m0), margin_ema_std=torch.tensor(s0),
                        selection_mask=mask).mean()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    state = trainer.loss_state.states["beta_dpo"]
    assert (state.margin_ema_mean, state.margin_ema_std, state.draws) == (pytest.approx(m0, rel=1e-5),
                                                                         pytest.approx(s0, rel=1e-5), 1)
    # the mask matters: with every pair kept, the loss is another number
    all_kept = beta_dpo(**args, margin_ema_mean=torch.tensor(m0), margin_ema_std=torch.tensor(s0)).mean()
    assert abs(all_kept.item() - loss.item()) > 1e-6
    # logged: M0, σ0 and β_b (β·(1 + α(mean of the selected Δ − M0)), α 0.6)
    logged = trainer._metrics["train"]
    beta_b = 0.1 * (1 + 0.6 * ((margins.double() * mask).sum() / mask.sum() - m0)).item()
    assert logged["beta_dpo/margin_ema_mean"][-1] == pytest.approx(m0, rel=1e-5)
    assert logged["beta_dpo/margin_ema_std"][-1] == pytest.approx(s0, rel=1e-5)
    assert logged["beta_dpo/beta"][-1] == pytest.approx(max(beta_b, 1e-3), rel=1e-4)


def test_beta_dpo_state_evolves_over_two_steps_as_the_ema(beta_trainer):
    trainer = beta_trainer
    state = trainer.loss_state.states["beta_dpo"]
    state.load_state_dict({"margin_ema_mean": 0.0, "margin_ema_std": 0.0, "draws": 0})
    batches = iter(trainer.get_train_dataloader())
    trainer.model.train()
    b1 = trainer._prepare_inputs(next(batches))
    m1 = plain_margins(trainer, b1).double()
    with torch.no_grad():
        trainer.compute_loss(trainer.model, b1)
    b2 = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))  # the one batch of the next epoch
    with torch.no_grad():
        trainer.compute_loss(trainer.model, b2)
    m2 = plain_margins(trainer, b2).double()
    mean1, std1 = 0.1 * m1.mean().item(), 0.1 * m1.std().item()
    mean2, std2 = 0.9 * mean1 + 0.1 * m2.mean().item(), 0.9 * std1 + 0.1 * m2.std().item()
    assert state.margin_ema_mean == pytest.approx(mean2, rel=1e-5)
    assert state.margin_ema_std == pytest.approx(std2, rel=1e-5)
    assert state.draws == 2
    assert state.margin_ema_mean != pytest.approx(mean1, rel=1e-3)  # the second step moved it


def test_evaluation_reads_the_state_without_changing_it(beta_trainer):
    trainer = beta_trainer
    state = trainer.loss_state.states["beta_dpo"]
    state.load_state_dict({"margin_ema_mean": 0.5, "margin_ema_std": 2.0, "draws": 7})
    batch = first_batch(trainer)
    trainer.model.eval()
    try:
        with torch.no_grad():
            trainer.compute_loss(trainer.model, batch)
    finally:
        trainer.model.train()
    assert state.state_dict() == {"margin_ema_mean": 0.5, "margin_ema_std": 2.0, "draws": 7}


def test_selection_weights_follow_the_gaussian_and_survive_a_zero_std():
    state = BetaDPOState(rho=0.5, seed=0)
    state.margin_ema_mean, state.margin_ema_std = 0.0, 0.3
    margins = torch.tensor([0.0, 0.1, 5.0, 6.0])  # two near M0, two many σ0 away
    picks = torch.stack([state.draw_mask(margins) for _ in range(50)])
    assert picks.sum(1).eq(2).all() and picks[:, :2].eq(1).all()  # always the two near ones
    state.margin_ema_std = 0.0  # all margins equal at step 0 (reference = policy): uniform, no 0/0
    uniform = torch.stack([state.draw_mask(torch.zeros(4)) for _ in range(200)]).mean(0)
    assert torch.all((uniform - 0.5).abs() < 0.15)


# --- Group Robust PO ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def group_trainer(tmp_path_factory):
    # GR-DPO (ipo false) with a large β and η, so that one update moves the weights visibly
    return make_trainer([{"name": "group_robust_po", "group_column": "group", "step_size": 1.0, "ipo": False,
                          "beta": 0.5}],
                        dataset=grouped_dataset(), output_dir=tmp_path_factory.mktemp("group"))


@pytest.mark.parametrize("fractions", [True, False])
def test_group_robust_po_loss_is_the_entry_with_weights_computed_by_hand(group_trainer, fractions):
    from postrain.preference.listwise import group_robust_po

    trainer = group_trainer
    state = trainer.loss_state.states["group_robust_po"]
    state.use_fractions = fractions
    state.weights = [1 / 3] * 3  # the authors' start: uniform
    assert state.groups == sorted(GROUPS) and state.fractions == [0.5, 0.25, 0.25]  # north 4, south 2, west 2
    batch = first_batch(trainer)
    margins = plain_margins(trainer, batch).double()
    group_of = {g: i for i, g in enumerate(sorted(GROUPS))}
    rows = {r["prompt"]: group_of[r["group"]] for r in grouped_rows()}
    assert batch["group_ids"].tolist() == [rows[p] for p in _prompts(trainer, batch)]
    losses = -F.logsigmoid(0.5 * margins)  # GR-DPO, β 0.5
    onehot = F.one_hot(batch["group_ids"], 3).double()
    p = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    group_loss = onehot.T @ losses / p if fractions else onehot.T @ losses / onehot.sum(0).clamp(min=1)
    alpha = torch.tensor([1 / 3] * 3, dtype=torch.float64) * torch.exp(1.0 * group_loss)
    alpha = alpha / alpha.sum()  # updated BEFORE the loss (authors' compute_robust_loss)
    assert alpha.max() - alpha.min() > 0.02  # the update moved the weights
    extra = {"group_fractions": p.float()} if fractions else {}
    expected = group_robust_po(**entry_args(trainer, batch), group_ids=batch["group_ids"],
                               group_weights=alpha.float(), beta=0.5, ipo=False, **extra).mean()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert state.weights == pytest.approx(alpha.tolist(), rel=1e-4)  # float32 forwards: fused head vs plain
    logged = trainer._metrics["train"]
    weights = [logged[f"group_robust_po/group_weight/{g}"][-1] for g in sorted(GROUPS)]
    assert weights == pytest.approx(alpha.tolist(), rel=1e-4)


def _prompts(trainer, batch) -> list[str]:
    """The prompts of a batch's chosen rows, decoded (the text before the completion)."""
    ids, mask = batch["input_ids"].chunk(2)[0], batch["completion_mask"].chunk(2)[0]
    tok = trainer.processing_class
    return [tok.decode(row[(m == 0) & (a == 1)]) for row, m, a in zip(ids, mask, batch["attention_mask"].chunk(2)[0])]


def test_group_weights_over_two_steps_in_log_space():
    state = GroupRobustState(["a", "b"], [3, 1], step_size=0.5, group_fractions=False, beta=0.1, ipo=False)
    margins, groups = torch.tensor([1.0, -1.0, 0.0, 2.0]), torch.tensor([0, 0, 1, 1])
    losses = -F.logsigmoid(0.1 * margins.double())
    state.update(margins, groups)
    state.update(margins, groups)
    g = torch.stack([losses[:2].mean(), losses[2:].mean()])
    expected = torch.softmax(torch.log(torch.tensor([0.5, 0.5], dtype=torch.float64)) + 2 * 0.5 * g, 0)
    assert state.weights == pytest.approx(expected.tolist(), rel=1e-9)
    big = GroupRobustState(["a", "b"], [1, 1], step_size=1.0, beta=0.01)  # IPO losses ~2500 / p: exp overflows
    big.update(torch.tensor([0.0, 50.0]), torch.tensor([0, 1]))  # IPO losses 2500 and 0
    assert all(math.isfinite(w) for w in big.weights) and big.weights[0] == pytest.approx(1.0)


# --- resume ------------------------------------------------------------------------------------------------------


def test_resumed_run_equals_the_uninterrupted_one(tmp_path):
    losses = [{"name": "beta_dpo", "rho": 0.25}, {"name": "group_robust_po", "group_column": "group",
                                                 "step_size": 1e-4}]
    common = dict(dataset=grouped_dataset(16), seed=4, max_steps=4, save_strategy="steps", save_steps=2,
                  learning_rate=1e-3, lr_scheduler_type="constant", per_device_train_batch_size=4)
    whole = make_trainer(losses, output_dir=tmp_path / "whole", **common)
    whole.train()
    saved = json.loads((tmp_path / "whole" / "checkpoint-4" / STATE_FILE).read_text())
    at_two = json.loads((tmp_path / "whole" / "checkpoint-2" / STATE_FILE).read_text())
    assert saved["beta_dpo"]["draws"] == 4 and at_two["beta_dpo"]["draws"] == 2
    assert saved != at_two

    resumed = make_trainer(losses, output_dir=tmp_path / "resumed", **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"))
    state = resumed.loss_state.state_dict()
    assert state["beta_dpo"]["draws"] == 4
    for key in ("margin_ema_mean", "margin_ema_std"):
        assert state["beta_dpo"][key] == pytest.approx(saved["beta_dpo"][key], rel=1e-5)
    assert state["group_robust_po"]["weights"] == pytest.approx(saved["group_robust_po"]["weights"], rel=1e-5)

    def step_losses(trainer):
        return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}

    assert step_losses(resumed)[4] == pytest.approx(step_losses(whole)[4], rel=1e-5)
    assert json.loads((tmp_path / "resumed" / "checkpoint-4" / STATE_FILE).read_text()).keys() == saved.keys()


def test_resume_from_a_checkpoint_without_the_state_is_refused(tmp_path):
    state = DPOLossState([], [])
    state.states["beta_dpo"] = BetaDPOState()
    with pytest.raises(RuntimeError, match=f"{STATE_FILE} is missing"):
        state.load(str(tmp_path))


# --- two processes --------------------------------------------------------------------------------------------------


class _Accelerator:
    def __init__(self, rank: int, world: int):
        self.process_index, self.world = rank, world

    def gather(self, x):
        import torch.distributed as dist

        if self.world == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)


class _Trainer:
    def __init__(self, rank: int, world: int):
        from collections import defaultdict

        self.accelerator = _Accelerator(rank, world)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}


def _split_data(rank: int, world: int):
    """A fixed batch of 8 pairs (margins, groups), this process's slice."""
    g = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(8, generator=g) * 3, torch.randn(8, generator=g) * 3
    groups = torch.tensor([0, 1, 0, 2, 1, 0, 2, 0])
    n = 8 // world
    part = slice(rank * n, (rank + 1) * n)
    data = {"chosen_logps": chosen[part], "rejected_logps": rejected[part], "ref_chosen_logps": torch.zeros(n),
            "ref_rejected_logps": torch.zeros(n)}
    return data, groups[part]


class _Term:
    """A parsed loss term as DPOLossState reads it (parse_losses would import TRL in each worker)."""

    def __init__(self, name: str, state: dict, defaults: dict):
        from types import SimpleNamespace

        self.name, self.state, self.params, self.variant = name, state, {}, SimpleNamespace(params=defaults)


class _Rows(dict):
    """A map-style dataset of columns, as DPOLossState reads one."""

    column_names = property(lambda self: list(self))

    def __len__(self) -> int:
        return len(next(iter(self.values())))


def _states(rank: int, world: int) -> list[dict]:
    """Three training steps of both states on this process's slice; the state and data seen each step."""
    terms = [_Term("beta_dpo", {"momentum": 0.9, "rho": 0.25}, {"beta": 0.1, "alpha": 0.6}),
             _Term("group_robust_po", {"group_column": "group", "step_size": 1e-3, "group_fractions": True},
                   {"beta": 0.01, "ipo": True})]
    train = _Rows(group=[0, 1, 0, 2, 1, 0, 2, 0])
    state = DPOLossState(terms, ["beta_dpo", "group_robust_po"], train, seed=11)
    trainer, out = _Trainer(rank, world), []
    for _ in range(3):
        data, groups = _split_data(rank, world)
        beta = state.term_data(trainer, "train", "beta_dpo", terms[0], data, {})
        group = state.term_data(trainer, "train", "group_robust_po", terms[1], data, {"group_ids": groups})
        out.append({"state": json.loads(json.dumps(state.state_dict())), "mask": beta["selection_mask"].tolist(),
                    "weights": group["group_weights"].tolist()})
    return out


def _worker(rank: int, world: int, port: int, path: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.save(_states(rank, world), f"{path}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_processes_keep_the_one_process_state_and_take_their_slice_of_the_mask(tmp_path):
    import torch.multiprocessing as mp

    from postrain.trainers.dpo import parse_losses

    parsed = parse_losses([{"name": "beta_dpo", "rho": 0.25}, {"name": "group_robust_po", "group_column": "group",
                                                               "step_size": 1e-3}])
    stand_ins = [_Term("beta_dpo", {"momentum": 0.9, "rho": 0.25}, {"beta": 0.1, "alpha": 0.6}),
                 _Term("group_robust_po", {"group_column": "group", "step_size": 1e-3, "group_fractions": True},
                       {"beta": 0.01, "ipo": True})]
    for term, stand_in in zip(parsed, stand_ins):  # the workers' stand-in terms are the parsed ones
        assert (term.name, term.state) == (stand_in.name, stand_in.state)
        assert {k: term.variant.params[k] for k in stand_in.variant.params} == stand_in.variant.params

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path / "out")), nprocs=2, join=True)
    one = _states(0, 1)
    split = [torch.load(tmp_path / f"out.{r}") for r in range(2)]
    for step, alone in enumerate(one):
        for r in range(2):
            assert split[r][step]["state"] == alone["state"]  # identical on every process, equal to one process
            assert split[r][step]["weights"] == pytest.approx(alone["weights"])
        assert split[0][step]["mask"] + split[1][step]["mask"] == alone["mask"]  # the slices of one draw
        assert sum(alone["mask"]) == 6


# --- load time and data time ---------------------------------------------------------------------------------------


def dpo_recipe(tmp_path: Path, extra: str) -> Path:
    from tests.conftest import write_recipe

    return write_recipe(tmp_path / "dpo.yaml", f"defaults: [base/dpo]\n{TINY_MODEL}{extra}\n")


@pytest.mark.parametrize("extra,message", [
    ("loss: [{name: group_robust_po}]", r"'group_robust_po' needs `group_column:`"),
    ("loss: [{name: group_robust_po, group_column: g, step_size: -1}]", r"loss\[0\].step_size must be a number >= 0"),
    ("loss: [{name: group_robust_po, group_column: g, group_fractions: 2}]", r"loss\[0\].group_fractions must be"),
    ("loss: [{name: beta_dpo, rho: 1.0}]", r"loss\[0\].rho must be a number in \[0, 1\)"),
    ("loss: [{name: beta_dpo, momentum: 1.5}]", r"loss\[0\].momentum must be a number in \[0, 1\)"),
    ("loss: [{name: beta_dpo}]\ntrainer: {per_device_train_batch_size: 1}",
     r"per_device_train_batch_size=1 with 'beta_dpo' \(loss\[0\]\): σ0 .* at least 2 pairs"),
    ("loss: [{name: beta_dpo, rhoo: 0.1}]", r"unknown parameter 'rhoo' for preference loss 'beta_dpo'"),
])
def test_bad_state_settings_fail_at_load_time(tmp_path, monkeypatch, extra, message):
    import postrain.models.loading as loading
    from postrain.jobs import load_recipe

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(RecipeError, match=message):
        load_recipe(dpo_recipe(tmp_path, extra))


def test_state_settings_are_not_passed_to_the_loss(tmp_path):
    from postrain.jobs import load_recipe
    from postrain.trainers.dpo import parse_losses

    recipe = load_recipe(dpo_recipe(tmp_path, "loss: [{name: beta_dpo, rho: 0.1, alpha: 0.5}]"))
    (term,) = parse_losses(recipe.cfg["loss"], recipe.cfg["trainer"])
    assert term.params == {"alpha": 0.5} and term.state == {"momentum": 0.9, "rho": 0.1}


def _pairs_file(tmp_path: Path, rows: list[dict]) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("column,values,message", [
    ("country", None, r"reads each pair's group from the column 'country' \(its `group_column:`\), which the "
                      r"dataset lacks"),
    ("group", [1.5] * 8, r"the group column 'group' must hold strings or integers"),
])
def test_bad_group_column_fails_at_data_time_before_writing(tmp_path, column, values, message):
    rows = grouped_rows()
    if values is not None:
        rows = [{**r, "group": v} for r, v in zip(rows, values)]
    recipe = dpo_recipe(tmp_path, f"""data: {{train: {{source: "{_pairs_file(tmp_path, rows)}"}}}}
loss: [{{name: group_robust_po, group_column: {column}}}]""")
    result = invoke("dpo", str(recipe), f"output_dir={tmp_path / 'run'}")
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert __import__("re").search(message, " ".join(result.output.split())), result.output
    assert not (tmp_path / "run" / "model").exists()


def test_eval_groups_the_training_set_lacks_are_refused():
    import datasets

    eval_rows = [{**r, "group": "east"} for r in grouped_rows(4)]
    with pytest.raises(DataError, match=r"groups the training set lacks \('east'\)"):
        DPOLossState(_group_terms(), ["group_robust_po"], grouped_dataset(), datasets.Dataset.from_list(eval_rows))


def _group_terms():
    from postrain.trainers.dpo import parse_losses

    return parse_losses([{"name": "group_robust_po", "group_column": "group"}])


def test_beta_dpo_recipe_runs_and_logs_its_state(tmp_path):
    recipe = dpo_recipe(tmp_path, """data: {train: {source: "builtin:arithmetic", task: {n: 8, digits: 1}}}
trainer: {max_steps: 2, per_device_train_batch_size: 4, logging_steps: 1, max_length: 32}
loss: [{name: beta_dpo}]""")
    result = invoke("dpo", str(recipe), f"output_dir={tmp_path / 'run'}")
    assert result.exit_code == 0, result.output + repr(result.exception)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in logged if "beta_dpo/margin_ema_mean" in m]
    assert [m["step"] for m in steps] == [1, 2] and all("beta_dpo/beta" in m for m in steps)


# --- pins ------------------------------------------------------------------------------------------------------------

# sha256 of the methods the checkpoint hooks of postrain.trainers.dpo extend (no code copied): TRL 1.16's
# DPOTrainer._save_checkpoint (writes the model card, then Trainer's), transformers' Trainer._save_checkpoint (writes
# <output_dir>/checkpoint-<global_step>, where dpo_state.json goes) and Trainer._load_optimizer_and_scheduler (called
# with the checkpoint on resume, where dpo_state.json is read). A change fails here: re-check dpo_state.py.
SOURCE = {
    "trl.trainer.dpo_trainer:DPOTrainer._save_checkpoint":
        "b6ee0a370c266b6f6ada183d32719e4f689ac7a54086c1ec40a69a79e79921c6",
    "transformers.trainer:Trainer._save_checkpoint": "a9111e30faa9933986e022e56b5af81fd990356db64d727b4c320c852283bf3b",
    "transformers.trainer:Trainer._load_optimizer_and_scheduler":
        "741032f57d6fb80211506bf521f67bdd0ff876ad39cc50e700c9c2bab2efb251",
}


@pytest.mark.parametrize("reference", list(SOURCE))
def test_checkpoint_methods_the_state_hooks_extend_are_unchanged(reference):
    qualname = reference.partition(":")[2]
    digest = source_digest(reference)
    assert digest == SOURCE[reference], f"{qualname} changed: re-check postrain/trainers/dpo_state.py"
