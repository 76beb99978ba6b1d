"""Rows whose prompt does not fit, counted and reported before training, then refused, dropped or kept as the
source's `too_long` says.

TRL cuts every sequence at `max_length`, keeping its start (sft, dpo with truncation_mode keep_start): a prompt of
`max_length` tokens or more leaves nothing of its completion, so the row trains on nothing (SFT's loss is on the
completion only) or on a preference between two empty answers. GRPO keeps the whole prompt and generates up to
`max_completion_length` tokens after it: past the model's `max_position_embeddings` the positions run out.
Rows whose completion is only partly cut are counted and reported, not refused.

`too_long`: `refuse` (the default in sft and dpo): an error naming the first such row, its length and how many
there are, before anything is written; `drop`: those rows are left out (reported: how many, the longest); `keep`
(the default in grpo, where TRL does not cut prompts and RoPE models run past their nominal positions): trained
on as they are (reported).

Lengths are counted with the policy's tokenizer: plain text as it is, chat turns through its chat template
(prompts with the generation prompt), as TRL renders them; rows of `messages` or `text` have no prompt and are
not counted.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from postrain.errors import DataError
from postrain.models.loading import load_tokenizer, resolve_model_path

logger = logging.getLogger(__name__)

TOO_LONG_POLICIES = ("refuse", "drop", "keep")
# `too_long: null`: a prompt that leaves no completion token (sft, dpo) is refused; a GRPO prompt past the model's
# nominal positions is reported and kept (a RoPE model runs past max_position_embeddings, as TRL lets it).
DEFAULT_POLICY = {"sft": "refuse", "dpo": "refuse", "grpo": "keep"}


def _lengths(tokenizer, values: list, prompt: bool) -> list[int]:
    texts = [v for v in values if isinstance(v, str)]
    plain = iter(tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else iter(())
    out = []
    for value in values:
        if isinstance(value, str):
            out.append(len(next(plain)))
        elif isinstance(value, list) and getattr(tokenizer, "chat_template", None):
            out.append(len(tokenizer.apply_chat_template(value, tokenize=True, add_generation_prompt=prompt,
                                                         return_dict=False)))
        else:
            out.append(0)
    return out


def _model_positions(model_path: str) -> int | None:
    config = Path(model_path) / "config.json"
    if not config.is_file():
        return None
    value = json.loads(config.read_text()).get("max_position_embeddings")
    return value if isinstance(value, int) and value > 0 else None


def fit_lengths(dataset, job: str, args, tokenizer, model_path: str, policy: str, where: str):
    """The dataset with rows whose prompt does not fit refused (DataError), dropped or kept, per `policy`, and the
    counts reported (a warning). `args`: the job's TRL config."""
    if "prompt" not in dataset.column_names or len(dataset) == 0:
        return dataset
    if job in ("sft", "dpo"):
        limit = getattr(args, "max_length", None)
        if limit is None or getattr(args, "packing", False) or getattr(args, "truncation_mode", "keep_start") != \
                "keep_start":
            return dataset
        what = f"trainer.max_length={limit}"
        prompts = _lengths(tokenizer, dataset["prompt"], prompt=True)
        room = [limit - p for p in prompts]  # completion tokens TRL keeps; none at 0
        bound = f"at least {limit}"
        answers = [c for c in ("completion", "chosen", "rejected") if c in dataset.column_names]
        longest_answer = [max(column) for column in zip(*(_lengths(tokenizer, dataset[c], prompt=False)
                                                          for c in answers))] if answers else [0] * len(prompts)
        partly = sum(1 for r, a in zip(room, longest_answer) if 0 < r < a)
        consequence = "nothing of their completion would be trained on (TRL keeps a sequence's start)"
    elif job == "grpo":
        positions = _model_positions(model_path)
        if positions is None:
            return dataset
        limit = positions - args.max_completion_length
        what = (f"the model's max_position_embeddings={positions} minus trainer.max_completion_length="
                f"{args.max_completion_length}")
        prompts = _lengths(tokenizer, dataset["prompt"], prompt=True)
        room = [limit - p + 1 for p in prompts]  # a prompt of `limit` tokens still fits
        bound = f"more than {limit}"
        partly = 0
        consequence = "a completion of max_completion_length tokens would run past the model's positions"
    else:
        return dataset
    too_long = [i for i, r in enumerate(room) if r <= 0]
    if partly:
        logger.warning("%s: %d of %d rows are longer than %s: TRL cuts their completions short", where, partly,
                       len(prompts), what)
    if not too_long:
        return dataset
    first, longest = too_long[0], max(prompts[i] for i in too_long)
    size = prompts[first] if len(too_long) == 1 else f"up to {longest}"
    summary = (f"{where}: {len(too_long)} of {len(prompts)} rows have a prompt of {size} tokens, {bound} "
               f"({what}): {consequence}")
    if policy == "refuse":
        raise DataError(f"{summary}. The first is row {first} of {where}, from 0 ({prompts[first]} tokens). Set "
                        f"{where}.too_long: drop "
                        f"to leave such rows out (or keep, to train on them truncated), or raise the limit")
    if policy == "drop":
        keep = [i for i in range(len(prompts)) if room[i] > 0]
        if not keep:
            raise DataError(f"{summary}; {where}.too_long: drop would leave no row")
        logger.warning("%s; dropped (%s.too_long: drop), %d rows left", summary, where, len(keep))
        return dataset.select(keep)
    logger.warning("%s; kept (%s.too_long: keep)", summary, where)
    return dataset



def fit_source_lengths(dataset, job: str, args, model_spec: dict, source: dict, where: str):
    """fit_lengths with the policy's tokenizer (the job's model) and the source's `too_long`."""

    model_path = resolve_model_path(model_spec["name_or_path"], model_spec.get("tiny"))
    tokenizer = load_tokenizer(model_path, model_spec)
    policy = (source or {}).get("too_long") or DEFAULT_POLICY.get(job, "refuse")
    return fit_lengths(dataset, job, args, tokenizer, model_path, policy, where)
