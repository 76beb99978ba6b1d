"""Shared-prefix GRPO: each group's prompt is encoded once, in training forwards and in HF generation.

The switch is `trainer.shared_prefix: true` (postrain.trainers.grpo.PostrainGRPOConfig). It changes how the same
numbers are computed, never which numbers: per-token log-probs, entropies and gradients are those of the standard
forward (Prefix Grouper, arXiv 2506.05433, johncaged/PrefixGrouper), and generation samples from the same
distribution.

Training forwards (policy, old policy, reference: TRL's `_get_per_token_logps_and_entropies`, which both TRL's loss
and the `rl:` path call). The rows of a batch that share a prompt are found by comparing their prompt ids (so it
works whatever order TRL's shuffle left), and each such group becomes one packed row

    [p_1 .. p_{q-1}] [p_q c1_1 .. c1_{n1-1}] [p_q c2_1 .. c2_{n2-1}] ...

where p is the prompt's real tokens (left padding dropped), c_j the j-th completion's real tokens (n_j of them;
right padding dropped) and p_q the last prompt token, repeated at the head of each completion's segment. A 4D
attention mask lets the prompt attend causally to itself and each segment to the prompt and causally to itself,
never to another segment; position ids are the columns the tokens have in the standard [prompt | completion] row,
so every query sees exactly the keys, at exactly the positions, it sees there. Each position then predicts one
token: the copy of p_q predicts c_j's first token (the standard row predicts it from the prompt's last position,
whose hidden state the copy reproduces: it attends to p_1 .. p_{q-1} and itself), and c_j's last token is never
an input. TRL's fused LM head scores the packed row through its `shift_labels` input (temperature, logit scaling
and the fp32 head exactly as in the standard call), and the scores are put back at their (row, column) in the
(rows, completion length) output, 0 where the completion is padding, as TRL's labels of -100 give.

Tokens per group go from G(P + T) to P + sum_j n_j, the Prefix Grouper count (one token more per completion for
the repeated p_q). Batches that do not have TRL's layout (left-padded prompts whose last column is real,
completion masks that are a run of ones then zeros) take TRL's own forward.

Generation: TRL's RepeatSampler puts each prompt G times in the generation batch; `generate_with_shared_prefill`
runs the prompt's first q-1 tokens once per distinct prompt into a KV cache, repeats the cache for the rows that
share it, and hands it to transformers' `generate`, which then starts from the last prompt token (its documented
prefix-cache reuse). The position ids are the ones `generate` computes (cumulative attention mask), so the cache
holds what `generate` would have computed, and the logits at every step are the same.

Supported: the model families and attention implementations below, checked for honouring a custom 4D mask and
per-token position ids (tests/test_shared_prefix_grpo.py); anything else is refused when the recipe loads or,
for a hub model whose config is not on disk yet, when the trainer is built.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import torch

from postrain.errors import RecipeError, origin_of
from postrain.models.loading import resolve_model_path
from postrain.models.packaged import converted_dir, is_packaged
from postrain.models.tiny import TinyModelSpec, build_tokenizer, is_tiny, tiny_config

# model_type -> why it is supported: decoder-only with rotary position embeddings applied from `position_ids`, and a
# 4D attention mask passed to the attention function as given (transformers' masking_utils returns a 4D mask as-is).
SUPPORTED_MODEL_TYPES = {"qwen2": "Qwen2 (the embedded tiny model)", "llama": "Llama (SmolLM2)"}
# Attention functions that take an arbitrary dense mask: sdpa (boolean, True = attend) and eager (additive).
# flash_attention_* take no mask but padding; flex_attention wants a BlockMask: refused.
SUPPORTED_ATTENTION = ("sdpa", "eager")
# RoPE variants whose rotation depends on the position alone (dynamic NTK / longrope rescale by sequence length,
# which packing changes).
POSITION_ONLY_ROPE = ("default", "linear", "llama3")


def unsupported_reason(config: Any, attn_implementation: str | None = None) -> str | None:
    """Why a model with this config cannot run shared-prefix forwards exactly, or None if it can."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return (f"model type {model_type!r} is not one whose attention is known to honour a custom 4D mask and "
                f"per-completion position ids (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    implementation = attn_implementation or getattr(config, "_attn_implementation", None) or "sdpa"
    if implementation not in SUPPORTED_ATTENTION:
        return (f"attention implementation {implementation!r} cannot take the block attention mask that keeps "
                f"completions apart (supported: {', '.join(SUPPORTED_ATTENTION)})")
    layer_types = getattr(config, "layer_types", None) or []
    if getattr(config, "use_sliding_window", False) or any(t != "full_attention" for t in layer_types):
        return "the model has sliding-window layers, which the 4D mask would override with full attention"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in POSITION_ONLY_ROPE:
        return (f"RoPE type {rope_type!r} rescales with the sequence length, which packing changes "
                f"(supported: {', '.join(POSITION_ONLY_ROPE)})")
    return None


