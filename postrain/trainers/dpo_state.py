"""Trainer state of preference losses whose inputs are not functions of one batch: β-DPO and Group Robust PO.

The registry entries are pure (postrain.preference): `beta_dpo` reads the running margin statistics M0, σ0 and a
selection mask, `group_robust_po` the adversary's group weights α and each pair's group. The DPO trainer
(postrain.trainers.dpo) keeps that state here, updates it from every training batch BEFORE calling the loss (as
both authors' trainers do), saves it beside each checkpoint as `dpo_state.json` and reads it back on `--resume`.

Recipe syntax: the state's settings sit in the loss entry, next to the loss's own hyperparameters; the trainer
takes them out before the entry is called, and they are checked when the recipe loads (the settings and their
defaults are the entry's `state_settings=`; postrain.preference.section.split_settings):

  loss: [{name: beta_dpo, beta: 0.1, alpha: 0.6, rho: 0.2, momentum: 0.9}]
  loss: [{name: group_robust_po, beta: 0.01, ipo: true, group_column: group, step_size: 0.01, group_fractions: true}]

β-DPO (arXiv 2407.08639). Checked against the authors' code, github:junkangwu/beta-DPO at 1629047, trainers.py:
  - `update_and_sync_tensor_mean(gap, loss, gamma=0.9)`: gap_mean ← 0.9·gap_mean + 0.1·mean(Δ), gap_std ←
    0.9·gap_std + 0.1·std(Δ) (torch's std: Bessel-corrected), both started at 0 (`torch.zeros(1)` in __init__),
    over the all-gathered batch of detached Δ = (ℓ_w − ℓ_ref,w) − (ℓ_l − ℓ_ref,l); called in
    `get_batch_metrics` BEFORE `preference_loss`, so the current batch is already in M0 and σ0; once per
    micro-batch (each gradient-accumulation micro-batch is one call), as here (`_compute_loss` is per micro-batch).
  - `preference_loss(mode_loss="beta_DPO")`: weights exp(−½((Δ − M0)/σ0)²) over the gathered batch,
    `torch.multinomial(weights, int(N·(1 − mode_weight)), replacement=False)`, the 0/1 mask over the gathered
    batch, each process takes its slice `[rank·B:(rank+1)·B]`; β_b = β·(1 + a·(mean of the selected Δ − M0)),
    clamped at 1e-3, detached; loss = Σ mask·ℓ / Σ mask. README: mode_weight (ρ) 0.2, a 0.6, β 0.1.
  Differences: (1) the authors also update M0, σ0 (and draw masks) on evaluation batches; here evaluation reads the
  state without changing it and keeps every pair, so a run's training does not depend on its eval schedule.
  (2) With several processes β_b is the whole gathered selection's, as the authors', and each process' loss is
  divided by the gathered batch's selected fraction (not its own), so that a batch split over processes trains
  as it would on one process (tests/test_launch.py). (3) The authors' σ0 is 0 on a batch whose margins are all equal (step 0
  with the reference a copy of the policy), where their weights are 0/0; here a pair at M0 weighs 1, one off it
  0, and every weight is floored at 1e-300 so that `multinomial` can always draw (equal weights: uniform).
  The mask is drawn on CPU from a generator seeded with (trainer seed, number of draws so far): the same on every
  process, and a resumed run draws what the uninterrupted one would.

Group Robust PO (arXiv 2405.20304). Checked against the authors' code, github:rsshyam/Group-robust-preference-
optimization at e4d611e, src/trainers/grouptrainer.py (the same in grouptrainerearlystop.py):
  - `set_adjustments_impsamp`: α starts uniform, 1/G (importance_sampling False, their default);
    `group_counts` / `total_count`: each group's number of rows in the TRAINING set.
  - `compute_group_metric(losses, group_idx, divide_by_totalcount)`: with divide_by_totalcount (True in
    config/loss/ripo.yaml and rdpo.yaml, and in scripts/run_multi_robust.sh) L_g = N·Σ_{i∈g} ℓ_i / N_g
    = Σ_{i∈g} ℓ_i / p_g; without it the mean loss of the group's pairs in the batch (0 for an absent group).
  - `compute_robust_loss(group_loss)`: α ← α·exp(η·L_g) (detached), α ← α/Σα, THEN robust loss = L·α with the
    new α: the update comes before the loss. η = `step_size` (0.01 in config/loss/ripo.yaml; the paper's LLM
    script scripts/run_multi_robust.sh uses 5e-7 with IPO losses). adj (0) and normalize_loss (False) are
    inactive by default and not implemented; neither are importance_sampling and adaptive_step_size (η scaled with
    the learning rate when ReduceLROnPlateau lowers it).
  Here ℓ_i is the entry's own per-pair loss (IPO or DPO with the entry's β), L_g is computed over the all-gathered
  batch (identical on every process; with one process equal to the authors' per-process batch), in float64 and in
  log space (α·exp(ηL) overflows float32 for IPO's large losses), and only on training batches.
  `group_fractions: true` (the authors' divide_by_totalcount) passes p_g = N_g/N from the training set to the
  entry, whose batch loss is then the authors' L·α divided by the batch size (a constant factor); without it the
  entry gets the gathered batch's pairs per group (`group_counts`), so that L_g of a batch split over processes is
  the whole batch's group mean.
  Groups are the distinct values of the recipe's `group_column` in the training set (strings or integers), in
  sorted order; an evaluation row with a group the training set lacks is refused when the trainer is built.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import torch
import torch.nn.functional as F
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from postrain.errors import DataError, RecipeError

# Batch keys the state's collator adds (not model inputs).
GROUP_IDS = "group_ids"
BATCH_KEYS = (GROUP_IDS,)
STATE_FILE = "dpo_state.json"
SEED_STRIDE = 1_000_003  # mask generator seed = trainer seed · stride + draws (a new stream per draw)


def check_group_column(terms: list, dataset, where: str) -> None:
    """Data-load time: the dataset has each group_robust_po term's group column, holding strings or integers."""
    for i, term in enumerate(terms):
        column = term.state.get("group_column")
        if column is None:
            continue
        columns = list(dataset.column_names or [])
        if column not in columns:
            raise DataError(f"{where}: preference loss {term.name!r} (loss[{i}]) reads each pair's group from the "
                            f"column {column!r} (its `group_column:`), which the dataset lacks; columns present: "
                            f"{', '.join(columns)}. Name another column, or map one with {where}.columns, e.g. "
                            f"columns: {{{column}: <your column>}}")
        try:
            values = dataset[column]
        except (TypeError, NotImplementedError):  # a streamed dataset: checked as batches come
            continue
        _group_values(values, column, where)


