"""Token-level inputs of the DPO trainer: TGDPO's token rewards, Ra-DPO's per-token risk ratios, BMC's pair
difference masks and GDPO's per-token end-of-sequence log-probs.

Some pairwise losses read, besides the policy's and reference's log-probs, per-token quantities the trainer has to
compute from further forwards. Their settings sit on the loss entry, next to its hyperparameters, and are split off
before the entry is called (postrain.preference.token_inputs, with the data names, at recipe load time):

    loss: [{name: tgdpo, token_reward_model: {name_or_path: runs/dpo}}]    # TGDPO: r̂_t from a DPO-trained model
    loss: [{name: ra_dpo, confidence_level: 0.95, split_vocab: true}]        # Ra-DPO: CVaR over the vocabulary
    loss: [{name: gdpo, alpha: 0.1, gamma: 0.1}]                             # GDPO: the reference's EOS at gamma

TGDPO (`chosen_token_rewards`, `rejected_token_rewards`): r̂_t = log π_rm(y_t) − log π_ref(y_t), with π_rm an
already DPO-trained model and π_ref the trainer's reference. π_rm is loaded with the trainer and run on every batch
(no gradient), as the authors' trainer runs its `reward_model` (dvlab-research/TGDPO
src/llamafactory/train/tgdpo/trainer.py, get_batch_loss_metrics: concatenated_forward under torch.no_grad); the
reference log-probs are the ones the loss reads. Run online rather than precomputed (`logp_models:`) because the
rewards are per token: a column per completion token would have to be re-aligned with the padding and truncation
of each training batch, while the online forward sees the batch exactly as the policy does. The cost is a third
model in memory and one more no-grad forward per step.

Ra-DPO (`chosen_token_risk_ratios`, `rejected_token_risk_ratios`): per completion token, the authors'
`calculate_cvar` (zlj123-max/Ra-DPO Ra-DPO/train/trainers.py, Ra_DPOTrainer.get_batch_logps, with
`is_cal_risk_distribution_logps: false`): d_v = log π_ref(v) − log π(v) over the vocabulary, VaR = the
(1 − confidence_level)-quantile of d (torch.quantile's linear interpolation) and risk = Σ_v π_ref(v)·d_v·1[d_v > VaR];
with `split_vocab` (the authors' default `is_split_risk_ratio: true`) the vocabulary is cut into two halves
(ids below V//2 and the rest), each with its own VaR, and the two sums are added. Gradients flow through log π, as in
the authors' code. This needs both models' full distributions at every completion position: with Ra-DPO the policy
forward is the model's own (unfused) forward returning logits, and the reference forward too, instead of TRL's fused
log-prob head. Memory: several (2B, T, V) float32 tensors per step (policy log-softmax with its gradient, reference
log-softmax, d, the mask), i.e. about 4 · 2B · T · V · 4 bytes, 2.5 GB at B = 2, T = 512, V = 150k: fine for small
models, a limit for long sequences and large vocabularies.

BMC (`chosen_diff_mask`, `rejected_diff_mask`): 1 on the tokens where the chosen and rejected sequences differ, as
the authors' find_modifications (YJiangcm/BMC scripts/dpo_bmc_trainer.py): difflib.SequenceMatcher over the two
token-id sequences (rejected first); the rejected side's replaced or deleted tokens and the chosen side's replaced or
inserted ones are marked, except stopword tokens. Stopwords (`stopwords:` on the entry): `nltk` for the authors' list
(nltk's English stopwords plus their capitalised forms, the ids of those the tokenizer encodes as one token; needs
nltk's stopwords corpus installed, `python -m nltk.downloader stopwords`), or a list of words ([] for none). The
authors run difflib on the padded rows of their batch; here on each sequence's real tokens (prompt and completion),
so a pair's mask does not depend on what else the batch holds. No model forward: the masks come from the ids.

GDPO (`chosen_token_eos_logps`, `rejected_token_eos_logps`, `ref_chosen_token_eos_logps`,
`ref_rejected_token_eos_logps`): at every completion token t, log π(EOS | y_<t) of the policy (with its gradient) and
log softmax(z_ref / γ)[EOS] of the reference (its logits at temperature γ, `gamma:` on the entry, default 0.1 as the
authors' GDPOConfig), as ggoggam/gdpo src/algo/offline/gdpo.py GDPOTrainer.loss computes `eos_logps` and the EOS
term of `log_rewards`; EOS is the tokenizer's eos_token_id. Like Ra-DPO's, these need the full distributions, so
the policy and reference forwards are the unfused ones above; only the EOS column is kept past the batch's loss.
"""