def _known_config(model: dict) -> Any | None:
    """The config of the recipe's model where it can be read without loading weights or the network: the tiny
    model's, a local folder's (a run directory's model/), a hub model's already in the local cache; else None."""
    # slow: transformers; check_recipe below runs when a recipe loads
    from transformers import AutoConfig

    name = model["name_or_path"]
    try:
        if is_tiny(name):
            return tiny_config(build_tokenizer(), {**TinyModelSpec().__dict__, **(model.get("tiny") or {})})
        path = str(converted_dir(name)) if is_packaged(name) else resolve_model_path(name)
        return AutoConfig.from_pretrained(path, revision=model.get("revision"), local_files_only=True)
    except Exception:  # not on disk yet (a packaged model before its conversion, a hub model not cached)
        return None


def check_recipe(command: str, cfg: dict, origins: dict[str, str]) -> None:
    """Load-time check of `trainer.shared_prefix: true`: the model and its attention implementation must honour
    the block mask and position ids (a hub model whose config is not on disk is checked when the trainer is
    built), and no TRL option that replaces the model's modules may be on."""
    trainer = cfg.get("trainer") or {}
    if command != "grpo" or not trainer.get("shared_prefix"):
        return
    switch = f"trainer.shared_prefix (from {origin_of(origins, 'trainer.shared_prefix')})"
    if trainer.get("use_liger_kernel"):
        raise RecipeError(f"{switch} cannot be combined with trainer.use_liger_kernel (from "
                          f"{origin_of(origins, 'trainer.use_liger_kernel')}): Liger replaces the model's layers, "
                          f"which are not checked to honour the block attention mask")
    model = cfg.get("model") or {}
    config = _known_config(model)
    implementation = model.get("attn_implementation")
    if config is None:
        reason = None if implementation in (None, *SUPPORTED_ATTENTION) else (
            f"attention implementation {implementation!r} cannot take the block attention mask that keeps "
            f"completions apart (supported: {', '.join(SUPPORTED_ATTENTION)})")
    else:
        reason = unsupported_reason(config, implementation)
    if reason is not None:
        raise RecipeError(f"{switch} cannot run on model {model.get('name_or_path')!r} (model.attn_implementation "
                          f"{implementation!r}): {reason}. Set trainer.shared_prefix: false")


# --- grouping and packing -----------------------------------------------------------------------------------------


def prompt_groups(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows with the same prompt (same real tokens in the same columns). Returns each row's group index and each
    group's first row, groups numbered in order of their first row."""
    key = torch.cat([prompt_ids * prompt_mask, prompt_mask], dim=1)
    _, inverse = torch.unique(key, dim=0, return_inverse=True)
    n = inverse.numel()
    first = torch.full((int(inverse.max()) + 1,), n, dtype=torch.long, device=inverse.device)
    first = first.scatter_reduce(0, inverse, torch.arange(n, device=inverse.device), reduce="amin")
    order = torch.argsort(first)  # renumber by first appearance
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    return rank[inverse], first[order]


def shareable_layout(attention_mask: torch.Tensor, logits_to_keep: int) -> bool:
    """Whether a batch has TRL's layout: every prompt's last column real (left padding), and each completion mask
    ones then zeros, so that every scored token is predicted from a real token the packed row holds."""
    prompt_width = attention_mask.size(1) - logits_to_keep
    if prompt_width < 1 or not bool(attention_mask[:, prompt_width - 1].bool().all()):
        return False
    completion = attention_mask[:, prompt_width:].long()
    return bool((completion[:, 1:] <= completion[:, :-1]).all())


@dataclass
class PackedChunk:
    """Packed rows for one model call, and where their scores go in the (rows, completion length) output."""

    input_ids: torch.Tensor  # (B, L)
    position_ids: torch.Tensor  # (B, L)
    segments: torch.Tensor  # (B, L): 0 prompt, j >= 1 the j-th completion of the row, -1 padding
    shift_labels: torch.Tensor  # (B, L): the token each position predicts, -100 where none is scored
    source: torch.Tensor  # (K,) flat index into (B * L) of each scored position
    target_rows: torch.Tensor  # (K,) its row in the batch
    target_cols: torch.Tensor  # (K,) its completion column

    @property
    def tokens(self) -> int:
        return int((self.segments >= 0).sum())


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int,
         max_rows_per_chunk: int | None = None) -> list[PackedChunk]:
    """The batch as packed rows, one per group of rows sharing a prompt, split into chunks of whole groups of at
    most `max_rows_per_chunk` completions each (a larger group is a chunk of its own). Needs `shareable_layout`."""
    prompt_width = input_ids.size(1) - logits_to_keep
    groups, first = prompt_groups(input_ids[:, :prompt_width], attention_mask[:, :prompt_width])
    # Index arithmetic on the CPU (one transfer each way); the model inputs are gathered on the device.
    mask_cpu = attention_mask.bool().cpu()
    lengths = mask_cpu[:, prompt_width:].sum(1).tolist()
    members: list[list[int]] = [[] for _ in range(first.numel())]
    for row, group in enumerate(groups.tolist()):
        members[group].append(row)
    chunks, current, count = [], [], 0
    for group, rows in enumerate(members):
        if current and max_rows_per_chunk and count + len(rows) > max_rows_per_chunk:
            chunks.append(current)
            current, count = [], 0
        current.append((int(first[group]), rows))
        count += len(rows)
    if current:
        chunks.append(current)
    return [_pack_chunk(chunk, input_ids, mask_cpu, lengths, prompt_width) for chunk in chunks]


