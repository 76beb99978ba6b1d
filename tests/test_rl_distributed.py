"""Issue #8 acceptance: advantages and policy losses give the same result when a generation batch is split across
two processes as on one. Two CPU processes (torch.multiprocessing.spawn, torch.distributed over gloo on 127.0.0.1),
spawned once for the module; every registered advantage estimator and every policy loss × aggregation runs
inside that one job, and the per-entry comparisons against the one-process results are separate tests.

What is mirrored from TRL 1.16's GRPOTrainer (trl/trainer/grpo_trainer.py):
  - `_generate_and_score_completions`: every process holds the same number of completions, padded to its own
    longest completion (so the processes' widths differ). Rewards are gathered from every process
    (`gather(rewards_per_func)`), advantages are computed on the gathered batch, and each process keeps its rows
    (`advantages[process_index * n : (process_index + 1) * n]`). Per-token inputs an estimator reads (mask,
    entropies, log-probs) are padded across processes to one width before the gather, as TRL does for entropies
    (`pad_across_processes` + `gather`).
  - `_compute_loss`: each process computes the loss of its own rows; normalizers spanning the global batch are
    all-reduced (TRL: `num_items_in_batch = gather(loss_mask.sum()).sum()`); DDP averages the gradients.

Scaling (why the test sums the losses and averages the gradients of P·loss): postrain's aggregation contract is
that, given the global normalizer, the per-process losses SUM to the one-process loss. TRL instead scales each
process' loss by P = num_processes so that DDP's gradient AVERAGE is right: loss_type="dapo" divides the local
token sum by num_items_in_batch / P, loss_type="grpo" takes the mean over the process' N/P rows, i.e.
P · (local sum / N). So TRL's local loss is P × postrain's local loss, and under DDP
  ∇ = (1/P) Σ_p ∇(P · loss_p) = Σ_p ∇loss_p = ∇ loss_one_process.
The workers do exactly that: backward of P · loss_p on a replicated parameter (the full log-prob table, standing in
for the model weights every process holds), all-reduce of the gradient, divided by P.

Splits: the main batch has 3 groups of 4 completions split 6/6, so group 1 is cut across the processes; this is
used for every advantage estimator (they see the gathered batch) and every row-local loss. GVPO and DisCO read
whole groups (the losses module: "Entries that need whole groups (GVPO, DisCO) must see group-aligned rows"), so
they are tested on a batch of 4 groups of 4 split 8/8 (two whole groups per process). `spo_tracker` is
single-stream (group_size 1). Results come back through one torch.save file per process (a file, not a queue, so
nothing depends on the producer staying alive while the parent reads shared-memory tensors).
"""

from __future__ import annotations

import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from postrain.rl import ADVANTAGES, AGGREGATIONS, POLICY_LOSSES, compute_advantages, policy_loss
from postrain.rl.losses import disco_kl_stats

WORLD = 2
T = 7  # padded width of the whole batch (the longest completion)
MAX_COMPLETION_LENGTH = 9  # the configured cap, a constant on every process (not a padded width)
DELTA_L_ALPHA = AGGREGATIONS.get("delta_l").params["alpha"]

# Completion lengths: process 0's rows are all shorter than T, so its local padded width differs from process 1's;
# one empty completion on each side.
CUT_LENGTHS = [3, 0, 5, 2, 4, 1, 7, 2, 6, 0, 7, 4]  # 3 groups of 4, split 6 / 6: group 1 (rows 4-7) is cut
CUT_GROUP = 4
CUT_BINARY = [1, 0, 0, 1, 0, 1, 1, 0, 1, 1, 1, 1]  # group 2 all-equal
ALIGNED_LENGTHS = [4, 0, 6, 2, 5, 3, 1, 6, 7, 3, 2, 7, 5, 0, 4, 6]  # 4 groups of 4, split 8 / 8: whole groups
ALIGNED_GROUP = 4
ALIGNED_BINARY = [1, 0, 0, 1, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 1, 0]  # group 1 all 0 (counts in DisCO's Q, adds 0)

