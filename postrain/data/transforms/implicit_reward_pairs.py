"""DICE's data (Bootstrapping Language Models with DPO Implicit Rewards, arXiv 2406.09760; authors' code
sail-sg/dice): pairs chosen by the DPO implicit reward, and the experience-replay mix with offline pairs.

`transform: implicit_reward_pairs` reads scored-or-not samples (an eval run's samples.jsonl: prompt, completion; K
rows per prompt) and scores each with two models, the DPO-trained policy π and its reference π_ref:

    r(x, y) = beta · (log π(y|x) − log π_ref(y|x)) − length_penalty · len(y)

log π(y|x) summed over the completion's tokens, len(y) the completion's length in characters (the authors'
generate_dpo_scores.py: score = logps_pi − logps_pi_ref, both LLaMA-Factory's summed `get_all_reference_logps`; their
generate_lc_paired_set.py: score − alpha · len(response), Python's len of the text). Per prompt the highest-r sample
is chosen, the lowest rejected. `length_penalty: auto` is the authors' optimize_alpha: alpha = 0, 0.001, ... < 1,
stopping at the first alpha whose mean (len(chosen) − len(rejected)) is farther from 0 than the best so far, and
taking the best.

The log-probs are those TRL 1.16's DPO trainer computes for the same text as a chosen (or rejected) completion:
the prompt and completion are tokenized as `DPOTrainer._prepare_dataset` tokenizes them (the piece copied below,
pinned by a hash of that method in tests/test_dice.py), without truncation, and a plain forward sums the
completion tokens' log-probs. Both models read the policy's token ids (a reference with another vocabulary is
refused). One model is loaded at a time.

`mix:` (any source) concatenates a second source's rows, as the authors' create_mix_paired_set draws them
(postrain.data.mix).
"""

from __future__ import annotations

import gc
import json
from typing import Any, Literal

from postrain.data.rows import format_row, require_columns
from postrain.data.transforms.registry import TRANSFORMS
from postrain.errors import RecipeError
from postrain.models.generation import completion_logps
from postrain.models import loading as model_loading  # load_model through it: tests replace it there

TRANSFORM = "implicit_reward_pairs"
# The authors' alpha grid (generate_lc_paired_set.py main: alpha_range=(0.0, 1.0, 0.001)).
ALPHA_GRID = (0.0, 1.0, 0.001)


# --- load-time checks --------------------------------------------------------------------------------------------

def _check(params: dict, spec: dict, where: str) -> None:
    """The section names both models, and its numbers are usable."""
    if not isinstance(spec.get("implicit_reward"), dict):
        raise RecipeError(f"{where}.implicit_reward: transform {TRANSFORM!r} needs the two models that score each "
                          f"sample, e.g. implicit_reward: {{policy: {{name_or_path: runs/dpo}}, reference: "
                          f"{{name_or_path: runs/sft}}}}")
    for key in ("policy", "reference"):
        model = params[key]
        if not isinstance(model, dict) or not model.get("name_or_path"):
            raise RecipeError(f"{where}.implicit_reward.{key}: a model is needed ({'the DPO-trained policy π' if key == 'policy' else 'the policy’s DPO reference π_ref'}), "
                              f"e.g. {key}: {{name_or_path: ...}}; got {model!r}")
    if not params["beta"] > 0:
        raise RecipeError(f"{where}.implicit_reward.beta: must be a number > 0 (r = beta·(log π − log π_ref) − "
                          f"length_penalty·len), got {params['beta']!r}")
    alpha = params["length_penalty"]
    if alpha != "auto" and alpha < 0:
        raise RecipeError(f"{where}.implicit_reward.length_penalty: a number >= 0 (per character) or 'auto' (the "
                          f"authors' sweep), got {alpha!r}")
    if params["min_samples"] < 2:
        raise RecipeError(f"{where}.implicit_reward.min_samples: must be an integer >= 2, got "
                          f"{params['min_samples']!r}")


# --- tokenization and log-probs ----------------------------------------------------------------------------------

