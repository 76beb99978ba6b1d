"""Per-turn log-probs of multi-turn trajectories in the DPO trainer: the inputs of DMPO and SDPO.

DMPO (`dmpo`, "Direct Multi-Turn Preference Optimization for Language Agents", arXiv 2406.14868) weighs each agent
turn of a trajectory by its own coefficient, so it reads per-turn summed log-probs (B, J) of the agent (assistant)
turns of chosen and rejected, with turn masks:

    chosen_turn_logps, rejected_turn_logps, ref_chosen_turn_logps, ref_rejected_turn_logps, chosen_turn_mask,
    rejected_turn_mask

SDPO (`sdpo_segment`, arXiv 2501.01821) reads the same inputs and sums them with weight 1: DPO on the agent turns of
two dialogue segments, the dialogue before the segments being the `prompt`.

The data are conversational pairs, as the authors' (swt-user/DMPO construct_preference_nocut.py): `prompt` the
instruction messages ending with the task (a user turn), `chosen` / `rejected` the two trajectories that follow,
agent turns (assistant) alternating with environment observations (user), ending with an agent turn:

    {"prompt": [{"role": "user", "content": "...task..."}],
     "chosen": [{"role": "assistant", "content": "Thought: ... Action: ..."},
                {"role": "user", "content": "Observation: ..."},
                {"role": "assistant", "content": "..."}],
     "rejected": [...]}

What counts as a turn: each assistant message of `chosen` / `rejected` (the prompt's messages are context, as in
the authors' code, whose first, prompt-side round is never indexed). TRL 1.16 renders prompt + chosen with the
chat template and marks every token after the prompt as completion, user / environment turns included; the turn
spans are found here by rendering the conversation's prefixes the same way (TRL's `_tokenize`, the example's
`tools` and `chat_template_kwargs`), as TRL finds the prompt's end by common prefix:
  start of assistant turn k = the length of prompt + continuation[:k] rendered with the generation prompt
  end of assistant turn k   = the length of prompt + continuation[:k+1] rendered without it
Both renderings must be prefixes of the tokenized prompt + continuation; a chat template for which they are not
(one that renders earlier turns differently once later ones follow, e.g. by dropping their thoughts) is refused
with a DataError naming the row, since then no token span of the full sequence is "that turn".
A turn's span is therefore its content and the template's end of turn (ChatML: `...<|im_end|>\n`), as TRL's
single-turn completion is; the role header (`<|im_start|>assistant\n`) is the generation prompt and not part of it.
The authors' code (fastchat's Llama-2 / Vicuna templates, mask_labels) puts the content in the turn's span and
leaves the turn's `</s>` outside it with coefficient 1; here the end-of-turn tokens are weighted with their turn.
Only assistant tokens enter the per-turn sums: the observation turns' tokens are in TRL's completion mask (and in
`chosen_logps`, which DMPO does not read) but in no turn. The authors' loss masks them too (mask_labels sets the
user turns' labels to IGNORE_TOKEN_ID).

Truncation. The spans are stored per row (`chosen_turn_spans`, `rejected_turn_spans`: [start, end) in TRL's
completion tokens) and turned into a per-position turn id (0: no turn, j + 1: turn j) by the collator, which
repeats TRL's `keep_start` cut at `max_length` and pads to TRL's padded width. A turn that the cut reaches is
dropped whole (its mask is 0, its tokens count nowhere), and so are the turns after it: each turn's value is then
the log-prob of a whole turn, and T in DMPO's coefficients is the number of turns that fit. (The authors keep the
tokens of a cut turn and count every turn in T; with max_length above the longest pair, as their 4096, both agree.)
`truncation_mode: keep_end` is refused at load time: it cuts the first turns, which DMPO weighs most, and would
re-number the rest from turn 0. `precompute_ref_log_probs` is refused too: TRL precomputes summed log-probs only.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

import torch

from postrain.errors import DataError, RecipeError
# the data names and load-time checks of per-turn losses are vocabulary of the `loss:` section
from postrain.preference.turn_data import per_turn_losses, reads_turns

SPAN_COLUMNS = ("chosen_turn_spans", "rejected_turn_spans")  # dataset columns: [[start, end], ...] per row
TURN_IDS = "turn_ids"  # batch key: (2B, L) turn id per position (0: no assistant turn, j + 1: turn j)


def _is_messages(value: Any) -> bool:
    return (isinstance(value, list) and bool(value)
            and all(isinstance(m, dict) and "role" in m and "content" in m for m in value))


def check_turn_row(example: dict, where: str) -> None:
    """Data time: a row for per-turn losses is a conversational pair whose trajectories hold agent turns."""
    for key in ("prompt", "chosen", "rejected"):
        value = example.get(key)
        if not _is_messages(value):
            raise DataError(f"{where}: per-turn preference losses ({per_turn_losses()}) read multi-turn "
                            f"conversations: `{key}` must "
                            f"be a list of messages {{role, content}} (prompt: the task's messages; chosen / "
                            f"rejected: the agent's trajectory, assistant turns alternating with user / environment "
                            f"turns), got {value!r:.120}")
    for key in ("chosen", "rejected"):
        if example[key][0]["role"] != "assistant":
            raise DataError(f"{where}: `{key}` must start with the agent's (assistant) turn, which follows the "
                            f"prompt's generation prompt; it starts with a {example[key][0]['role']!r} message. Put "
                            f"the messages before the first agent turn in `prompt`")


def check_turn_rows(terms: list, dataset, where: str) -> None:
    """Data-load-time check of a whole dataset, naming the first bad row."""
    if not reads_turns(terms):
        return
    for i, example in enumerate(dataset):
        check_turn_row(example, f"{where}, row {i}")


def _template_kwargs(example: dict) -> dict:
    # As TRL 1.16 DPOTrainer._prepare_dataset's tokenize_fn builds them (copied, its first three lines), so the
    # prefixes are rendered as TRL renders the whole conversation.
    tools = example.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    return {"tools": tools, **example.get("chat_template_kwargs", {})}


def assistant_turn_spans(processing_class, prompt: list, continuation: list, prompt_ids: list[int],
                         completion_ids: list[int], template_kwargs: dict | None = None,
                         where: str = "row") -> list[list[int]]:
    """[start, end) of each assistant turn of `continuation` within `completion_ids` (TRL's completion tokens after
    `prompt_ids`), from the rendered prefixes; DataError if a prefix does not render as a prefix of the whole."""
    from trl.data_utils import _tokenize  # slow: trl; --smoke reads this module too

    kwargs = template_kwargs or {}
    full = list(prompt_ids) + list(completion_ids)
    offset = len(prompt_ids)

    def prefix_length(messages: list, add_generation_prompt: bool, what: str) -> int:
        ids = list(_tokenize(processing_class, messages, add_generation_prompt=add_generation_prompt,
                             **kwargs)["input_ids"])
        if full[:len(ids)] != ids or len(ids) < offset:
            raise DataError(
                f"{where}: the chat template is not prefix-stable, so the agent turns' tokens cannot be found: "
                f"the conversation up to {what}, rendered alone, is not a prefix of the whole conversation "
                f"rendered (they differ from token {_first_difference(full, ids)}). Per-turn losses "
                f"({per_turn_losses()}) need a template that renders earlier turns the same whatever follows them "
                f"(ChatML, Llama, ...); pass another one with the model's tokenizer")
        return len(ids) - offset

    spans = []
    for k, message in enumerate(continuation):
        if message["role"] != "assistant":
            continue
        start = prefix_length(prompt + continuation[:k], True, f"the start of assistant turn {len(spans)}")
        end = prefix_length(prompt + continuation[:k + 1], False, f"the end of assistant turn {len(spans)}")
        if end <= start:
            raise DataError(f"{where}: assistant turn {len(spans)} renders to no tokens ({start} to {end})")
        spans.append([start, end])
    return spans


def _first_difference(a: list, b: list) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def add_turn_spans(trainer) -> None:
    """After TRL tokenized the datasets (its columns prompt_ids / chosen_ids / rejected_ids beside the raw
    messages): add the span columns to the train and eval datasets."""
    if getattr(trainer, "_is_vision_dataset", False):
        raise RecipeError(f"per-turn preference losses ({per_turn_losses()}) read text conversations; TRL "
                          f"prepares vision data in the collator, where no turn spans are computed")
    processing_class = trainer.processing_class

    def spans(example: dict, index: int, name: str) -> dict:
        where = f"{name} dataset, row {index}"
        check_turn_row(example, where)
        kwargs = _template_kwargs(example)
        return {f"{side}_turn_spans": assistant_turn_spans(processing_class, example["prompt"], example[side],
                                                           example["prompt_ids"], example[f"{side}_ids"], kwargs,
                                                           f"{where}, {side}")
                for side in ("chosen", "rejected")}

    def with_spans(dataset, name: str):
        return dataset.map(spans, with_indices=True, fn_kwargs={"name": name})

    trainer.train_dataset = with_spans(trainer.train_dataset, "train")
    if isinstance(trainer.eval_dataset, dict):
        trainer.eval_dataset = {key: with_spans(ds, key) for key, ds in trainer.eval_dataset.items()}
    elif trainer.eval_dataset is not None:
        trainer.eval_dataset = with_spans(trainer.eval_dataset, "eval")


def turn_ids_row(prompt_length: int, completion_length: int, spans: list, max_length: int | None) -> list[int]:
    """The turn id of each position of prompt + completion, cut at `max_length` as TRL's keep_start cuts it; a turn
    the cut reaches is dropped whole, with the turns after it."""
    total = prompt_length + completion_length
    kept = total if max_length is None else min(total, max_length)
    ids = [0] * kept
    for j, (start, end) in enumerate(spans):
        if prompt_length + end > kept:
            break
        ids[prompt_length + start:prompt_length + end] = [j + 1] * (end - start)
    return ids


@dataclasses.dataclass
class WithTurnIds:
    """TRL's preference collator (possibly wrapped), plus `turn_ids` (2B, L): chosen rows, then rejected rows, as
    TRL stacks `input_ids`, right-padded with 0 to its width."""

    collator: Callable
    max_length: int | None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(examples)
        width = batch["input_ids"].size(1)
        rows = [turn_ids_row(len(e["prompt_ids"]), len(e[f"{side}_ids"]), e[f"{side}_turn_spans"], self.max_length)
                for side in ("chosen", "rejected") for e in examples]
        out = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        batch[TURN_IDS] = out
        return batch


def turn_sums(per_token: torch.Tensor, turn_ids: torch.Tensor, n_turns: int) -> torch.Tensor:
    """Σ over each turn's tokens: (N, T) per-token values and (N, T) turn ids (0: none) -> (N, n_turns)."""
    sums = per_token.new_zeros(per_token.size(0), n_turns + 1)  # column 0 collects the positions in no turn
    return sums.scatter_add(1, turn_ids, per_token)[:, 1:]