TOKEN_KEYS = ("mask", "logps", "old_logps", "ref_logps", "entropies", "completion_ids", "vocab_logps")
VOCAB = 5

# Losses that read whole groups; they get the group-aligned split. The guard test below keeps this list honest.
WHOLE_GROUP_LOSSES = {"gvpo", "disco", "trpa", "gtpo", "tw_grpo"}
# Losses that take one advantage per sequence only (they raise on (N, T) advantages).
SEQUENCE_ADVANTAGE_LOSSES = {"gmpo", "a_star_po", "nft", "gtpo"}


def make_batch(lengths, group_size, binary, seed):
    """A generation batch with nan in every padding position of the per-token tensors."""
    g = torch.Generator().manual_seed(seed)
    n = len(lengths)
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).float()
    logps = -(torch.rand(n, T, generator=g) * 3.0 + 0.05)
    old = (logps + 0.3 * torch.randn(n, T, generator=g)).clamp(max=-1e-3)
    ref = (logps + 0.3 * torch.randn(n, T, generator=g)).clamp(max=-1e-3)
    entropies = torch.rand(n, T, generator=g) * 2.0 + 0.1
    nan = torch.tensor(float("nan"))
    groups = n // group_size
    visits = torch.arange(groups, dtype=torch.float32) % 3  # group 0 a first visit
    dcpo = torch.stack([visits, torch.rand(groups, generator=g), torch.rand(groups, generator=g) * 0.5 + 0.1], -1)
    return {
        "group_size": group_size,
        "mask": mask,
        "logps": torch.where(mask.bool(), logps, nan),
        "old_logps": torch.where(mask.bool(), old, nan),
        "ref_logps": torch.where(mask.bool(), ref, nan),
        "entropies": torch.where(mask.bool(), entropies, nan),
        "rewards": torch.tensor(binary, dtype=torch.float32),
        "rewards_uniform": torch.rand(n, generator=g),
        "ref_rewards": (torch.rand(n, generator=g) > 0.5).float(),
        "dcpo_state": dcpo.repeat_interleave(group_size, dim=0),  # identical on a group's rows
        "spo_state": torch.rand(n, 2, generator=g) * 3.0 + 0.5,
        "divergence": torch.rand(n, generator=g) * 0.1,
        # token ids from a small vocabulary (completions of a group share tokens, GTPO's conflicts) and next-token
        # log-distributions over it (TW-GRPO's spread of a group's distributions per position)
        "completion_ids": torch.randint(0, VOCAB, (n, T), generator=g) * mask.long(),
        "vocab_logps": torch.log_softmax(torch.randn(n, T, VOCAB, generator=g) * 2.0, dim=-1),
    }


BATCHES = {
    "cut": make_batch(CUT_LENGTHS, CUT_GROUP, CUT_BINARY, seed=0),
    "aligned": make_batch(ALIGNED_LENGTHS, ALIGNED_GROUP, ALIGNED_BINARY, seed=1),
}


def rows_of(rank: int, n: int) -> slice:
    """TRL's process_slice: equal shares, in process order."""
    share = n // WORLD
    return slice(rank * share, (rank + 1) * share)


def local_batch(batch: dict, rank: int) -> dict:
    """What process `rank` holds: its rows, per-token tensors padded only to its own longest completion."""
    rows = rows_of(rank, batch["mask"].shape[0])
    width = max(int(batch["mask"][rows].sum(-1).max()), 1)
    return {k: (v if k == "group_size" else v[rows, :width] if k in TOKEN_KEYS else v[rows])
            for k, v in batch.items()}


# ------------------------------------------------------------------------------------------------- advantages