def completion_ids(tokenizer, prompt: Any, completion: Any) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) as TRL's DPO trainer tokenizes a prompt with a chosen completion.

    Copied from TRL 1.16.0 trl/trainer/dpo_trainer.py, DPOTrainer._prepare_dataset: its `add_eos` (non-conversational
    completions get the EOS token) and `tokenize_fn` (prompt alone with the generation prompt, prompt + completion,
    the completion starting where the two diverge), for one completion: the method gives no hook to tokenize a
    single text. Left out: tools / chat_template_kwargs (samples carry none) and the minimum over chosen and
    rejected of the common prefix (one completion here). tests/test_dice.py pins the method's source."""
    # slow: trl, only when the transform scores pairs
    from trl.data_utils import _tokenize, common_prefix_length, is_conversational

    if is_conversational({"prompt": prompt, "chosen": completion}):
        prompt_ids = _tokenize(tokenizer, prompt, add_generation_prompt=True)["input_ids"]
        full_ids = _tokenize(tokenizer, prompt + completion)["input_ids"]
    else:
        if not completion.endswith(tokenizer.eos_token):
            completion = completion + tokenizer.eos_token
        prompt_ids = _tokenize(tokenizer, prompt)["input_ids"]
        full_ids = _tokenize(tokenizer, prompt + completion)["input_ids"]
    prompt_len = common_prefix_length(prompt_ids, full_ids)
    return full_ids[:prompt_len], full_ids[prompt_len:]


def summed_logps(model, sequences: list[tuple[list[int], list[int]]], batch_size: int) -> list[float]:
    """Σ_t log p(y_t | x, y_<t) over each (prompt ids, completion ids), right-padded: postrain's one completion
    scorer (postrain.models.generation), the one INPO's and MRPO's extra models score with too."""
    return completion_logps(model, sequences, batch_size=batch_size)


def _load(settings: dict, key: str):
    # load_model fills in ModelSpec's defaults (dtype auto, the tiny model's shape) for the keys a spec leaves out
    model, tokenizer, _ = model_loading.load_model(settings[key])
    # slow: torch, only when the transform scores pairs
    import torch

    if torch.cuda.is_available():
        model = model.to("cuda")
    return model, tokenizer


def _free(model) -> None:
    del model
    gc.collect()
    # slow: torch, only when the transform scores pairs
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def score_samples(views: list[tuple[Any, Any]], settings: dict, where: str) -> tuple[list[float], list[float]]:
    """(log π, log π_ref) of each (prompt, completion), tokenized with the policy's tokenizer."""
    policy, tokenizer = _load(settings, "policy")
    sequences = [completion_ids(tokenizer, prompt, completion) for prompt, completion in views]
    batch_size = settings.get("batch_size", 8)
    policy_logps = summed_logps(policy, sequences, batch_size)
    _free(policy)
    reference, reference_tokenizer = _load(settings, "reference")
    if reference_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise RecipeError(f"{where}.implicit_reward.reference: its tokenizer differs from the policy's; both models "
                          f"score the policy's token ids, so they must share a tokenizer")
    reference_logps = summed_logps(reference, sequences, batch_size)
    _free(reference)
    return policy_logps, reference_logps


# --- pairing ----------------------------------------------------------------------------------------------------

def pair_best_worst(rows: list[dict], rewards: list[float], min_samples: int) -> list[dict]:
    """Per prompt (in the order prompts first appear), the highest-reward row chosen against the lowest (the first of
    equal ones); prompts with fewer than `min_samples` rows, or whose rewards are all equal, give no pair. The chosen
    row's other columns are kept; `score_chosen` / `score_rejected` are the two rewards."""
    groups: dict[str, list[tuple[float, dict]]] = {}
    for row, reward in zip(rows, rewards):
        groups.setdefault(json.dumps(row["prompt"], sort_keys=True), []).append((reward, row))
    pairs = []
    for group in groups.values():
        if len(group) < min_samples:
            continue
        best = max(range(len(group)), key=lambda i: group[i][0])
        worst = min(range(len(group)), key=lambda i: group[i][0])
        if group[best][0] <= group[worst][0]:
            continue
        (high, chosen), (low, rejected) = group[best], group[worst]
        pairs.append({**chosen, "chosen": chosen["completion"], "rejected": rejected["completion"],
                      "score_chosen": high, "score_rejected": low})
    return pairs