def _pack_chunk(chunk, input_ids, mask_cpu, lengths, prompt_width) -> PackedChunk:
    width = input_ids.size(1)
    rows_tokens, rows_positions, rows_segments, rows_labels = [], [], [], []
    scored = []  # (packed row, offset in row, batch row, completion columns 0..n-1)
    for b, (first, rows) in enumerate(chunk):
        columns = torch.nonzero(mask_cpu[first, :prompt_width]).flatten()  # real prompt columns, last = P - 1
        tokens = [first * width + columns[:-1]]  # flat indices into input_ids
        positions = [columns[:-1]]
        segments = [torch.zeros(columns.numel() - 1, dtype=torch.long)]
        labels = [torch.full((columns.numel() - 1,), -1, dtype=torch.long)]  # -1: nothing scored
        offset = columns.numel() - 1
        for j, row in enumerate(rows, start=1):
            n = lengths[row]
            if n == 0:  # nothing scored: TRL's output is 0 on every column of this row
                continue
            steps = torch.arange(n)
            # inputs: the last prompt token, then the completion's first n - 1 tokens; each predicts the next
            tokens.append(torch.cat([torch.tensor([first * width + prompt_width - 1]),
                                     row * width + prompt_width + steps[:-1]]))
            positions.append(prompt_width - 1 + steps)
            segments.append(torch.full((n,), j, dtype=torch.long))
            labels.append(row * width + prompt_width + steps)
            scored.append((b, offset, row, steps))
            offset += n
        rows_tokens.append(torch.cat(tokens))
        rows_positions.append(torch.cat(positions))
        rows_segments.append(torch.cat(segments))
        rows_labels.append(torch.cat(labels))
    length = max(1, max(t.numel() for t in rows_tokens))

    def padded(parts: list[torch.Tensor], value: int) -> torch.Tensor:
        out = torch.full((len(parts), length), value, dtype=torch.long)
        for i, part in enumerate(parts):
            out[i, :part.numel()] = part
        return out

    flat_ids = input_ids.reshape(-1)
    device = input_ids.device
    token_index, label_index = padded(rows_tokens, -1).to(device), padded(rows_labels, -1).to(device)
    packed_ids = torch.where(token_index >= 0, flat_ids[token_index.clamp(min=0)], 0)
    shift_labels = torch.where(label_index >= 0, flat_ids[label_index.clamp(min=0)], -100)
    if scored:
        source = torch.cat([b * length + offset + steps for b, offset, _, steps in scored])
        target_rows = torch.cat([torch.full_like(steps, row) for _, _, row, steps in scored])
        target_cols = torch.cat([steps for _, _, _, steps in scored])
    else:
        source = target_rows = target_cols = torch.zeros(0, dtype=torch.long)
    return PackedChunk(packed_ids, padded(rows_positions, 0).to(device), padded(rows_segments, -1).to(device),
                       shift_labels, source.to(device), target_rows.to(device), target_cols.to(device))