def _group_values(values, column: str, where: str) -> list:
    for row, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise DataError(f"{where}, row {row}: the group column {column!r} must hold strings or integers (one "
                            f"group per value), got {value!r}")
    kinds = {type(v) for v in values}
    if len(kinds) > 1:
        raise DataError(f"{where}: the group column {column!r} mixes strings and integers; use one kind")
    return sorted(set(values))


class BetaDPOState:
    """β-DPO's running margin statistics and its selection draws (see the module docstring)."""

    def __init__(self, momentum: float = 0.9, rho: float = 0.2, seed: int = 0):
        self.momentum, self.rho, self.seed = momentum, rho, seed
        self.margin_ema_mean = 0.0
        self.margin_ema_std = 0.0
        self.draws = 0

    def update(self, margins: torch.Tensor) -> None:
        """Fold the gathered batch's margins (N,) into M0 and σ0."""
        margins = margins.detach().double()
        m = self.momentum
        self.margin_ema_mean = m * self.margin_ema_mean + (1 - m) * margins.mean().item()
        self.margin_ema_std = m * self.margin_ema_std + (1 - m) * margins.std().item()

    def draw_mask(self, margins: torch.Tensor) -> torch.Tensor | None:
        """The 0/1 selection over the gathered batch (N,): (1 − ρ)·N pairs sampled without replacement with
        probability ∝ exp(−(Δ − M0)²/(2σ0²)); None when ρ is 0 (every pair kept)."""
        if self.rho == 0:
            return None
        margins = margins.detach().double().cpu()
        keep = max(1, int(margins.numel() * (1 - self.rho)))
        offset = margins - self.margin_ema_mean
        # σ0 = 0: a pair at M0 weighs 1, one off it 0 (not 0/0); the floor lets multinomial always draw
        ratio = torch.where(offset == 0, torch.zeros_like(offset), offset / self.margin_ema_std)
        weights = torch.exp(-0.5 * ratio**2).clamp(min=1e-300)
        generator = torch.Generator().manual_seed(self.seed * SEED_STRIDE + self.draws)
        self.draws += 1
        index = torch.multinomial(weights, keep, replacement=False, generator=generator)
        mask = torch.zeros(margins.numel())
        mask[index] = 1.0
        return mask

    def state_dict(self) -> dict[str, Any]:
        return {"margin_ema_mean": self.margin_ema_mean, "margin_ema_std": self.margin_ema_std, "draws": self.draws}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.margin_ema_mean = float(state["margin_ema_mean"])
        self.margin_ema_std = float(state["margin_ema_std"])
        self.draws = int(state["draws"])