def advantage_kwargs(name: str, batch: dict, rewards_key: str) -> dict:
    """The estimator's data from `batch` (whole batch on one process, or the gathered batch)."""
    variant = ADVANTAGES.get(name)
    kw = {"rewards": batch[rewards_key], "group_size": 1 if name == "spo_tracker" else batch["group_size"],
          "mask": batch["mask"]}
    extra = {"old_logps": batch["old_logps"], "ref_logps": batch["ref_logps"], "entropies": batch["entropies"],
             "ref_rewards": batch["ref_rewards"], "divergence": batch["divergence"],
             "state": batch["spo_state" if name == "spo_tracker" else "dcpo_state"]}
    kw.update({k: v for k, v in extra.items() if k in variant.data})
    return kw


def as_tuple(out):
    """Stateful estimators return (advantages, new_state); the rest a tensor."""
    return tuple(out) if isinstance(out, tuple) else (out,)


ADVANTAGE_CASES = [(name, rewards_key) for name in ADVANTAGES.entries
                   for rewards_key in ("rewards", "rewards_uniform")]


# ------------------------------------------------------------------------------------------------- losses

def loss_cases() -> list[tuple]:
    """(label, loss, params, batch, policy, advantage kind, aggregation) for every loss × aggregation."""
    cases = []
    for name, variant in POLICY_LOSSES.entries.items():
        batch = "aligned" if name in WHOLE_GROUP_LOSSES else "cut"
        kinds = ["seq", "token"] if "advantages" in variant.data and name not in SEQUENCE_ADVANTAGE_LOSSES \
            else ["seq"] if "advantages" in variant.data else ["none"]
        modes = [("off", kind) for kind in kinds]
        if "old_logps" in variant.data:
            modes.append(("on", kinds[0]))
        specs = [(name, {})]
        if name == "disco":
            specs.append(("disco[Lratio]", {"score": "Lratio"}))
        for label, params in specs:
            for policy, kind in modes:
                for agg in AGGREGATIONS.entries:
                    cases.append((label, name, params, batch, policy, kind, agg))
    return cases


LOSS_CASES = loss_cases()
# DisCO off-policy with its default KL constraint (beta=1e3), which its test checks is active.
DISCO_KL_CASE = ("disco[default,off]", "disco", {}, "aligned", "off", "none", "seq_mean_token_mean")


def case_id(case) -> str:
    label, _, _, _, policy, kind, agg = case
    return f"{label}-{policy}-{kind}-{agg}"


def loss_advantages(batch: dict, kind: str):
    """Advantages the loss reads, computed from a whole (or gathered) batch: GRPO's (N,) or REINFORCE++-baseline's
    (N, T) token-level ones."""
    if kind == "token":
        return compute_advantages("reinforce_pp_baseline", batch["rewards"], batch["group_size"], mask=batch["mask"])
    return compute_advantages("grpo", batch["rewards"], batch["group_size"])


def loss_and_grad(case, theta, rows: slice, width: int, batch: dict, advantages, normalizers: dict | None,
                  scale: float):
    """The loss of `rows` (padded to `width`) with log-probs read from the replicated parameter `theta`; backward of
    scale · loss. Returns (loss, theta.grad)."""
    _, name, params, _, policy, _, agg = case
    if name == "disco" and normalizers is not None:  # the KL constraint over every process (see disco_kl_stats)
        params = {**params, "kl_stats": normalizers["disco_kl_stats"][policy]}
    mask = batch["mask"][rows, :width]
    logps = theta[rows, :width]
    old = None if policy == "on" else batch["old_logps"][rows, :width]
    agg_params = {k: v for k, v in (normalizers or {}).items() if k != "disco_kl_stats"}
    if "max_completion_length" in AGGREGATIONS.get(agg).params:
        # The configured cap, as TRL's dr_grpo uses. Left at None, seq_mean_token_sum_norm and delta_l divide by
        # the padded width, which differs between processes padded to their own longest completion: not split-
        # invariant (checked: every case of those two fails then).
        agg_params["max_completion_length"] = MAX_COMPLETION_LENGTH
    if advantages is not None and advantages.dim() == 2:
        advantages = advantages[:, :width]
    per_token = {k: batch[k][rows, :width] for k in ("entropies", "completion_ids", "vocab_logps")
                 if k in POLICY_LOSSES.get(name).data}  # what the losses that read them read (gtpo, tw_grpo)
    loss, _ = policy_loss(name, logps=logps, old_logps=old, advantages=advantages, mask=mask, aggregation=agg,
                          aggregation_params=agg_params, rewards=batch["rewards"][rows],
                          ref_logps=batch["ref_logps"][rows, :width], group_size=batch["group_size"], **per_token,
                          **params)
    (scale * loss).backward()
    grad = theta.grad if theta.grad is not None else torch.zeros_like(theta)
    return loss.detach(), grad.detach()


