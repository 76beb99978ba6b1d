"""Prefix sharing for preference training (`trainer.shared_prefix: true`): a prompt and all its answers in one
sequence, so the prompt is encoded once per pair (or list) instead of once per answer.

Wang et al., *Accelerating Direct Preference Optimization with Prefix Sharing* (arXiv 2410.20305; the authors'
frankxwang/dpo-prefix-sharing) put prompt, chosen and rejected in one row with an attention mask under which the
rejected tokens cannot see the chosen ones. Here, for a group of rows that share a prompt (a pair's chosen and
rejected rows, a K-response list's K rows), the shared row is

    [prompt x_0..x_{p-1}] [answer 1] [x_{p-1}' answer 2] [x_{p-1}' answer 3] ...   (then padding)

- every answer token sees the whole prompt and the earlier tokens of its own answer, nothing else;
- position ids restart at p for each answer, so each answer token has the position it has in its own row;
- x_{p-1}' is a copy of the last prompt token (position p-1, seeing the prompt before it and itself). Its output
  is the one that predicts that answer's first token. Without it the last prompt token would have to predict
  the first token of every answer, and a row's position holds one next-token label (the fused LM head scores one
  label per position). One token per further answer, against p tokens saved.

Every standard token (row n, position t) then has one shared position computing exactly its hidden state: the
same token, the same position id, the same visible keys (the prompt tokens are literally the same tensors).
So per-token log-probs, and every loss and gradient built from them, equal those of the standard batch where
each answer has its own padded row, up to floating-point summation order.

How it plugs in. The trainers keep TRL's collated batch (one row per answer, TRL 1.16's tokenization and
`keep_start` truncation, so the shared path sees exactly TRL's tokens) and add one tensor, `shared_prefix_rows`
(N, 2): each row's group leader (the row carrying the group's prompt) and its prompt length. That key reaches
every model call TRL and postrain make from the batch's keyword arguments (TRL's `_compute_loss` passes all
batch keys but the completion mask and precomputed log-probs to the model): the policy forward, the reference
forward (`compute_ref_log_probs` or TRL's inline one), TGDPO's token reward model, Ra-DPO's unfused forwards.
`enable(model)` patches the model's forward (as TRL's `add_fused_lm_head` does): when the key is there it builds
the shared rows, runs the model's own forward on them with a 4D mask and position ids, and returns the outputs
re-laid in the standard (N, T) layout, so everything downstream (TRL's loss chain and metrics, the registry,
per-turn and token-level inputs) runs unchanged.

Attention. Under the shared rows' full mask, sdpa would also compute the blocks the mask hides (the rejected
answer's queries against the chosen answer's keys): no sdpa kernel skips a masked block, while a causal call
skips the upper triangle. For sdpa models the attention is computed by parts instead (`split_sdpa_attention`,
Prefix Grouper's split, arXiv 2506.05433): one causal call over each row's prompt and first answer, one masked call
of each further answer's queries against its prompt's keys and its own. Measured at prompt 2048 on CPU, the full
mask left 1.2x of the 1.9x the token count allows; tests hold the split to sdpa under the full mask. Eager
attention takes the full additive mask.

What it needs from the model: a 4D attention mask and position ids taken as given. transformers returns a 4D
mask as it is (masking_utils `_preprocess_mask_arguments`) to the `sdpa` (boolean mask) and `eager` (additive
float mask) attention functions. Flash-attention kernels take no 4D mask; a sliding-window layer would lose its
window under a custom mask; a MoE router's load-balancing loss reads the 2D padding mask. Those are refused
(`check_model`), and the first batch checks the shared log-probs against the standard ones (`verify`), so a
model that ignores the mask or the position ids fails loudly instead of training on wrong log-probs.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field

import torch

from postrain.errors import RecipeError, origin_of

# The batch key the trainers add and the patched forward reads (never reaches the model's own forward).
ROWS_KEY = "shared_prefix_rows"
SUPPORTED_ATTENTION = ("sdpa", "eager")
# TRL DPOConfig options the shared layout cannot reproduce, with the reason (checked at recipe load and by the
# trainer): a non-default value is refused.
REFUSED_OPTIONS = {
    "truncation_mode": ("keep_start", "keep_end cuts each answer's row from the left by its own length, so chosen "
                                      "and rejected can keep different parts of the prompt and share no prefix; "
                                      "use truncation_mode: keep_start (TRL's default) or raise max_length"),
    "use_liger_kernel": (False, "Liger replaces the model's modules and forward, which the shared layout has not "
                                "been verified with"),
}
# Tolerance of the first-batch check, on per-token log-probs (|shared - standard|). float32 agrees to summation
# order (5e-7 measured on the tiny model); 16-bit formats differ by their rounding of a ~10-nat value. A mask or
# position the model ignored moves a trained model's log-probs by far more; even the randomly initialised tiny
# model moves by 8e-4 when its position ids are dropped (tests/test_shared_prefix_dpo.py).
VERIFY_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8, torch.bfloat16: 0.1, torch.float16: 0.05}


class SharedPrefixError(RecipeError):
    """A model, option or batch the shared-prefix layout cannot reproduce exactly."""


# --- the trainers' side: which rows share a prompt -----------------------------------------------------------------


def prefix_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor,
                leaders: torch.Tensor) -> torch.Tensor:
    """The `shared_prefix_rows` of a collated batch: (N, 2) [group leader row, prompt length], `leaders` (N,)
    giving for each row the first row of its group (a pair: the chosen row; a list: its first completion).

    The prompt length of a row is its length minus its completion tokens (TRL's collator pads on the right and,
    with keep_start truncation, cuts only the end). Refuses groups whose rows do not start with the same prompt."""
    leaders = leaders.to(input_ids.device)
    prompt_lengths = attention_mask.sum(dim=1) - completion_mask.sum(dim=1)
    positions = torch.arange(input_ids.size(1), device=input_ids.device)
    in_prompt = positions[None, :] < prompt_lengths[:, None]
    same_length = prompt_lengths == prompt_lengths[leaders]
    same_tokens = ((input_ids == input_ids[leaders]) | ~in_prompt).all(dim=1)
    if not bool((leaders <= torch.arange(len(leaders), device=leaders.device)).all()):
        raise ValueError("a group's leader must be its first row")
    if not bool((same_length & same_tokens).all()):
        bad = int((~(same_length & same_tokens)).nonzero()[0, 0])
        raise SharedPrefixError(
            f"trainer.shared_prefix: row {bad} of the batch does not start with the prompt of row "
            f"{int(leaders[bad])}, its pair or list: the answers of a prompt must follow identical prompt tokens "
            f"(TRL's tokenization gives them that with truncation_mode keep_start). Set trainer.shared_prefix: false")
    return torch.stack([leaders, prompt_lengths], dim=1)


def pair_leaders(num_rows: int) -> torch.Tensor:
    """Leaders of TRL's pair batch [chosen_1..chosen_B, rejected_1..rejected_B]: row i and row B + i share row i's
    prompt."""
    half = num_rows // 2
    return torch.arange(num_rows) % half


def list_leaders(list_mask: torch.Tensor) -> torch.Tensor:
    """Leaders of a list batch (rows of each list contiguous, list b holding list_mask[b].sum() rows)."""
    sizes = list_mask.sum(dim=1).long().cpu()
    starts = torch.cumsum(sizes, 0) - sizes
    return torch.repeat_interleave(starts, sizes)


# --- the shared layout -------------------------------------------------------------------------------------------


@dataclass
class SharedLayout:
    """The shared rows of one batch and the map back to the standard rows.

    input_ids, position_ids (G, L); segment (G, L): 0 prompt, m + 1 the m-th answer of the group (its copied last
    prompt token included), -1 padding; is_copy (G, L); prompt_length (G,); index (N, T): for each standard position,
    the flat (G·L) shared position computing its hidden state (0 on padding, which `real` (N, T) marks False)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segment: torch.Tensor
    is_copy: torch.Tensor
    prompt_length: torch.Tensor
    index: torch.Tensor
    real: torch.Tensor
    leader_lengths: list[int] = field(default_factory=list)  # each group's prompt + first answer
    tails: list[tuple[int, int, int]] = field(default_factory=list)  # (group, start, end) of each further answer

    @classmethod
    def build(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor,
              pad_to_multiple_of: int | None = None) -> "SharedLayout":
        device = input_ids.device
        num_rows, width = input_ids.shape
        lengths = attention_mask.sum(dim=1).tolist()
        leaders, prompts = (c.tolist() for c in rows.long().cpu().unbind(dim=1))
        groups: dict[int, list[int]] = {}
        for n, leader in enumerate(leaders):
            groups.setdefault(leader, []).append(n)
        group_rows = list(groups.values())
        # shared row length: the prompt, every answer, one copied prompt token per answer after the first
        sizes = [prompts[g[0]] + sum(lengths[n] - prompts[n] for n in g) + (len(g) - 1) * (prompts[g[0]] > 0)
                 for g in group_rows]
        size = max(sizes)
        if pad_to_multiple_of:
            size = -(-size // pad_to_multiple_of) * pad_to_multiple_of
        src, dst, seg, copy = [], [], [], []
        leader_lengths, tails = [], []  # for the split attention: (group, start, end) of each further answer
        index = torch.zeros(num_rows, width, dtype=torch.long)
        for g, members in enumerate(group_rows):
            base, p = g * size, prompts[members[0]]
            cursor = 0
            for m, n in enumerate(members):
                length = lengths[n]
                if m == 0:
                    span = torch.arange(length)
                    src.append(n * width + span)
                    dst.append(base + span)
                    seg.append((span >= p).long())  # prompt 0, first answer 1
                    copy.append(torch.zeros(length, dtype=torch.bool))
                    index[n, :length] = base + span
                    cursor = length
                    leader_lengths.append(length)
                    continue
                shared_prompt = p - 1 if p > 0 else 0  # the prompt tokens this row reads from the leader's
                index[n, :shared_prompt] = base + torch.arange(shared_prompt)
                own = torch.arange(shared_prompt, length)  # the copied last prompt token, then the answer
                src.append(n * width + own)
                dst.append(base + cursor + torch.arange(len(own)))
                seg.append(torch.full((len(own),), m + 1))
                copy.append(own < p)
                index[n, shared_prompt:length] = base + cursor + torch.arange(len(own))
                tails.append((g, cursor, cursor + len(own)))
                cursor += len(own)
        src, dst = torch.cat(src).to(device), torch.cat(dst).to(device)
        shape = (len(group_rows), size)
        shared_ids = input_ids.new_zeros(shape).flatten().index_put_((dst,), input_ids.flatten()[src])
        # the standard position of each token (TRL's right-padded rows: 0..length-1) is its position id
        positions = torch.zeros(shape, dtype=torch.long, device=device).flatten()
        positions[dst] = src % width
        segment = torch.full(shape, -1, dtype=torch.long).flatten()
        segment[dst.cpu()] = torch.cat(seg)
        is_copy = torch.zeros(shape, dtype=torch.bool).flatten()
        is_copy[dst.cpu()] = torch.cat(copy)
        return cls(shared_ids.view(shape), positions.view(shape), segment.view(shape).to(device),
                   is_copy.view(shape).to(device), torch.tensor([prompts[g[0]] for g in group_rows], device=device),
                   index.to(device), attention_mask.bool(), leader_lengths, tails)

    def visible(self) -> torch.Tensor:
        """(G, L, L) boolean: may query q see key k. Causal; a prompt token sees the prompt before it; an answer
        token sees the whole prompt and its own answer before it; a copied last prompt token sees the prompt
        before the original and itself; padding sees only itself (a row of the mask with no key would give NaN)."""
        size = self.segment.size(1)
        order = torch.arange(size, device=self.segment.device)
        causal = order[None, :, None] >= order[None, None, :]
        seg_q, seg_k = self.segment[:, :, None], self.segment[:, None, :]
        copy_q, copy_k = self.is_copy[:, :, None], self.is_copy[:, None, :]
        real_q = seg_q >= 0
        last_prompt = order[None, None, :] == (self.prompt_length[:, None, None] - 1)
        prompt_key = (seg_k == 0) & real_q & ~(copy_q & last_prompt)
        own_answer = (seg_k == seg_q) & (seg_q > 0) & ~copy_q & ~copy_k
        return (causal & (prompt_key | own_answer)) | (order[:, None] == order[None, :])[None]

    def attention_mask(self, implementation: str, dtype: torch.dtype) -> torch.Tensor:
        """The 4D mask (G, 1, L, L) the attention implementation takes as it is: boolean for sdpa, additive
        (0 / the dtype's minimum) for eager, as transformers' own sdpa_mask / eager_mask build them."""
        visible = self.visible()[:, None]
        if implementation == "sdpa":
            return visible
        return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(
            ~visible, torch.finfo(dtype).min)

    def split_plan(self) -> "SplitPlan":
        """How `split_sdpa_attention` computes this layout's attention: see SplitPlan."""
        device = self.input_ids.device
        size = self.input_ids.size(1)
        tails = self.tails
        head = max(self.leader_lengths)
        if not tails:
            return SplitPlan(head, None, None, None, None)
        longest = max(end - start for _, start, end in tails)
        prompt_width = max(int(self.prompt_length.max()), 1)
        queries = torch.zeros(len(tails), longest, dtype=torch.long)
        keys = torch.zeros(len(tails), prompt_width + longest, dtype=torch.long)
        visible = torch.zeros(len(tails), longest, prompt_width + longest, dtype=torch.bool)
        prompts = self.prompt_length.tolist()
        for i, (g, start, end) in enumerate(tails):
            p, own = prompts[g], end - start
            has_copy = p > 0
            queries[i, :own] = g * size + start + torch.arange(own)
            keys[i, :p] = g * size + torch.arange(p)
            keys[i, prompt_width:prompt_width + own] = g * size + start + torch.arange(own)
            q = torch.arange(own)[:, None]
            visible[i, :own, :p] = True  # answer tokens see the whole prompt ...
            if has_copy:
                visible[i, 0, p - 1] = False  # ... the copy sees it without the original last token
            k = torch.arange(own)[None, :]
            own_keys = k <= q
            if has_copy:
                own_keys &= (k >= 1) | (q == 0)  # answer tokens do not see the copy; the copy sees itself
            visible[i, :own, prompt_width:prompt_width + own] = own_keys
            visible[i, own:, 0] = True  # padding queries see one key (a row of no key gives NaN); discarded
        real = torch.arange(longest)[None, :] < torch.tensor([end - start for _, start, end in tails])[:, None]
        return SplitPlan(head, queries.to(device), keys.to(device), visible[:, None].to(device), real.to(device))

    def shift_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """(G, L) next-token labels: the shared position computing standard position t gets the label of t + 1.
        Each labelled standard position has its own shared position (the copies make the first answer tokens'
        predecessors distinct), so no label overwrites another."""
        valid = labels[:, 1:] != -100
        out = torch.full(self.input_ids.shape, -100, dtype=labels.dtype, device=labels.device).flatten()
        out[self.index[:, :-1][valid]] = labels[:, 1:][valid]
        return out.view(self.input_ids.shape)

    def per_token(self, shared: torch.Tensor | None, valid: torch.Tensor) -> torch.Tensor | None:
        """A (G, L) per-token output re-laid as the standard (N, T - 1) one, zero where `valid` is False."""
        if shared is None:
            return None
        gathered = shared.flatten()[self.index[:, :-1]]
        return torch.where(valid, gathered, torch.zeros((), dtype=gathered.dtype, device=gathered.device))

    def per_position(self, shared: torch.Tensor) -> torch.Tensor:
        """A (G, L, ...) output re-laid as the standard (N, T, ...) one, zero on padding."""
        gathered = shared.flatten(0, 1)[self.index]
        mask = self.real.view(*self.real.shape, *([1] * (gathered.dim() - 2)))
        return torch.where(mask, gathered, torch.zeros((), dtype=gathered.dtype, device=gathered.device))


@dataclass
class SplitPlan:
    """The shared rows' attention in two dense parts, as Prefix Grouper splits it (arXiv 2506.05433), so that no
    time goes to the blocks the mask hides (the rejected answer against the chosen one):

    - head: each row's prompt and first answer, which start every row: causal attention over the first
      `head` positions (`is_causal`, the kernels that skip the upper triangle);
    - tails: each further answer (its copied prompt token and its tokens), M of them: its queries (M, Q) against
      its prompt's keys and its own (M, K), with `visible` (M, 1, Q, K). Indices are flat (G·L) positions.

    Outputs at the tails' positions replace the head's there (those queries' head outputs mean nothing)."""

    head: int
    tail_queries: torch.Tensor | None
    tail_keys: torch.Tensor | None
    tail_visible: torch.Tensor | None
    tail_real: torch.Tensor | None  # (M, Q): the query slots that hold a token (the others are padding)


# The attention implementation name under which `split_sdpa_attention` is registered with transformers; a model
# whose attention is sdpa is switched to it by `enable`. Without a plan in the call it is transformers' sdpa.
SPLIT_SDPA = "postrain_shared_prefix_sdpa"
PLAN_KEY = "shared_prefix_plan"


def _rows_first(states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(G, H, L, D) states at flat positions `index` (M, S): (M, H, S, D)."""
    flat = states.transpose(1, 2).flatten(0, 1)  # (G·L, H, D)
    return flat[index].transpose(1, 2)


def split_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' sdpa attention, computed by parts (SplitPlan) when the call carries a plan; the same values
    as sdpa under the shared layout's full mask (tests hold them to it), without the hidden blocks' work."""
    # slow: transformers; recipe checks read this module (check_options)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plan = kwargs.pop(PLAN_KEY, None)
    if plan is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    kwargs.pop("is_causal", None)
    groups, _, size, _ = query.shape
    head, _ = sdpa_attention_forward(module, query[:, :, :plan.head], key[:, :, :plan.head],
                                     value[:, :, :plan.head], None, dropout=dropout, scaling=scaling, is_causal=True,
                                     **kwargs)  # (G, head, H, D)
    out = torch.cat([head, head.new_zeros(groups, size - plan.head, *head.shape[2:])], dim=1).flatten(0, 1)
    if plan.tail_queries is not None:
        tail, _ = sdpa_attention_forward(
            module, _rows_first(query, plan.tail_queries), _rows_first(key, plan.tail_keys),
            _rows_first(value, plan.tail_keys), plan.tail_visible, dropout=dropout, scaling=scaling, **kwargs)
        out = out.index_put((plan.tail_queries[plan.tail_real],), tail[plan.tail_real])
    return out.view(groups, size, *head.shape[2:]), None


def _register_split_attention() -> None:
    # slow: transformers; recipe checks read this module (check_options)
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(SPLIT_SDPA, split_sdpa_attention)
    AttentionMaskInterface.register(SPLIT_SDPA, sdpa_mask)  # standard calls build sdpa's own masks


# --- the model's side ----------------------------------------------------------------------------------------------


def _base_model(model):
    """The transformers model under accelerate's wrappers (DDP, DeepSpeed, compile) and peft: the module whose
    forward TRL patched with its fused LM head, and this module patches again."""
    # slow: accelerate; recipe checks read this module (check_options)
    from accelerate.utils import extract_model_from_parallel, is_peft_model

    model = extract_model_from_parallel(model)
    return model.get_base_model() if is_peft_model(model) else model


def attention_implementation(model) -> str | None:
    """The model's attention implementation (sdpa for a model `enable` switched to the split sdpa)."""
    config = getattr(model, "config", None)
    implementation = getattr(config, "_attn_implementation", None) if config is not None else None
    return "sdpa" if implementation == SPLIT_SDPA else implementation


def check_model(model, what: str = "model") -> None:
    """Refuse, with the reason, a model whose forward cannot honour the shared layout."""
    # slow: accelerate; recipe checks read this module (check_options)
    from accelerate.utils import extract_model_from_parallel, is_peft_model

    model = extract_model_from_parallel(model)
    if is_peft_model(model) and getattr(model.active_peft_config, "is_prompt_learning", False):
        raise SharedPrefixError(f"trainer.shared_prefix: the {what} is a prompt-learning peft model, whose virtual "
                                f"tokens are prepended to every row; set trainer.shared_prefix: false")
    config = model.config
    implementation = attention_implementation(model)
    if implementation not in SUPPORTED_ATTENTION:
        raise SharedPrefixError(
            f"trainer.shared_prefix: the {what} uses attn_implementation {implementation!r}, which cannot take the "
            f"4D attention mask that keeps a prompt's answers apart (flash-attention kernels take 2D padding masks "
            f"only; flex_attention needs a block mask). Use model.attn_implementation: sdpa or eager, or set "
            f"trainer.shared_prefix: false")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layer_types = getattr(text, "layer_types", None) or []
    sliding = "sliding_attention" in layer_types or (
        getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True)
        and not layer_types)
    if sliding:
        raise SharedPrefixError(f"trainer.shared_prefix: the {what} ({text.model_type}) has sliding-window attention "
                                f"layers; a custom 4D mask replaces their window, so distant tokens would be seen. "
                                f"Set trainer.shared_prefix: false")
    if getattr(text, "output_router_logits", False):
        raise SharedPrefixError(f"trainer.shared_prefix: the {what} ({text.model_type}) adds a MoE load-balancing loss, "
                                f"which reads the 2D padding mask the shared rows replace. Set "
                                f"trainer.shared_prefix: false")


def enable(model, pad_to_multiple_of: int | None = None) -> None:
    """Patch `model.forward` (the instance's, as TRL's add_fused_lm_head does; under peft, the base model's) so
    that a call carrying `shared_prefix_rows` runs on the shared rows and answers in the standard layout. Calls
    without it are the model's own. Idempotent."""
    base = _base_model(model)
    if getattr(base, "_postrain_shared_prefix", False):
        return
    inner = base.forward
    implementation = attention_implementation(base)
    if implementation == "sdpa":
        # sdpa under the shared rows' full mask would compute the hidden blocks too (the rejected answer against
        # the chosen one: no kernel skips a masked block); the split attention leaves them out. For calls without
        # a plan it is transformers' sdpa itself, masks included, so the model is otherwise unchanged (the
        # setting is not saved with the config). Set for good rather than per call: activation checkpointing
        # recomputes a layer in the backward, after the call, and must take the same path.
        _register_split_attention()
        base.config._attn_implementation = SPLIT_SDPA

    def forward(self, *args, **kwargs):
        rows = kwargs.pop(ROWS_KEY, None)
        if rows is None:
            return inner(*args, **kwargs)
        return _shared_forward(self, inner, implementation, pad_to_multiple_of, rows, *args, **kwargs)

    base.forward = types.MethodType(forward, base)
    base._postrain_shared_prefix = True


def _shared_forward(model, inner, implementation, pad_to_multiple_of, rows, *args, **kwargs):
    # slow: trl; recipe checks read this module (check_options)
    from trl.trainer.utils import FusedCausalLMOutput

    model._postrain_shared_calls = getattr(model, "_postrain_shared_calls", 0) + 1  # what `verify` looks for

    if args or kwargs.get("input_ids") is None or kwargs.get("attention_mask") is None:
        raise TypeError("shared_prefix_rows needs input_ids and attention_mask as keyword arguments")
    for key in ("position_ids", "inputs_embeds", "shift_labels"):
        if kwargs.get(key) is not None:
            raise TypeError(f"shared_prefix_rows cannot be combined with {key}")
    input_ids, attention_mask = kwargs.pop("input_ids"), kwargs.pop("attention_mask")
    labels = kwargs.pop("labels", None)
    fused = kwargs.pop("fused_lm_head", False)
    layout = SharedLayout.build(input_ids, attention_mask, rows, pad_to_multiple_of)
    dtype = next(model.parameters()).dtype
    shared = dict(input_ids=layout.input_ids, position_ids=layout.position_ids,
                  attention_mask=layout.attention_mask(implementation, dtype))
    if implementation == "sdpa" and model.config._attn_implementation == SPLIT_SDPA:
        shared[PLAN_KEY] = layout.split_plan()
    if not fused:
        if labels is not None:
            raise TypeError("shared_prefix_rows with labels needs fused_lm_head=True")
        outputs = inner(**shared, **kwargs)
        outputs["logits"] = layout.per_position(outputs.logits)
        return outputs
    outputs = inner(**shared, shift_labels=layout.shift_labels(labels), fused_lm_head=True, **kwargs)
    valid = labels[:, 1:] != -100
    return FusedCausalLMOutput(
        loss=outputs.loss, log_probs=layout.per_token(outputs.log_probs, valid),
        entropy=layout.per_token(outputs.entropy, valid),
        log_sum_sq_probs=layout.per_token(outputs.log_sum_sq_probs, valid),
        mean_logits=layout.per_token(outputs.mean_logits, valid), is_top1=layout.per_token(outputs.is_top1, valid),
        label_mask=valid, aux_loss=outputs.aux_loss)


def verify(model, inputs: dict, what: str = "policy") -> float:
    """The first-batch check: per-token log-probs of `inputs` (a collated batch with `completion_mask` and
    `shared_prefix_rows`) from the shared rows and from the standard ones, without gradient. Raises when they
    differ by more than the dtype's tolerance (a model that ignores the 4D mask or the position ids); returns the
    largest difference."""
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    common = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels,
                  use_cache=False, fused_lm_head=True)
    training = model.training
    base = _base_model(model)
    calls = getattr(base, "_postrain_shared_calls", 0)
    model.eval()  # dropout would make the two forwards differ by chance
    try:
        with torch.no_grad():
            standard = model(**common).log_probs
            shared = model(**common, **{ROWS_KEY: inputs[ROWS_KEY]}).log_probs
    finally:
        model.train(training)
    if getattr(base, "_postrain_shared_calls", 0) == calls:
        # a forward patched again over ours (another fused head) runs the body itself and passes the rows on as
        # an unknown keyword the model ignores: the two forwards agree and nothing would be shared
        raise SharedPrefixError(f"trainer.shared_prefix: the {what}'s rows did not reach the shared-prefix forward "
                                f"(its forward was replaced after postrain patched it). Set trainer.shared_prefix: "
                                f"false")
    difference = (standard.float() - shared.float()).abs().max().item()
    tolerance = VERIFY_TOLERANCE.get(standard.dtype, 0.1)
    if not difference <= tolerance:
        raise SharedPrefixError(
            f"trainer.shared_prefix: on the first batch the {what}'s log-probs from the shared-prefix rows differ from "
            f"those of the standard rows by up to {difference:.3g} (tolerance {tolerance:g} in {standard.dtype}): this "
            f"model does not take the 4D attention mask or the position ids as given. Set trainer.shared_prefix: false")
    return difference