def turn_data(turn_ids: torch.Tensor, per_token_logps: torch.Tensor, data: dict) -> dict[str, torch.Tensor]:
    """The per-turn registry data of a batch: `turn_ids` (2B, L) from the collator, `per_token_logps` (2B, T) the
    policy's (T = L − 1: position t scores token t + 1, as TRL's shifted completion mask), the reference's from
    `data` (ref_*_token_logps) when it holds them."""
    seq_len = per_token_logps.size(1)
    shifted = turn_ids[:, 1:][:, -seq_len:].to(per_token_logps.device)
    n_turns = int(shifted.max().item()) if shifted.numel() else 0
    masks = (torch.arange(1, n_turns + 1, device=shifted.device) <= shifted.max(dim=1, keepdim=True).values)
    out = {}
    out["chosen_turn_mask"], out["rejected_turn_mask"] = masks.to(per_token_logps.dtype).chunk(2, dim=0)
    out["chosen_turn_logps"], out["rejected_turn_logps"] = turn_sums(per_token_logps, shifted, n_turns).chunk(2)
    if "ref_chosen_token_logps" in data:
        reference = torch.cat([data["ref_chosen_token_logps"], data["ref_rejected_token_logps"]], dim=0)
        out["ref_chosen_turn_logps"], out["ref_rejected_turn_logps"] = \
            turn_sums(reference, shifted, n_turns).chunk(2)
    return out