class GroupRobustState:
    """Group Robust PO's adversarial group weights α and the training set's group fractions."""

    def __init__(self, groups: list, counts: list[int], step_size: float = 0.01, group_fractions: bool = True,
                 beta: float = 0.01, ipo: bool = True):
        self.groups = list(groups)
        self.index = {g: i for i, g in enumerate(self.groups)}
        total = sum(counts)
        self.fractions = [c / total for c in counts]
        self.step_size, self.use_fractions, self.beta, self.ipo = step_size, group_fractions, beta, ipo
        self.weights = [1.0 / len(self.groups)] * len(self.groups)

    def pair_losses(self, margins: torch.Tensor) -> torch.Tensor:
        """The entry's per-pair loss of unscaled margins Δ: IPO (Δ − 1/(2β))², else −log σ(βΔ)."""
        margins = margins.detach().double()
        return (margins - 1.0 / (2.0 * self.beta)) ** 2 if self.ipo else -F.logsigmoid(self.beta * margins)

    def group_losses(self, losses: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
        """L_g (G,) of a gathered batch: Σ_{i∈g} ℓ_i / p_g with fractions, else the group's mean (0 if absent)."""
        onehot = F.one_hot(group_ids.long().cpu(), num_classes=len(self.groups)).double()  # (N, G)
        sums = onehot.T @ losses.double().cpu()
        if self.use_fractions:
            return sums / torch.tensor(self.fractions, dtype=torch.float64)
        return sums / onehot.sum(dim=0).clamp(min=1)

    def update(self, margins: torch.Tensor, group_ids: torch.Tensor) -> None:
        """α ← α·exp(η·L_g), normalized (in log space), from the gathered batch."""
        group_loss = self.group_losses(self.pair_losses(margins), group_ids)
        log_weights = torch.tensor(self.weights, dtype=torch.float64).log() + self.step_size * group_loss
        self.weights = torch.softmax(log_weights, dim=0).tolist()

    def state_dict(self) -> dict[str, Any]:
        return {"groups": self.groups, "weights": self.weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["groups"]) != self.groups:
            raise RuntimeError(f"{STATE_FILE}: the checkpoint's groups {state['groups']!r} are not the training "
                               f"set's {self.groups!r}; resume with the data the run started with")
        self.weights = [float(w) for w in state["weights"]]


def _margins(data: dict) -> torch.Tensor:
    return ((data["chosen_logps"] - data["ref_chosen_logps"]) - (data["rejected_logps"] - data["ref_rejected_logps"]))


class DPOLossState:
    """The state of every stateful `loss:` term of a DPO trainer, by term key."""

    def __init__(self, terms: list, keys: list[str], train_dataset=None, eval_dataset=None, seed: int = 0):
        self.states: dict[str, BetaDPOState | GroupRobustState] = {}
        self.group_column: str | None = None
        for key, term in zip(keys, terms):
            if term.name == "beta_dpo":
                self.states[key] = BetaDPOState(term.state["momentum"], term.state["rho"], seed)
            elif term.name == "group_robust_po":
                self.states[key] = self._group_state(term, train_dataset, eval_dataset)

    def _group_state(self, term, train_dataset, eval_dataset) -> GroupRobustState:
        column = term.state["group_column"]
        if self.group_column not in (None, column):
            raise RecipeError(f"two group_robust_po entries name different group columns ({self.group_column!r}, "
                              f"{column!r}); use one")
        self.group_column = column
        if train_dataset is None or not hasattr(train_dataset, "column_names") or not hasattr(train_dataset,
                                                                                              "__len__"):
            raise DataError(f"group_robust_po counts each group's rows in the training set (its group fractions and "
                            f"groups), which needs a map-style dataset, not {type(train_dataset).__name__}")
        check_group_column([term], train_dataset, "train_dataset")
        values = train_dataset[column]
        groups = _group_values(values, column, "train_dataset")
        counts = [0] * len(groups)
        position = {g: i for i, g in enumerate(groups)}
        for v in values:
            counts[position[v]] += 1
        evals = eval_dataset.values() if isinstance(eval_dataset, dict) else [eval_dataset]
        for ds in (e for e in evals if e is not None):
            check_group_column([term], ds, "eval_dataset")
            if unseen := sorted(set(ds[column]) - set(groups), key=str):
                raise DataError(f"eval_dataset: the group column {column!r} holds groups the training set lacks "
                                f"({', '.join(map(repr, unseen[:5]))}); group robust PO keeps a weight per training "
                                f"group")
        params = {**term.variant.params, **term.params}
        return GroupRobustState(groups, counts, term.state["step_size"], term.state["group_fractions"],
                                params["beta"], params["ipo"])

    def __contains__(self, key: str) -> bool:
        return key in self.states

    def __bool__(self) -> bool:
        return bool(self.states)

    def columns(self) -> list[str]:
        """Dataset columns the state reads (kept by the Trainer's column filter)."""
        return [self.group_column] if self.group_column else []

    def wrap_collator(self, collator: Callable) -> Callable:
        return _WithGroupIds(collator, self.group_column, self._group_index()) if self.group_column else collator

    def _group_index(self) -> dict:
        return next(s.index for s in self.states.values() if isinstance(s, GroupRobustState))

    def term_data(self, trainer, mode: str, key: str, term, data: dict, batch: dict) -> dict:
        """The data of one stateful term: the state updated from this batch first (training only), then read."""
        state = self.states[key]
        metrics = trainer._metrics[mode]
        gather = trainer.accelerator.gather
        training = mode == "train"
        margins = _margins(data).detach()
        device = margins.device
        if isinstance(state, BetaDPOState):
            all_margins = gather(margins)
            mask = None
            if training:
                state.update(all_margins)
                mask = state.draw_mask(all_margins)
            # The whole batch's selection statistics: each process' loss is then its share of the batch's, so
            # that a split batch trains as on one process (and β_b is the gathered selection's, as the authors').
            kept = torch.ones_like(all_margins) if mask is None else mask.to(all_margins)
            selected_mean = (all_margins * kept).sum() / kept.sum()
            selected_fraction = kept.sum() / kept.numel()
            if mask is not None:
                n, start = margins.numel(), trainer.accelerator.process_index * margins.numel()
                mask = mask[start:start + n].to(device)
            out = {**data, "margin_ema_mean": torch.tensor(state.margin_ema_mean, device=device),
                   "margin_ema_std": torch.tensor(state.margin_ema_std, device=device), "selection_mask": mask,
                   "selected_margin_mean": selected_mean.to(device), "selected_fraction": selected_fraction.to(device)}
            metrics[f"{key}/margin_ema_mean"].append(state.margin_ema_mean)
            metrics[f"{key}/margin_ema_std"].append(state.margin_ema_std)
            metrics[f"{key}/beta"].append(self._beta_b(term, selected_mean, state).item())
            return out
        group_ids = batch[GROUP_IDS].to(device)
        all_group_ids = gather(group_ids)
        if training:
            state.update(gather(margins), all_group_ids)
        for name, weight in zip(state.groups, state.weights):
            metrics[f"{key}/group_weight/{name}"].append(weight)
        out = {**data, "group_ids": group_ids, "group_weights": torch.tensor(state.weights, device=device)}
        if state.use_fractions:
            out["group_fractions"] = torch.tensor(state.fractions, device=device)
        else:  # each group's mean over the whole batch's pairs, not this process' share of them
            out["group_counts"] = torch.bincount(all_group_ids.long(), minlength=len(state.groups)).to(device)
        return out

    @staticmethod
    def _beta_b(term, selected_mean: torch.Tensor, state: BetaDPOState) -> torch.Tensor:
        """β_b as the entry computes it from the selection's mean margin (for the log)."""
        params = {**term.variant.params, **term.params}
        beta_b = params["beta"] * (1 + params["alpha"] * (selected_mean - state.margin_ema_mean))
        return beta_b.clamp(min=1e-3)

    def state_dict(self) -> dict[str, Any]:
        return {key: state.state_dict() for key, state in self.states.items()}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        if missing := [k for k in self.states if k not in saved]:
            raise RuntimeError(f"{STATE_FILE} holds no state for the loss term(s) {', '.join(missing)}: the "
                               f"checkpoint was written by a run with other losses")
        for key, state in self.states.items():
            state.load_state_dict(saved[key])

    def save(self, folder: str) -> None:
        with open(os.path.join(folder, STATE_FILE), "w") as f:
            json.dump(self.state_dict(), f)

    def load(self, checkpoint: str) -> None:
        path = os.path.join(checkpoint, STATE_FILE)
        if not os.path.exists(path):
            raise RuntimeError(f"{path} is missing: the checkpoint was written without the trainer state of "
                               f"{', '.join(self.states)} (by another version or another recipe); a resumed run "
                               f"would restart it from zero. Start the run again (--overwrite)")
        with open(path) as f:
            self.load_state_dict(json.load(f))


class _WithGroupIds:
    """The collator, plus each example's group index as `group_ids` (a long tensor)."""

    def __init__(self, collator: Callable, column: str, index: dict):
        self.collator, self.column, self.index = collator, column, index

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(examples)
        try:
            batch[GROUP_IDS] = torch.tensor([self.index[example[self.column]] for example in examples])
        except KeyError as e:
            raise DataError(f"group column {self.column!r}: group {e.args[0]!r} is not one of the training set's "
                            f"groups {list(self.index)}") from None
        return batch


def checkpoint_folder(trainer, trial) -> str:
    """The folder Trainer._save_checkpoint just wrote (transformers: <output_dir>/checkpoint-<global_step>)."""

    return os.path.join(trainer._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}")