# --- load time ---------------------------------------------------------------------------------------------------


def check_options(trainer: dict, shape_name: str, origins: dict | None = None, model_specs: dict | None = None
                  ) -> None:
    """Recipe-load-time refusals: TRL options the shared layout does not reproduce, unpaired rows (one answer per
    prompt: nothing to share), attention implementations that take no 4D mask."""

    origins = origins or {}
    if shape_name == "unpaired":
        raise SharedPrefixError("trainer.shared_prefix: unpaired rows hold one completion per prompt (and KTO's "
                                "mismatched pairs run without gradient, apart from the policy's), so there is no "
                                "prompt to share. Set trainer.shared_prefix: false")
    for option, (default, why) in REFUSED_OPTIONS.items():
        value = trainer.get(option, default)
        if value is not None and value != default:
            raise SharedPrefixError(f"trainer.shared_prefix with trainer.{option}={value!r} (from "
                                    f"{origin_of(origins, f'trainer.{option}')}): {why}")
    for where, spec in (model_specs or {}).items():
        implementation = (spec or {}).get("attn_implementation")
        if implementation is not None and implementation not in SUPPORTED_ATTENTION:
            raise SharedPrefixError(
                f"trainer.shared_prefix with {where}.attn_implementation={implementation!r} (from "
                f"{origin_of(origins, f'{where}.attn_implementation')}): it cannot take the 4D attention mask that "
                f"keeps a prompt's answers apart; use sdpa or eager, or set trainer.shared_prefix: false")
