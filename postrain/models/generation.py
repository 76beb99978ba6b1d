"""Generation and scoring with a causal language model: the one place postrain turns prompts into completions
(`generate`, `generate_with_ids`) and completions into log-probs under a model (`completion_logps`,
`token_logps`).

Generation is what `postrain eval`, evaluation during training and the `llm_judge` reward run: prompts rendered
with the chat template (`render_prompts`), batched and left-padded, HF `generate` with a KV cache, each completion
cut after its first EOS as TRL's GRPOTrainer cuts it (`completion_token_ids`).

Scoring gives log p(y_t | x, y_<t) of the tokens of given completions under a given model: per token or summed
over each completion, from one no-grad forward per batch, the log-softmax taken in float32. The further models of
a DPO recipe (`logp_models:`, postrain.trainers.logp_models) are scored with it; so can DICE's implicit-reward
pairs be (the same summed log-probs, right-padded).
"""

from __future__ import annotations

from typing import Any, Callable

PADDING_SIDES = ("left", "right")


def render_prompts(prompts: list[Any], tokenizer) -> list[str]:
    """Chat prompts go through the chat template (with the generation prompt); plain text is used as is."""
    return [
        tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) if isinstance(p, list) else p
        for p in prompts
    ]


def completion_token_ids(new_ids: list[int], eos_ids: set[int]) -> list[int]:
    """The generated tokens of one completion up to and including its first EOS, the rest (padding after EOS)
    dropped: the completion TRL's GRPOTrainer scores and counts (trl 1.16, `_generate_single_turn`: "Mask everything
    after the first EOS token"; `completions/mean_length` is the length of these ids). Written anew, not copied;
    tests/test_eval_polish.py pins that TRL method's source."""
    for i, token in enumerate(new_ids):
        if token in eos_ids:
            return new_ids[: i + 1]
    return new_ids


def generate(
    model, tokenizer, prompts: list[Any], gen: dict, *, on_batch: Callable[[int, int], None] | None = None
) -> list[list[str]]:
    """Batched generation with a KV cache; returns `num_samples` completions per prompt.
    `on_batch(done, total)` is called after each batch (progress)."""
    return generate_with_ids(model, tokenizer, prompts, gen, on_batch=on_batch)[0]


def generate_with_ids(
    model, tokenizer, prompts: list[Any], gen: dict, *, on_batch: Callable[[int, int], None] | None = None
) -> tuple[list[list[str]], list[list[list[int]]]]:
    """`generate`, also returning each completion's generated token ids (up to and including EOS, as TRL counts
    them: `completion_token_ids`), nested as the texts are: per prompt, `num_samples` lists of ids.

    `gen` holds the keys of an eval recipe's `generation:` (max_new_tokens, do_sample, temperature, top_p, top_k,
    num_samples, batch_size); the sampling keys are read only when do_sample is true."""
    # slow: torch; recipe loading reaches this module (rewards.judge)
    import torch

    texts = render_prompts(prompts, tokenizer)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only batching: pad on the left so generation continues the prompt
    model.eval()
    out: list[list[str]] = []
    out_ids: list[list[list[int]]] = []
    eos_ids = {tokenizer.eos_token_id}  # the token generation stops at (below)
    n = gen["num_samples"]
    kwargs: dict[str, Any] = {
        "max_new_tokens": gen["max_new_tokens"],
        "do_sample": gen["do_sample"],
        "num_return_sequences": n,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "use_cache": True,
    }
    if gen["do_sample"]:
        kwargs.update(temperature=gen["temperature"], top_p=gen["top_p"], top_k=gen["top_k"] or None)
    starts = range(0, len(texts), gen["batch_size"])
    try:
        for done, start in enumerate(starts, 1):
            batch = tokenizer(texts[start : start + gen["batch_size"]], return_tensors="pt", padding=True,
                              add_special_tokens=False).to(model.device)
            with torch.no_grad():
                ids = model.generate(**batch, **kwargs)
            new = ids[:, batch["input_ids"].shape[1] :]
            kept = [completion_token_ids(row, eos_ids) for row in new.tolist()]
            decoded = tokenizer.batch_decode(kept, skip_special_tokens=True)
            out += [decoded[i : i + n] for i in range(0, len(decoded), n)]
            out_ids += [kept[i : i + n] for i in range(0, len(kept), n)]
            if on_batch is not None:
                on_batch(done, len(starts))
    finally:
        tokenizer.padding_side = side
    return out, out_ids


def token_logps(model, input_ids, attention_mask, completion_mask, **model_inputs):
    """(B, L-1) float32: at position t, log p(input_ids[:, t+1] | input_ids[:, :t+1]) under `model` where token t+1
    is a completion token (`completion_mask` 1), else 0 (prompt and padding). One no-grad forward; the model's
    mode is left as found (dropout off while scoring).

    Padding may be on either side: with padding on the left (a row whose mask starts with 0), positions are counted
    from each row's first real token (`position_ids`), as generation counts them, so a left-padded row scores as it
    would alone. `model_inputs` go to the forward as they are (a collator's further inputs)."""
    # slow: torch; recipe loading reaches this module (rewards.judge)
    import torch

    device = next(model.parameters()).device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    completion_mask = completion_mask.to(device)
    if not attention_mask[:, 0].all() and "position_ids" not in model_inputs:
        model_inputs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                           **model_inputs).logits[:, :-1]
            targets = input_ids[:, 1:]
            # one row at a time in float32: a (B, L, V) float32 copy of the logits is not needed at once
            logps = torch.stack([row.float().log_softmax(-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
                                 for row, target in zip(logits, targets)])
    finally:
        model.train(was_training)
    return torch.where(completion_mask[:, 1:].bool(), logps, torch.zeros((), device=device))


def completion_logps(model, sequences: list[tuple[list[int], list[int]]], *, batch_size: int = 8,
                     padding_side: str = "right", pad_token_id: int = 0,
                     per_token: bool = False) -> list[float] | list[list[float]]:
    """Log-probs of each (prompt ids, completion ids) completion under `model`: summed over the completion's tokens
    (Σ_t log p(y_t | x, y_<t)), or with `per_token` one value per completion token. `batch_size` sequences per
    forward, padded on `padding_side` with `pad_token_id` (masked out: any id the model knows). The ids are scored
    as given: EOS is scored when the completion ends with it, nothing is added or cut. A completion token with no
    token before it (an empty prompt) has nothing to be predicted from and is not scored."""
    # slow: torch; recipe loading reaches this module (rewards.judge)
    import torch

    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out: list = []
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start:start + batch_size]
        length = max(len(p) + len(c) for p, c in batch)
        ids = torch.full((len(batch), length), pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(ids)
        completion = torch.zeros_like(ids)
        for i, (prompt, answer) in enumerate(batch):
            size = len(prompt) + len(answer)
            begin = 0 if padding_side == "right" else length - size
            ids[i, begin:begin + size] = torch.tensor(list(prompt) + list(answer), dtype=torch.long)
            attention[i, begin:begin + size] = 1
            completion[i, begin + len(prompt):begin + size] = 1
        logps = token_logps(model, ids, attention, completion).cpu()
        if per_token:
            out += [logps[i][completion[i, 1:].bool()].tolist() for i in range(len(batch))]  # in order
        else:
            out += logps.sum(dim=1).tolist()  # summed over the whole masked row, as TRL's DPO sums
    return out