def sweep_length_penalty(rows: list[dict], log_ratios: list[float], min_samples: int) -> float:
    """The authors' optimize_alpha: alpha over 0, 0.001, ... < 1; stop at the first alpha whose mean character-length
    difference |mean(len(chosen) − len(rejected))| exceeds the smallest so far; return the alpha of the smallest."""
    # slow: numpy, only when the transform scores pairs
    import numpy as np

    lengths = [len(r["completion"]) for r in rows]
    tried: list[tuple[float, float]] = []
    for alpha in np.arange(*ALPHA_GRID):
        pairs = pair_best_worst(rows, [s - alpha * n for s, n in zip(log_ratios, lengths)], min_samples)
        if not pairs:
            break
        gap = abs(sum(len(p["chosen"]) - len(p["rejected"]) for p in pairs) / len(pairs))
        tried.append((float(alpha), gap))
        if gap > min(g for _, g in tried):
            break
    return min(tried, key=lambda t: t[1])[0] if tried else 0.0


@TRANSFORMS.register(TRANSFORM, section="implicit_reward", rows_per_row=None, models=("policy", "reference"),
                     columns=("prompt", "completion"), check=_check, ranges={"batch_size": ">= 1"},
                     empty="no prompt has at least implicit_reward.min_samples samples of different implicit rewards",
                     paper="Bootstrapping Language Models with DPO Implicit Rewards", arxiv="2406.09760")
def implicit_reward_pairs(rows: list[dict], where: str, source=None, *, policy: dict[str, Any],
                          reference: dict[str, Any], beta: float = 1.0,
                          length_penalty: float | Literal["auto"] = 0.0, min_samples: int = 2,
                          batch_size: int = 8) -> list[dict]:
    """DICE's pairs: each (prompt, completion) row scored r = beta·(log π(y|x) − log π_ref(y|x)) −
    length_penalty·len(y) with the `policy` π and its DPO `reference` π_ref (model specs, as `model:`), per prompt
    the best against the worst. Prompts with fewer than `min_samples` scored samples give no pair (the authors: 8
    of 16, generate_lc_paired_set n_least_score); `length_penalty: auto` is the authors' sweep; `batch_size` rows
    per forward. Defaults are the authors' (sail-sg/dice generate_dpo_scores.py: no beta). The models see the
    prompt and completion as the DPO job will train on them (the `source`'s chat / system_prompt /
    prompt_template applied, as load_source applies them to the pairs)."""
    settings = {"policy": policy, "reference": reference, "batch_size": batch_size}
    require_columns(rows, ("prompt", "completion"), where, TRANSFORM, " (an eval run's samples.jsonl)")
    views = []
    for row in rows:
        formats = source is not None and (source.chat or source.system_prompt or source.prompt_template)
        view = format_row({"prompt": row["prompt"], "completion": row["completion"]}, source) if formats else row
        prompt, completion = view["prompt"], view["completion"]
        if isinstance(prompt, list) and isinstance(completion, str):  # chat samples: the answer is the next turn
            completion = [{"role": "assistant", "content": completion}]
        views.append((prompt, completion))
    policy_logps, reference_logps = score_samples(views, settings, where)
    log_ratios = [beta * (p - r) for p, r in zip(policy_logps, reference_logps)]
    alpha = length_penalty
    if alpha == "auto":
        alpha = sweep_length_penalty(rows, log_ratios, min_samples)
        print(f"[{where}] implicit_reward.length_penalty auto: {alpha:g} per character", flush=True)
    rewards = [s - alpha * len(row["completion"]) for s, row in zip(log_ratios, rows)]
    return [{**pair, "length_penalty": float(alpha)} for pair in pair_best_worst(rows, rewards, min_samples)]