from __future__ import annotations

import dataclasses
import difflib
from types import SimpleNamespace
from typing import Any

import torch

from postrain.errors import RecipeError
from postrain.models.loading import check_model_reference
from postrain.models import loading as model_loading  # load_model through it: tests replace it there
from postrain.preference.token_inputs import stopword_list
from postrain.recipes.schema import ModelSpec
from postrain.trainers.logp_models import prepare_scoring_model


def stopword_ids(tokenizer, words: list[str]) -> set[int]:
    """The ids of the words the tokenizer encodes as a single token, as the authors take them
    (tokenizer.tokenize(word), no leading space)."""
    ids = set()
    for word in words:
        pieces = tokenizer.tokenize(word)
        if len(pieces) == 1:
            ids.add(tokenizer.convert_tokens_to_ids(pieces)[0])
    return ids


def modified_tokens(rejected: list[int], chosen: list[int], stopword_ids: set[int]) -> tuple[list[int], list[int]]:
    """(rejected marks, chosen marks): 1 where difflib's edit of rejected into chosen replaces, deletes or inserts a
    token that is not a stopword."""
    rejected_marks, chosen_marks = [0] * len(rejected), [0] * len(chosen)
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, rejected, chosen).get_opcodes():
        if tag in ("replace", "delete"):
            for i in range(i1, i2):
                rejected_marks[i] = int(rejected[i] not in stopword_ids)
        if tag in ("replace", "insert"):
            for j in range(j1, j2):
                chosen_marks[j] = int(chosen[j] not in stopword_ids)
    return rejected_marks, chosen_marks


def pair_difference_masks(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          stopword_ids: set[int]) -> torch.Tensor:
    """BMC's masks (2B, L) for a [chosen; rejected] batch of sequences, over each sequence's real tokens."""
    pairs = input_ids.size(0) // 2
    out = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    ids, real = input_ids.cpu(), attention_mask.cpu().bool()
    for i in range(pairs):
        chosen_at, rejected_at = real[i].nonzero().squeeze(-1), real[pairs + i].nonzero().squeeze(-1)
        rejected_marks, chosen_marks = modified_tokens(ids[pairs + i, rejected_at].tolist(),
                                                       ids[i, chosen_at].tolist(), stopword_ids)
        out[i, chosen_at.to(out.device)] = torch.tensor(chosen_marks, dtype=torch.float32, device=out.device)
        out[pairs + i, rejected_at.to(out.device)] = torch.tensor(rejected_marks, dtype=torch.float32,
                                                                  device=out.device)
    return out


def check_model_references(terms: list) -> None:
    """Before the run directory is made: the token reward model exists (as `ref_model` is checked)."""

    for i, term in enumerate(terms):
        if "token_reward_model" in term.inputs:
            check_model_reference(term.inputs["token_reward_model"], f"loss[{i}].token_reward_model")