def one_process_loss(case):
    batch = BATCHES[case[3]]
    theta = batch["logps"].clone().requires_grad_(True)
    n = batch["mask"].shape[0]
    adv = loss_advantages(batch, case[5]) if case[5] != "none" else None
    return loss_and_grad(case, theta, slice(0, n), T, batch, adv, None, 1.0)


# ------------------------------------------------------------------------------------------------- the workers

def gather_batch(local: dict) -> dict:
    """All-gather a process' batch: per-token tensors padded across processes to one width first."""
    width = torch.tensor(local["mask"].shape[1])
    dist.all_reduce(width, op=dist.ReduceOp.MAX)
    out = {"group_size": local["group_size"]}
    for key, value in local.items():
        if key == "group_size":
            continue
        if key in TOKEN_KEYS:  # pad dim 1 (the tokens; vocab_logps has the vocabulary after it)
            value = torch.nn.functional.pad(value, (0, 0) * (value.dim() - 2) + (0, int(width) - value.shape[1]))
        parts = [torch.empty_like(value) for _ in range(WORLD)]
        dist.all_gather(parts, value.contiguous())
        out[key] = torch.cat(parts)
    return out


def global_normalizers(local: dict) -> dict:
    """The global normalizers the aggregation entries document, all-reduced over processes."""
    lengths = local["mask"].sum(-1)
    weights = torch.where(lengths > 0, lengths.clamp(min=1.0) ** -DELTA_L_ALPHA, torch.zeros_like(lengths))
    stats = torch.stack([local["mask"].sum(), torch.tensor(float(local["mask"].shape[0])), weights.sum()])
    dist.all_reduce(stats)
    kl_stats = {"off": disco_kl_stats(local["logps"], local["old_logps"], local["mask"]),
                "on": disco_kl_stats(local["logps"], None, local["mask"])}
    for value in kl_stats.values():
        dist.all_reduce(value)
    return {"global_tokens": stats[0], "num_sequences": int(stats[1]), "length_weight_sum": stats[2],
            "disco_kl_stats": kl_stats}


