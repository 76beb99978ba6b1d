"""postrain.models.generation's scorer: completions' log-probs under a model, checked against the model's own forward
written out here (each sequence alone, unpadded: log_softmax of the logits gathered at the next tokens, the
completion's positions kept), for prompts and completions of uneven lengths padded on either side. Two models: the
tiny Qwen2 (rotary positions, which a constant shift leaves unchanged) and a random GPT-2 (learned absolute
positions, where left padding shifts every position unless positions are counted per row)."""

from __future__ import annotations

import pytest
import torch

from postrain.models.generation import completion_logps, token_logps
from tests.conftest import TINY

SPEC = {"name_or_path": "tiny", "dtype": "float32", "tiny": {**TINY, "num_layers": 2}}


@pytest.fixture(scope="module")
def tiny():
    from postrain.models.loading import load_model

    model, tokenizer, _ = load_model(SPEC)
    return model, tokenizer


@pytest.fixture(scope="module")
def gpt2(tiny):
    """A randomly initialised GPT-2 on the tiny tokenizer's ids (built here: nothing is downloaded)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = tiny[1]
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tokenizer), n_positions=64,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module", params=["qwen2_rotary", "gpt2_absolute"])
def model(request, tiny, gpt2):
    return tiny[0] if request.param == "qwen2_rotary" else gpt2


@pytest.fixture(scope="module")
def sequences(tiny):
    """(prompt ids, completion ids): prompts of 2 to 34 tokens, completions of 2 to 17, some ending with EOS."""
    _, tokenizer = tiny
    eos = tokenizer.eos_token_id
    pairs = [("7=", "7"), ("12+345=", "357"), ("1+1=", "2 is the sum"), ("Question: what is 400+98 exactly? ", "498"),
             ("33+4=", "37 or so, I think")]
    out = []
    for i, (prompt, completion) in enumerate(pairs):
        ids = tokenizer(completion, add_special_tokens=False).input_ids + ([eos] if i % 2 == 0 else [])
        out.append((tokenizer(prompt, add_special_tokens=False).input_ids, ids))
    assert len({len(p) for p, _ in out}) == len(out) and len({len(c) for _, c in out}) > 2  # uneven both ways
    return out


def reference_token_logps(model, prompt: list[int], completion: list[int]) -> list[float]:
    """The independent reference: one sequence, no padding; the log-prob of each completion token is the
    log_softmax of the logits one position before it, at the token's id."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logps = torch.log_softmax(logits, dim=-1)
    return [logps[len(prompt) + i - 1, token].item() for i, token in enumerate(completion)]


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("batch_size", [2, 5])
def test_per_token_logps_are_the_models_own_for_uneven_padded_batches(model, tiny, sequences, padding_side,
                                                                       batch_size):
    tokenizer = tiny[1]
    got = completion_logps(model, sequences, batch_size=batch_size, padding_side=padding_side,
                           pad_token_id=tokenizer.pad_token_id, per_token=True)
    assert [len(g) for g in got] == [len(c) for _, c in sequences]  # every completion token, EOS included
    for (prompt, completion), values in zip(sequences, got):
        torch.testing.assert_close(torch.tensor(values, dtype=torch.float64),
                                   torch.tensor(reference_token_logps(model, prompt, completion), dtype=torch.float64),
                                   rtol=1e-5, atol=1e-5)
    summed = completion_logps(model, sequences, batch_size=batch_size, padding_side=padding_side)
    torch.testing.assert_close(torch.tensor(summed), torch.tensor([sum(v) for v in got]), rtol=1e-5, atol=1e-5)


def test_left_padding_without_position_ids_would_score_otherwise(gpt2, sequences):
    """What the left-padded check above guards: with absolute positions, the same left-padded row through a forward
    that counts positions from the first column (pads included) gives other log-probs; the scorer's do not."""
    model = gpt2
    length = max(len(p) + len(c) for p, c in sequences)
    prompt, completion = min(sequences, key=lambda s: len(s[0]) + len(s[1]))  # the most padded row
    pads = length - len(prompt) - len(completion)
    ids = torch.tensor([[0] * pads + prompt + completion])
    mask = torch.tensor([[0] * pads + [1] * (len(prompt) + len(completion))])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[0].double()
    shifted = [torch.log_softmax(logits, -1)[pads + len(prompt) + i - 1, t].item() for i, t in enumerate(completion)]
    reference = reference_token_logps(model, prompt, completion)
    assert max(abs(a - b) for a, b in zip(shifted, reference)) > 1e-3
    completion_mask = torch.tensor([[0] * (pads + len(prompt)) + [1] * len(completion)])
    ours = token_logps(model, ids, mask, completion_mask)[0, pads + len(prompt) - 1:]
    torch.testing.assert_close(ours.double(), torch.tensor(reference, dtype=torch.float64), rtol=1e-5, atol=1e-5)


def test_token_logps_zero_outside_the_completion_and_the_models_mode_is_kept(tiny, sequences):
    model, _ = tiny
    (prompt, completion), length = sequences[1], len(sequences[1][0]) + len(sequences[1][1])
    ids = torch.tensor([prompt + completion + [0, 0]])
    mask = torch.tensor([[1] * length + [0, 0]])
    completion_mask = torch.tensor([[0] * len(prompt) + [1] * len(completion) + [0, 0]])
    model.train()
    try:
        logps = token_logps(model, ids, mask, completion_mask)
        assert model.training  # left as found
    finally:
        model.eval()
    assert logps.shape == (1, length + 1) and logps.dtype == torch.float32
    inside = completion_mask[0, 1:].bool()
    assert (logps[0, ~inside] == 0).all() and (logps[0, inside] < 0).all()


def test_bad_arguments_are_refused(tiny, sequences):
    model, _ = tiny
    with pytest.raises(ValueError, match="padding_side"):
        completion_logps(model, sequences, padding_side="middle")
    with pytest.raises(ValueError, match="batch_size"):
        completion_logps(model, sequences, batch_size=0)