def _lower_tail_quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile(x, q, dim=-1, keepdim=True) (linear interpolation), by kthvalue: torch.quantile refuses inputs of
    more than 2^24 elements, which (B, T, V) exceeds for real vocabularies."""
    n = x.size(-1)
    position = q * (n - 1)
    low = int(position)
    high = min(low + 1, n - 1)
    low_value = x.kthvalue(low + 1, dim=-1, keepdim=True).values
    high_value = x.kthvalue(high + 1, dim=-1, keepdim=True).values
    return low_value + (position - low) * (high_value - low_value)


def token_risk_ratios(ref_logps: torch.Tensor, policy_logps: torch.Tensor, confidence_level: float = 0.95,
                      split_vocab: bool = True) -> torch.Tensor:
    """Ra-DPO's per-position risk ratio (N, T) from full-vocabulary log-probs (N, T, V) of reference and policy:
    Σ_v π_ref(v)·d_v·1[d_v > VaR], d = log π_ref − log π, VaR the (1 − confidence_level)-quantile of d over the
    vocabulary (per half of it with `split_vocab`). As the authors' calculate_cvar (see the module docstring)."""
    distance = ref_logps - policy_logps
    probs = ref_logps.exp()
    vocab = distance.size(-1)
    cuts = [(0, vocab // 2), (vocab // 2, vocab)] if split_vocab else [(0, vocab)]
    risk = distance.new_zeros(distance.shape[:-1])
    for start, end in cuts:
        part = distance[..., start:end]
        with torch.no_grad():  # VaR only places the cut: the mask carries no gradient
            above = part > _lower_tail_quantile(part.detach(), 1 - confidence_level)
        risk = risk + (probs[..., start:end] * part * above).sum(-1)
    return risk


def _shifted_log_softmax(logits: torch.Tensor, seq_len: int) -> torch.Tensor:
    """log π(·| y_<t) at the positions that predict tokens 1.. (as TRL's fused head scores them), (N, seq_len, V)."""
    return logits[:, :-1].float().log_softmax(-1)[:, -seq_len:]


def _gather(full_logps: torch.Tensor, input_ids: torch.Tensor, shift_mask: torch.Tensor) -> torch.Tensor:
    seq_len = shift_mask.size(1)
    labels = input_ids[:, 1:][:, -seq_len:]
    tokens = full_logps.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return tokens * shift_mask  # zero off the completion, as the fused head gives it


@dataclasses.dataclass
class TokenLevelInputs:
    """What a PostrainDPOTrainer computes per batch for its token-level terms (built by `for_trainer`)."""

    trainer: Any
    reward_model: Any = None  # TGDPO's π_rm, prepared for inference
    risk: dict | None = None  # Ra-DPO's {confidence_level, split_vocab}
    stopword_ids: set | None = None  # BMC's stopword token ids (None: no BMC term)
    eos: dict | None = None  # GDPO's {token_id, gamma} (None: no GDPO term)
    _policy_full: torch.Tensor | None = None  # this batch's policy log-softmax (N, T, V), with its graph
    _reference_full: torch.Tensor | None = None
    _reference_eos: torch.Tensor | None = None  # this batch's reference log softmax(z / γ)[EOS] (N, T)

    @classmethod
    def for_trainer(cls, trainer) -> "TokenLevelInputs | None":
        """None unless a loss term reads token-level inputs; loads TGDPO's token reward model."""
        terms = [t for t in trainer.loss_terms if t.inputs]
        if not terms:
            return None
        out = cls(trainer)
        tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
        for term in terms:
            if "token_reward_model" in term.inputs and out.reward_model is None:
                out.reward_model = _load_reward_model(trainer, term.inputs["token_reward_model"])
            if "confidence_level" in term.inputs:
                out.risk = {k: term.inputs[k] for k in ("confidence_level", "split_vocab")}
            if "stopwords" in term.inputs:
                out.stopword_ids = stopword_ids(tokenizer, stopword_list(term.inputs["stopwords"], "stopwords"))
            if "gamma" in term.inputs:
                if tokenizer.eos_token_id is None:
                    raise RecipeError(f"preference loss {term.name!r} reads the policy's end-of-sequence "
                                      f"probability at every completion token, but the model's tokenizer has no "
                                      f"eos_token_id; use a model whose tokenizer defines one")
                out.eos = {"token_id": int(tokenizer.eos_token_id), "gamma": float(term.inputs["gamma"])}
        return out

    @property
    def full_vocab(self) -> bool:
        """Whether the policy and reference forwards return full distributions (Ra-DPO, GDPO)."""
        return self.risk is not None or self.eos is not None

    def policy_forward(self, model, inputs: dict):
        """The policy forward, unfused: as PostrainDPOTrainer._policy_forward (TRL 1.16's, same model keyword
        arguments), but through the model's own forward, which returns logits; per-token log-probs gathered from
        them. Returns what _policy_forward returns; keeps the full log-softmax for the risk ratios."""
        model_kwargs = {k: v for k, v in inputs.items()
                        if k not in {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}}
        model_kwargs["use_cache"] = False
        if self.trainer.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        shift_mask = inputs["completion_mask"][..., 1:]
        seq_len = shift_mask.size(1)
        outputs = model(**model_kwargs)
        full = _shifted_log_softmax(outputs.logits, seq_len)
        self._policy_full = full
        per_token = _gather(full, inputs["input_ids"], shift_mask)
        # log Σ_v π(v)² (WPO's input), so a WPO term beside Ra-DPO reads what the fused head would give it
        log_sum_sq = torch.logsumexp(2 * full, dim=-1) * shift_mask
        wrapped = SimpleNamespace(log_sum_sq_probs=log_sum_sq, aux_loss=getattr(outputs, "aux_loss", None))
        return wrapped, per_token, shift_mask, model_kwargs

    def reference_token_logps(self, inputs: dict, seq_len: int) -> torch.Tensor:
        """Per-token reference log-probs (N, T) from an unfused reference forward, run by TRL's
        compute_ref_log_probs (no grad, adapters off under peft, autocast); keeps the full log-softmax."""
        trainer = self.trainer
        reference = trainer.ref_model or trainer.model
        shift_mask = inputs["completion_mask"][..., 1:]

        def unfused(labels=None, fused_lm_head=False, **kwargs):
            logits = reference(**kwargs).logits
            full = _shifted_log_softmax(logits, seq_len)
            self._reference_full = full
            if self.eos is not None:  # GDPO: log softmax(z / γ)[EOS] (full / γ differs from z / γ by a constant)
                self._reference_eos = (full / self.eos["gamma"]).log_softmax(-1)[..., self.eos["token_id"]]
            return SimpleNamespace(log_probs=_gather(full, kwargs["input_ids"], shift_mask))

        trainer.compute_ref_log_probs(unfused, inputs)
        return _gather(self._reference_full, inputs["input_ids"], shift_mask)

    def token_logps(self, model, inputs: dict, seq_len: int) -> torch.Tensor:
        """Per-token log-probs (N, T) of a further model, through TRL's compute_ref_log_probs (no grad, fused head)."""
        kept = {}

        def forward_and_keep(**kwargs):
            kept["outputs"] = model(**kwargs)
            return kept["outputs"]

        self.trainer.compute_ref_log_probs(forward_and_keep, inputs)
        return kept["outputs"].log_probs[:, -seq_len:]

    def data(self, inputs: dict, seq_len: int, data: dict) -> dict[str, torch.Tensor]:
        """This batch's token-level inputs, from the reference data already in `data` and the kept distributions."""
        out = {}
        if self.reward_model is not None:
            reward_logps = self.token_logps(self.reward_model, inputs, seq_len)
            reference = torch.cat([data["ref_chosen_token_logps"], data["ref_rejected_token_logps"]], dim=0)
            rewards = (reward_logps.to(reference.dtype) - reference).detach()
            out["chosen_token_rewards"], out["rejected_token_rewards"] = rewards.chunk(2, dim=0)
        if self.risk is not None:
            if self._policy_full is None or self._reference_full is None:
                raise RuntimeError("Ra-DPO's risk ratios need this batch's full policy and reference distributions")
            risk = token_risk_ratios(self._reference_full, self._policy_full, **self.risk)
            out["chosen_token_risk_ratios"], out["rejected_token_risk_ratios"] = risk.chunk(2, dim=0)
        if self.stopword_ids is not None:  # BMC: aligned with the per-token log-probs (positions 1.. of each row)
            masks = pair_difference_masks(inputs["input_ids"], inputs["attention_mask"], self.stopword_ids)
            out["chosen_diff_mask"], out["rejected_diff_mask"] = masks[:, 1:][:, -seq_len:].chunk(2, dim=0)
        if self.eos is not None:  # GDPO: log π(EOS | y_<t) at the position predicting token t, as the log-probs
            if self._policy_full is None or self._reference_eos is None:
                raise RuntimeError("GDPO's EOS log-probs need this batch's full policy and reference distributions")
            shift_mask = inputs["completion_mask"][..., 1:]
            policy_eos = self._policy_full[..., self.eos["token_id"]] * shift_mask
            reference_eos = (self._reference_eos * shift_mask).detach()
            out["chosen_token_eos_logps"], out["rejected_token_eos_logps"] = policy_eos.chunk(2, dim=0)
            out["ref_chosen_token_eos_logps"], out["ref_rejected_token_eos_logps"] = reference_eos.chunk(2, dim=0)
        self._policy_full = self._reference_full = self._reference_eos = None  # the (N, T, V) tensors, freed
        return out


def _load_reward_model(trainer, spec: dict):
    """TGDPO's π_rm: loaded as a `ref_model:` is, on the policy's tokenizer, prepared as TRL prepares its reference."""

    model, tokenizer, _ = model_loading.load_model({**dataclasses.asdict(ModelSpec()), **spec})
    policy = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
    if tokenizer.get_vocab() != policy.get_vocab():
        raise RecipeError(f"token_reward_model {spec.get('name_or_path')!r}: its tokenizer differs from the policy's "
                          f"({len(tokenizer)} vs {len(policy)} tokens, or other ids); TGDPO's token rewards are "
                          f"log-ratios on the policy's tokens, so π_rm must share the policy's tokenizer")
    return prepare_scoring_model(trainer, model)