def _guarded(fn):
    """Entry code runs between collectives, never inside them: an entry that raises on one process is recorded
    (and fails its own test) instead of leaving the other process waiting in a collective."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - reported per entry by the parent
        return f"{type(exc).__name__}: {exc}"


def _worker(rank: int, port: int, out_dir: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        local = {key: local_batch(batch, rank) for key, batch in BATCHES.items()}
        gathered = {key: gather_batch(local[key]) for key in BATCHES}  # collective
        normalizers = {key: global_normalizers(local[key]) for key in BATCHES}  # collective
        results = {"gathered": gathered, "advantages": {}, "losses": {}}

        # (1) advantages on the gathered batch, each process keeping its rows
        cut = gathered["cut"]
        mine = rows_of(rank, cut["mask"].shape[0])
        for name, rewards_key in ADVANTAGE_CASES:
            results["advantages"][(name, rewards_key)] = _guarded(lambda: tuple(
                x[mine] for x in as_tuple(compute_advantages(name, **advantage_kwargs(name, cut, rewards_key)))))

        # edge_grpo's documented alternative: only local (whole-group) rows plus the global mean entropy
        al = local["aligned"]
        lengths = al["mask"].sum(-1)
        p = torch.where(al["mask"].bool(), al["entropies"], 0.0).sum(-1) / lengths.clamp(min=1.0)
        entropy_stats = torch.stack([p[lengths > 0].sum(), (lengths > 0).sum().float()])
        dist.all_reduce(entropy_stats)  # collective
        results["edge_grpo_local"] = _guarded(lambda: compute_advantages(
            "edge_grpo", al["rewards"], al["group_size"], mask=al["mask"], entropies=al["entropies"],
            mean_entropy=entropy_stats[0] / entropy_stats[1]))

        # (2) losses on each process' own rows; advantages from the gathered batch, sliced as TRL does
        rows_out = []
        for case in LOSS_CASES + [DISCO_KL_CASE]:
            key = case[3]
            n = BATCHES[key]["mask"].shape[0]
            mine = rows_of(rank, n)
            width = local[key]["mask"].shape[1]

            def run(case=case, key=key, mine=mine, width=width):
                adv = None if case[5] == "none" else loss_advantages(gathered[key], case[5])[mine]
                theta = BATCHES[key]["logps"].clone().requires_grad_(True)  # the replicated "weights"
                loss, grad = loss_and_grad(case, theta, mine, width, BATCHES[key], adv, normalizers[key], WORLD)
                return torch.cat([loss.view(1), grad.flatten(), torch.zeros(1)])

            out = _guarded(run)
            if isinstance(out, str):
                results["losses"][case_id(case)] = out
                out = torch.zeros(1 + BATCHES[key]["logps"].numel() + 1)
                out[-1] = 1.0  # error flag
            rows_out.append(out)
        sizes = [r.numel() for r in rows_out]
        table = torch.cat(rows_out)
        dist.all_reduce(table)  # collective: loss sum, DDP gradient sum, error count
        for case, row in zip(LOSS_CASES + [DISCO_KL_CASE], table.split(sizes)):
            if case_id(case) in results["losses"] or row[-1] > 0:
                results["losses"].setdefault(case_id(case), "failed on the other process")
                continue
            shape = BATCHES[case[3]]["logps"].shape
            # loss: Σ_p loss_p (postrain's contract); gradient: DDP's average of ∇(P · loss_p)
            results["losses"][case_id(case)] = (row[0], row[1:-1].view(shape) / WORLD)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def split_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("rl_distributed")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


# ------------------------------------------------------------------------------------------------- tests

def test_splits_are_the_intended_ones():
    cut, aligned = BATCHES["cut"], BATCHES["aligned"]
    assert (cut["mask"].shape[0] // WORLD) % cut["group_size"] != 0, "the cut batch must split a group"
    assert (aligned["mask"].shape[0] // WORLD) % aligned["group_size"] == 0
    widths = {local_batch(cut, r)["mask"].shape[1] for r in range(WORLD)}
    assert len(widths) == WORLD, "processes must pad to different widths, as TRL does"
    assert WHOLE_GROUP_LOSSES == {v.name for v in POLICY_LOSSES if "group_size" in v.data}


def test_gather_reassembles_the_batch(split_results):
    for r in range(WORLD):
        for key, batch in BATCHES.items():
            got = split_results[r]["gathered"][key]
            for name, value in batch.items():
                if name == "group_size":
                    continue
                got_value = got[name]
                if name in TOKEN_KEYS:  # padding is nan or the gather's 0 padding: compare valid positions
                    valid = batch["mask"].bool().reshape(*batch["mask"].shape, *[1] * (value.dim() - 2))
                    zero = torch.zeros((), dtype=value.dtype)
                    value, got_value = torch.where(valid, value, zero), torch.where(valid, got_value, zero)
                torch.testing.assert_close(got_value, value, msg=f"{key}.{name} on process {r}")


@pytest.mark.parametrize("name,rewards_key", ADVANTAGE_CASES, ids=[f"{n}-{k}" for n, k in ADVANTAGE_CASES])
def test_advantages_gathered_then_sliced(split_results, name, rewards_key):
    batch = BATCHES["cut"]
    reference = as_tuple(compute_advantages(name, **advantage_kwargs(name, batch, rewards_key)))
    for r in range(WORLD):
        got = split_results[r]["advantages"][(name, rewards_key)]
        assert not isinstance(got, str), f"process {r}: {got}"
        assert len(got) == len(reference)
        for part, ref in zip(got, reference):
            torch.testing.assert_close(part, ref[rows_of(r, ref.shape[0])], msg=f"{name} on process {r}")


def test_edge_grpo_local_rows_with_global_mean_entropy(split_results):
    batch = BATCHES["aligned"]
    reference = compute_advantages("edge_grpo", batch["rewards"], batch["group_size"], mask=batch["mask"],
                                   entropies=batch["entropies"])
    for r in range(WORLD):
        got = split_results[r]["edge_grpo_local"]
        assert not isinstance(got, str), got
        torch.testing.assert_close(got, reference[rows_of(r, reference.shape[0])])


def one_process_only(case):
    """Losses whose entry says they run on one process only (the GRPO trainer refuses them on several): their split
    is expected to differ."""
    reason = POLICY_LOSSES.get(case[1]).extra.get("one_process")
    return pytest.param(case, marks=pytest.mark.xfail(strict=True, reason=reason)) if reason else case


@pytest.mark.parametrize("case", [one_process_only(c) for c in LOSS_CASES], ids=[case_id(c) for c in LOSS_CASES])
def test_policy_loss_split(split_results, case):
    ref_loss, ref_grad = one_process_loss(case)
    assert torch.isfinite(ref_loss) and torch.isfinite(ref_grad).all()
    for r in range(WORLD):  # after the all-reduce both processes must hold the same totals
        got = split_results[r]["losses"][case_id(case)]
        assert not isinstance(got, str), f"process {r}: {got}"
        loss, grad = got
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6, msg=f"loss on process {r}")
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6, msg=f"gradient on process {r}")


def test_loss_cases_have_signal():
    # A case whose gradient is all zero would pass the split test whatever the split did.
    dead = [case_id(c) for c in LOSS_CASES if not one_process_loss(c)[1].abs().sum() > 0]
    assert not dead, f"cases with no gradient: {dead}"


def test_disco_kl_constraint_off_policy(split_results):
    # DisCO's KL constraint (coefficient beta*(KL-delta), KL = token mean of k3 over the batch) is split-invariant
    # only with the all-reduced disco_kl_stats passed in; the constraint must be active for the case to test it.
    ref_loss, ref_grad = one_process_loss(DISCO_KL_CASE)
    batch = BATCHES["aligned"]
    kl = disco_kl_stats(batch["logps"], batch["old_logps"], batch["mask"])
    assert kl[0] / kl[1] > POLICY_LOSSES.get("disco").params["delta"]
    got = split_results[0]["losses"][case_id(DISCO_KL_CASE)]
    assert not isinstance(got, str), got
    loss, grad = got
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)


def test_a_loss_that_runs_on_one_process_only_is_refused_on_several(tmp_path):
    from postrain.errors import RecipeError
    from postrain.jobs import load_recipe
    from tests.conftest import write_recipe

    recipe = write_recipe(tmp_path / "trpa.yaml", "defaults: [base/grpo]\nrl: {policy_loss: trpa}\n"
                                                  "trainer: {per_device_train_batch_size: 8, num_generations: 8}\n")
    load_recipe(recipe)  # one process: fine
    with pytest.raises(RecipeError, match=r"policy loss 'trpa' .* runs on one process only: its loss is a mean over "
                                          r"the micro-batch's own pairs .* 2 processes"):
        load_recipe(recipe, ["launch.num_processes=2"])