def block_mask(segments: torch.Tensor, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, L, L) attention mask: causal, and a query of segment j >= 1 sees only the prompt (0) and segment j.
    Boolean (True: attend) for sdpa, additive (0 / dtype min) for eager attention, which adds it to the scores.
    Padding queries (-1) see the prompt and earlier padding: never an empty row, and never read."""
    length = segments.size(1)
    index = torch.arange(length, device=segments.device)
    causal = index.unsqueeze(0) <= index.unsqueeze(1)  # [query, key]
    query, key = segments.unsqueeze(2), segments.unsqueeze(1)
    allowed = (causal.unsqueeze(0) & ((key == query) | (key == 0))).unsqueeze(1)
    if attn_implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=segments.device).masked_fill(~allowed,
                                                                                        torch.finfo(dtype).min)


def packed_logps_and_entropies(model, chunks: list[PackedChunk], rows: int, logits_to_keep: int, *,
                               attn_implementation: str, dtype: torch.dtype, compute_entropy: bool,
                               autocast: Callable[[], Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(rows, logits_to_keep) log-probs (and entropies) of the completion tokens through TRL's fused LM head
    (`add_fused_lm_head`: `shift_labels` scored without shifting), 0 where a completion is padding."""
    logps, entropies = [], []
    targets_rows, targets_cols = [], []
    for chunk in chunks:
        with autocast():
            outputs = model(input_ids=chunk.input_ids, position_ids=chunk.position_ids,
                            attention_mask=block_mask(chunk.segments, attn_implementation, dtype),
                            shift_labels=chunk.shift_labels, fused_lm_head=True)
        logps.append(outputs.log_probs.reshape(-1)[chunk.source])
        if compute_entropy:
            entropies.append(outputs.entropy.reshape(-1)[chunk.source])
        targets_rows.append(chunk.target_rows)
        targets_cols.append(chunk.target_cols)
    index = (torch.cat(targets_rows), torch.cat(targets_cols))

    def placed(values: list[torch.Tensor]) -> torch.Tensor:
        flat = torch.cat(values)
        return flat.new_zeros(rows, logits_to_keep).index_put(index, flat)

    return placed(logps), (placed(entropies) if compute_entropy else None)


# --- generation ------------------------------------------------------------------------------------------------


def generate_with_shared_prefill(generate: Callable, model, input_ids: torch.Tensor,
                                 attention_mask: torch.Tensor | None = None, generation_config=None, **kwargs):
    """`generate(input_ids, attention_mask, generation_config, **kwargs)` with each distinct prompt's first q-1
    tokens encoded once into the KV cache its rows start from. Falls back to plain `generate` where there is
    nothing to share or the call asks for something a ready cache conflicts with (a cache implementation, beams,
    several sequences per row, a cache of its own)."""
    config = generation_config
    conflicts = (kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None
                 or attention_mask is None or input_ids.size(1) < 2 or config is None
                 or config.cache_implementation is not None or (config.num_beams or 1) > 1
                 or (config.num_return_sequences or 1) > 1 or config.use_cache is False
                 or getattr(config, "prefill_chunk_size", None) is not None)
    if not conflicts:
        groups, first = prompt_groups(input_ids, attention_mask)
        conflicts = first.numel() == input_ids.size(0)  # every prompt distinct: nothing to share
    if conflicts:
        return generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=generation_config,
                        **kwargs)
    # slow: transformers; recipe loading reads this module
    from transformers import DynamicCache

    prefix_ids, prefix_mask = input_ids[first, :-1], attention_mask[first, :-1]
    # generate's own position ids (GenerationMixin._prepare_position_ids_for_generation): cumulative mask - 1
    positions = (prefix_mask.long().cumsum(-1) - 1).masked_fill(prefix_mask == 0, 0)
    text_config = model.config.get_text_config(decoder=True)
    cache = DynamicCache(config=text_config)
    with torch.no_grad():
        model(input_ids=prefix_ids, attention_mask=prefix_mask, position_ids=positions, cache=cache,
              use_cache=True, logits_to_keep=1)
    cache.reorder_cache(groups)  # row i starts from its prompt's cache (index_select over the batch)
    return generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=generation_config,
                    cache=cache, **kwargs)


@contextmanager
def shared_prefill(model):
    """Within the block, `model.generate` shares prompt prefills (TRL calls `unwrapped_model.generate` once per
    generation batch in `_generate_single_turn`)."""
    own = model.__dict__.get("generate")  # an instance attribute, if something set one before
    model.generate = functools.partial(generate_with_shared_prefill, model.generate, model)
    try:
        yield
    finally:
        if own is None:
            del model.generate  # back to the class's method
        else:
            model.generate = own
