"""trainer.shared_prefix for DPO (postrain.trainers.shared_prefix_dpo): a prompt and all its answers in one sequence.

The layout against one written out by hand; losses and gradients with the switch on equal those with it off (fp32,
padded rows, uneven prompts and answers, truncation) for TRL's own loss path, registry pair losses (token-level,
per-turn and stateful ones included) and list-wise losses, with a separate, implicit, precomputed or
adapter-disabled reference and with sdpa and eager attention, on Qwen2 (the tiny model) and Llama; the model
really runs one row per prompt; load-time and first-batch refusals; a `postrain dpo` run logs the same losses."""

from __future__ import annotations

import json

import pytest
import torch

from postrain.errors import RecipeError
from postrain.jobs import load_recipe
from tests.conftest import TINY, postrain, read_jsonl
from tests.dpo_shapes import dpo_recipe
from tests.test_real_model import NAME as SMOLLM2
from tests.test_real_model import real_model

# Two layers: a mask or position error in the first layer reaches the second layer's keys of every later token.
TINY2 = {**TINY, "num_layers": 2}
SPEC = {"name_or_path": "tiny", "dtype": "float32", "tiny": TINY2}


def spec(seed: int = 0, **model) -> dict:
    return {**SPEC, "tiny": {**TINY2, "seed": seed}, **model}


# --- the layout, against one written out by hand ------------------------------------------------------------------


def hand_batch():
    """TRL's collation of two pairs: prompt [1, 2, 3], chosen [4, 5], rejected [6]; prompt [7, 8], chosen [9],
    rejected [10, 11] (the example in TRL's DataCollatorForPreference docstring)."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    examples = [{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
                {"prompt_ids": [7, 8], "chosen_ids": [9], "rejected_ids": [10, 11]}]
    return DataCollatorForPreference(pad_token_id=0)(examples)


def test_layout_is_prompt_then_each_answer_with_a_copied_last_prompt_token():
    from postrain.trainers.shared_prefix_dpo import SharedLayout, pair_leaders, prefix_rows

    batch = hand_batch()
    rows = prefix_rows(batch["input_ids"], batch["attention_mask"], batch["completion_mask"], pair_leaders(4))
    assert rows.tolist() == [[0, 3], [1, 2], [0, 3], [1, 2]]
    layout = SharedLayout.build(batch["input_ids"], batch["attention_mask"], rows)
    # row 0: prompt 1 2 3 | chosen 4 5 | copy of 3, rejected 6;   row 1: prompt 7 8 | chosen 9 | copy of 8, 10 11
    assert layout.input_ids.tolist() == [[1, 2, 3, 4, 5, 3, 6], [7, 8, 9, 8, 10, 11, 0]]
    assert layout.position_ids[0].tolist() == [0, 1, 2, 3, 4, 2, 3]
    assert layout.position_ids[1, :6].tolist() == [0, 1, 2, 1, 2, 3]
    # who each query sees, written out: answers see the whole prompt and their own answer, never the other answer;
    # the copy sees the prompt before the original last token, and itself; padding sees itself only
    expected = [
        [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3], [0, 1, 2, 3, 4], [0, 1, 5], [0, 1, 2, 6]],
        [[0], [0, 1], [0, 1, 2], [0, 3], [0, 1, 4], [0, 1, 4, 5], [6]],
    ]
    visible = layout.visible()
    for g, queries in enumerate(expected):
        for q, keys in enumerate(queries):
            assert visible[g, q].nonzero().flatten().tolist() == keys, (g, q)
    # each standard position maps to the shared position holding its token at its position
    for n in range(4):
        for t in range(int(batch["attention_mask"][n].sum())):
            s = layout.index[n, t].item()
            assert layout.input_ids.flatten()[s] == batch["input_ids"][n, t]
            assert layout.position_ids.flatten()[s] == t
    # every label has its own shared position: the first rejected token is predicted from the copy
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    shifted = layout.shift_labels(labels)
    assert shifted[0].tolist() == [-100, -100, 4, 5, -100, 6, -100]
    assert shifted[1].tolist() == [-100, 9, -100, 10, 11, -100, -100]


@pytest.mark.parametrize("sizes", [
    [(3, [2, 1]), (2, [1, 2])],  # pairs, uneven prompts and answers
    [(4, [3, 1, 2]), (1, [2, 2, 1]), (6, [1, 1])],  # lists of 3 and 2
    [(0, [2, 3])],  # an empty prompt: no copy, the answers restart at position 0
], ids=["pairs", "lists", "empty-prompt"])
def test_split_attention_equals_sdpa_under_the_full_mask(sizes):
    """The split attention (causal head, then each further answer against its prompt) gives the values and
    gradients of transformers' sdpa under the layout's full mask (written out by hand in the test above)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from postrain.trainers.shared_prefix_dpo import SharedLayout, prefix_rows, split_sdpa_attention

    ids, completion, leaders = [], [], []
    for prompt, answers in sizes:
        first = len(ids)
        for answer in answers:
            ids.append([1] * prompt + [2] * answer)
            completion.append([0] * prompt + [1] * answer)
            leaders.append(first)
    width = max(map(len, ids))
    input_ids = torch.tensor([row + [0] * (width - len(row)) for row in ids])
    attention_mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])
    completion_mask = torch.tensor([row + [0] * (width - len(row)) for row in completion])
    rows = prefix_rows(input_ids, attention_mask, completion_mask, torch.tensor(leaders))
    layout = SharedLayout.build(input_ids, attention_mask, rows)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    g = torch.Generator().manual_seed(0)
    shape = (layout.input_ids.size(0), 4, layout.input_ids.size(1), 8)
    query = torch.randn(shape, generator=g, requires_grad=True)
    key, value = (torch.randn((shape[0], 2, *shape[2:]), generator=g, requires_grad=True) for _ in range(2))
    plan = layout.split_plan()
    full, _ = sdpa_attention_forward(module, query, key, value, layout.visible()[:, None], scaling=0.3)
    split, _ = split_sdpa_attention(module, query, key, value, None, scaling=0.3, shared_prefix_plan=plan)
    real = layout.segment >= 0
    torch.testing.assert_close(split[real], full[real], rtol=1e-5, atol=1e-6)
    weights = torch.randn(full[real].shape, generator=g)
    for a, b in zip(torch.autograd.grad((full[real] * weights).sum(), (query, key, value)),
                    torch.autograd.grad((split[real] * weights).sum(), (query, key, value))):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_rows_whose_prompts_differ_are_refused():
    from postrain.trainers.shared_prefix_dpo import SharedPrefixError, pair_leaders, prefix_rows

    batch = hand_batch()
    batch["input_ids"][2, 0] = 99  # the rejected row of pair 0 no longer starts with its chosen row's prompt
    with pytest.raises(SharedPrefixError, match="row 2 of the batch does not start with the prompt of row 0"):
        prefix_rows(batch["input_ids"], batch["attention_mask"], batch["completion_mask"], pair_leaders(4))


def test_list_leaders_follow_the_list_sizes():
    from postrain.trainers.shared_prefix_dpo import list_leaders

    assert list_leaders(torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])).tolist() == \
        [0, 0, 0, 0, 4, 4, 6, 6, 6]


# --- equivalence: shared prefix on and off ------------------------------------------------------------------------


def pair_rows(n: int = 8, conversational: bool = False) -> list[dict]:
    """Built-in pairs with prompts of uneven length (0 to 6 extra characters) and answers of uneven length."""
    from postrain.data.tasks import arithmetic

    rows = arithmetic(n=n, digits=2, shape="turns" if conversational else "pairs")
    for i, row in enumerate(rows):
        if not conversational:
            row["prompt"] = "q" * (3 * (i % 3)) + row["prompt"]
            row["rejected"] += " (or not)" * (i % 2)
    return rows


def list_rows() -> list[dict]:
    """Ragged K-response lists (4, 2, 3, 4, 4 completions), prompts of uneven length."""
    from postrain.data.tasks import arithmetic

    rows = arithmetic(n=5, digits=2, shape="lists")
    for i, size in ((1, 2), (2, 3)):
        rows[i]["completions"], rows[i]["scores"] = rows[i]["completions"][:size], rows[i]["scores"][:size]
        rows[i]["ranks"] = rows[i]["ranks"][:size]
    for i, row in enumerate(rows):
        row["prompt"] = "q" * (2 * i) + row["prompt"]
    return rows


def make_trainer(shared: bool, losses=None, rows=None, trainer_cls=None, ref: str = "separate",
                 model: dict | None = None, **config):
    """A DPO trainer on the 2-layer tiny model. `ref`: "separate" (another tiny model), "implicit" (TRL's copy),
    "peft" (LoRA on the policy, the reference its adapter-free base)."""
    import datasets
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import DPOConfig

    from postrain.models.loading import load_model
    from postrain.trainers.dpo import PostrainDPOTrainer

    policy, tokenizer, _ = load_model({**SPEC, **(model or {})})
    reference = load_model({**spec(5), **(model or {})})[0] if ref == "separate" else None
    peft = None
    if ref == "peft":
        from peft import LoraConfig

        peft = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    rows = pair_rows() if rows is None else rows
    args = DPOConfig(**{"output_dir": "/tmp/postrain-shared-prefix-test", "report_to": "none", "bf16": False,
                        "max_length": 24, "save_strategy": "no", "per_device_train_batch_size": len(rows),
                        "logging_steps": 1, **config})
    trainer = (trainer_cls or PostrainDPOTrainer)(
        model=policy, ref_model=reference, args=args, train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer, losses=losses, shared_prefix=shared, peft_config=peft)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


def batch_in_order(trainer) -> dict:
    dataset = trainer.train_dataset
    return trainer._prepare_inputs(trainer.data_collator([dataset[i] for i in range(len(dataset))]))


class RowsSeen:
    """Records the (rows, length) of every input the policy's transformer body runs on with gradient enabled."""

    def __init__(self, model):
        from accelerate.utils import is_peft_model

        base = model.get_base_model() if is_peft_model(model) else model
        self.shapes: list[tuple[int, int]] = []
        self.handle = base.model.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        if torch.is_grad_enabled():
            self.shapes.append(tuple(kwargs["input_ids"].shape))


def loss_and_grads(trainer, batch):
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    loss = trainer.compute_loss(trainer.model, batch)
    return loss.detach(), torch.autograd.grad(loss, params)


def assert_same_loss_and_gradients(losses=None, rows=None, trainer_cls=None, **kwargs):
    """Build the trainer with shared prefix off and on (same weights, same rows), compute the loss and its
    gradient on the same collated batch: losses within 1e-5, gradients within 1e-4 relative. Returns the batch and
    the (rows, length) the shared trainer's policy ran on."""
    off = make_trainer(False, losses, rows, trainer_cls, **kwargs)
    on = make_trainer(True, losses, rows, trainer_cls, **kwargs)
    batch = batch_in_order(off)
    assert batch["attention_mask"].sum(1).unique().numel() > 1  # padded rows
    loss_off, grads_off = loss_and_grads(off, batch)
    seen = RowsSeen(on.model)
    loss_on, grads_on = loss_and_grads(on, batch_in_order(on))
    assert torch.isfinite(loss_off)
    torch.testing.assert_close(loss_on, loss_off, rtol=1e-5, atol=1e-7)
    assert any(g.abs().max() > 0 for g in grads_off)
    for on_grad, off_grad in zip(grads_on, grads_off):
        torch.testing.assert_close(on_grad, off_grad, rtol=1e-4, atol=1e-4 * off_grad.abs().max().item() + 1e-12)
    return batch, seen.shapes


def groups_of(batch: dict) -> int:
    return len(batch["list_mask"]) if "list_mask" in batch else batch["input_ids"].size(0) // 2


def assert_one_row_per_prompt(batch: dict, shapes: list[tuple[int, int]]) -> None:
    """The policy's gradient forward ran on one row per prompt, no longer than prompt + answers + copies."""
    assert shapes, "the policy ran no forward with gradient"
    groups = groups_of(batch)
    lengths = batch["attention_mask"].sum(1)
    prompts = lengths - batch["completion_mask"].sum(1)
    answers = (lengths - prompts).sum().item()
    bound = prompts.max().item() + answers  # a generous bound on the longest shared row
    assert all(rows == groups and length <= bound for rows, length in shapes), (shapes, groups)


TRL_PATHS = {  # TRL's own loss chain (no `loss:`), DPOConfig options
    "sigmoid": {},
    "ipo+sft": {"loss_type": ["ipo", "sft"], "loss_weights": [1.0, 0.5]},
    "use_weighting": {"use_weighting": True},
    "ld_alpha": {"ld_alpha": 0.5},
    "f_divergence": {"f_divergence_type": "js_divergence", "loss_type": ["hinge"]},
}


@pytest.mark.parametrize("options", TRL_PATHS.values(), ids=TRL_PATHS.keys())
def test_trl_loss_path_is_unchanged(options):
    batch, shapes = assert_same_loss_and_gradients(**options)
    assert_one_row_per_prompt(batch, shapes)


REGISTRY_PAIRS = {
    "simpo+dpo_nll": [{"name": "simpo"}, {"name": "dpo_nll", "weight": 0.5}],
    "wpo": [{"name": "wpo"}],  # reads log Σπ² per token from the fused head
    "ld_dpo": [{"name": "ld_dpo", "alpha": 0.5}],  # per-token policy and reference log-probs
    "tgdpo": [{"name": "tgdpo", "alpha": 2.0, "token_reward_model": spec(2)}],  # a third model, per-token rewards
    "ra_dpo": [{"name": "ra_dpo"}],  # unfused forwards: full distributions re-laid position by position
    "gdpo": [{"name": "gdpo", "alpha": 0.5}],  # the policy's EOS log-prob at every completion token, with gradient
    "beta_dpo": [{"name": "beta_dpo", "rho": 0.25}],  # trainer state updated from the batch
}


@pytest.mark.parametrize("losses", REGISTRY_PAIRS.values(), ids=REGISTRY_PAIRS.keys())
def test_registry_pair_losses_are_unchanged(losses):
    batch, shapes = assert_same_loss_and_gradients(losses)
    assert_one_row_per_prompt(batch, shapes)


def test_per_turn_dmpo_on_conversations_is_unchanged():
    batch, shapes = assert_same_loss_and_gradients([{"name": "dmpo", "beta": 0.5, "gamma": 0.6}],
                                                   pair_rows(6, conversational=True), max_length=64)
    assert_one_row_per_prompt(batch, shapes)


@pytest.mark.parametrize("losses", [[{"name": "lipo_lambda"}], [{"name": "plackett_luce_dpo", "beta": 0.3}],
                                    [{"name": "exo_k", "weight": 2.0}]], ids=["lipo_lambda", "plackett_luce", "exo_k"])
def test_list_losses_on_ragged_lists_are_unchanged(losses):
    from postrain.trainers.listwise import ListwiseDPOTrainer

    batch, shapes = assert_same_loss_and_gradients(losses, list_rows(), ListwiseDPOTrainer)
    assert_one_row_per_prompt(batch, shapes)


@pytest.mark.parametrize("setting", [
    {"ref": "implicit"},
    {"ref": "peft"},
    {"precompute_ref_log_probs": True},
    {"model": {"attn_implementation": "eager"}},
    {"max_length": None},  # nothing truncated
    {"pad_to_multiple_of": 8},
    {"activation_checkpointing": True},
    {"padding_free": True},  # TRL 1.16 turns it off and pads: the shared rows reproduce the padded batch
], ids=["implicit-reference", "peft-reference", "precomputed-reference", "eager", "untruncated", "pad-multiple",
        "checkpointing", "padding-free"])
def test_references_and_attention_implementations(setting):
    assert_same_loss_and_gradients([{"name": "dpo"}], **setting)


def test_logits_for_compute_metrics_are_the_standard_rows_logits():
    """return_outputs=True (TRL's deprecated logits for compute_metrics, from an unfused forward): the shared
    forward's logits re-laid position by position equal the standard ones on every real token."""
    off, on = make_trainer(False, [{"name": "dpo"}]), make_trainer(True, [{"name": "dpo"}])
    batch = batch_in_order(off)
    with torch.no_grad():
        _, plain = off.compute_loss(off.model, batch, return_outputs=True)
        _, shared = on.compute_loss(on.model, batch, return_outputs=True)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(shared.logits[real], plain.logits[real], rtol=1e-5, atol=1e-5)


def test_a_truncated_answer_is_cut_as_in_the_standard_row():
    """max_length 12 cuts answers (keep_start): the shared row carries exactly the tokens TRL's rows keep."""
    batch, _ = assert_same_loss_and_gradients(max_length=12)
    lengths = batch["attention_mask"].sum(1)
    assert lengths.max() == 12 and (batch["completion_mask"].sum(1) < 12).all()


def llama(implementation: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation=implementation)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def assert_forward_unchanged(model, vocab_size: int) -> None:
    """On a pair batch with uneven prompts and answers, `model`'s shared forward gives its standard per-token
    log-probs, entropies and gradients, and the first-batch check passes."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from trl.trainer.utils import add_fused_lm_head

    from postrain.trainers import shared_prefix_dpo as sp

    if not getattr(model, "_postrain_shared_prefix", False):
        add_fused_lm_head(model, outputs=("log_probs", "entropy"))
        sp.check_model(model)
        sp.enable(model)
    g = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(1, vocab_size, (n,), generator=g).tolist()

    batch = DataCollatorForPreference(pad_token_id=0)(
        [{"prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(r)} for p, c, r in ((9, 3, 5), (4, 6, 2))])
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    rows = sp.prefix_rows(batch["input_ids"], batch["attention_mask"], batch["completion_mask"], sp.pair_leaders(4))
    assert sp.verify(model, {**batch, sp.ROWS_KEY: rows}) < 1e-4  # the first-batch check, on this batch
    kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                  fused_lm_head=True)
    standard = model(**kwargs)
    shared = model(**kwargs, shared_prefix_rows=rows)
    torch.testing.assert_close(shared.log_probs, standard.log_probs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared.entropy, standard.entropy, rtol=1e-5, atol=1e-5)
    params = [p for p in model.parameters() if p.requires_grad]
    for a, b in zip(torch.autograd.grad(standard.log_probs.sum(), params),
                    torch.autograd.grad(shared.log_probs.sum(), params)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * a.abs().max().item() + 1e-12)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_llama_log_probs_and_gradients_are_unchanged(implementation):
    """SmolLM2's architecture (Llama) in the installed transformers, randomly initialised."""
    assert_forward_unchanged(llama(implementation), 64)


@real_model
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_smollm2_log_probs_and_gradients_are_unchanged(implementation):
    """The pretrained SmolLM2-135M-Instruct: the shared forward is exact, and a forward that drops the position
    ids moves its log-probs far past the first-batch check's tolerance."""
    from postrain.models.loading import load_model
    from postrain.trainers import shared_prefix_dpo as sp

    model = load_model({"name_or_path": SMOLLM2, "dtype": "float32", "attn_implementation": implementation})[0]
    assert model.config.model_type == "llama" and sp.attention_implementation(model) == implementation
    assert_forward_unchanged(model, 1000)
    forward = model.model.forward
    model.model.forward = lambda *a, position_ids=None, **k: forward(*a, **k)
    with pytest.raises(sp.SharedPrefixError, match=r"differ from those of the standard rows by up to \d"):
        assert_forward_unchanged(model, 1000)


def test_rows_that_do_not_reach_the_shared_forward_fail_the_first_batch_check():
    """A fused head added again after `enable` runs the body itself and would drop the rows silently (the two
    forwards then agree): the check sees that no shared forward ran."""
    from trl.trainer.utils import add_fused_lm_head

    from postrain.trainers import shared_prefix_dpo as sp

    model = llama("sdpa")
    assert_forward_unchanged(model, 64)
    add_fused_lm_head(model)
    with pytest.raises(sp.SharedPrefixError, match="did not reach the shared-prefix forward"):
        assert_forward_unchanged(model, 64)


# sha256 of the library code the shared layout relies on; a change fails here: re-check
# postrain/trainers/shared_prefix_dpo.py (TRL's _compute_loss, compute_ref_log_probs, the collator and
# add_fused_lm_head, whose `shift_labels` the shared forward uses, are pinned in tests/test_dpo_trainer.py).
LIBRARY_SOURCE = {
    # a 4D mask is returned as it is, to sdpa and eager alike
    "transformers.masking_utils:_preprocess_mask_arguments":
        "606823244fa4870faa8b1d61b359d8ae930195da0240f5af3d83f49ae4591539",
    # the fields of the fused head's output, re-laid one by one
    "trl.trainer.utils:FusedCausalLMOutput": "5ccdd6e41dcb9f2c1037b461b852cd0c0bc275a0f78a87f350783787c1f2889a",
}


@pytest.mark.parametrize("reference", list(LIBRARY_SOURCE))
def test_library_code_the_shared_layout_relies_on_is_unchanged(reference):
    from tests.conftest import source_digest

    assert source_digest(reference) == LIBRARY_SOURCE[reference], f"{reference} changed: re-check shared_prefix.py"


# --- refusals -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra,message", [
    (["trainer.truncation_mode=keep_end"], r"trainer.truncation_mode='keep_end'.*share no prefix"),
    (["trainer.use_liger_kernel=true"], r"trainer.use_liger_kernel=True.*Liger"),
    (["loss=[{name: kto}]", "trainer.per_device_train_batch_size=2"], r"unpaired rows hold one completion"),
    (["model.attn_implementation=flash_attention_2"], r"model.attn_implementation='flash_attention_2'.*4D"),
], ids=["keep_end", "liger", "unpaired", "flash-attention"])
def test_what_the_layout_cannot_reproduce_fails_when_the_recipe_loads(tmp_path, monkeypatch, extra, message):
    import postrain.models.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(RecipeError, match=message):
        load_recipe(dpo_recipe(tmp_path, ""), [*extra, "trainer.shared_prefix=true"])
    load_recipe(dpo_recipe(tmp_path, ""), [*extra, "trainer.shared_prefix=false"])  # fine without it


def test_models_that_cannot_take_the_layout_are_refused_when_the_trainer_is_built():
    from postrain.trainers.shared_prefix_dpo import SharedPrefixError, check_model

    sliding = llama("sdpa")
    sliding.config.layer_types = ["sliding_attention", "full_attention"]
    with pytest.raises(SharedPrefixError, match="sliding-window attention"):
        check_model(sliding, "reference model")
    flash = llama("sdpa")
    flash.config._attn_implementation = "flash_attention_2"
    with pytest.raises(SharedPrefixError, match="'flash_attention_2', which cannot take the 4D attention mask"):
        check_model(flash)
    with pytest.raises(SharedPrefixError, match="flex_attention"):
        make_trainer(True, model={"attn_implementation": "flex_attention"})


def test_a_model_that_ignores_the_position_ids_fails_on_the_first_batch(monkeypatch):
    """The first batch checks the shared log-probs against the standard ones: a forward that drops the position
    ids (as a model with positions of its own would) is caught before any step is taken."""
    from postrain.trainers.shared_prefix_dpo import SharedPrefixError

    trainer = make_trainer(True, [{"name": "dpo"}])
    body = trainer.model.model
    forward = body.forward
    monkeypatch.setattr(body, "forward", lambda *a, position_ids=None, **k: forward(*a, **k))
    with pytest.raises(SharedPrefixError, match="differ from those of the standard rows by up to"):
        trainer.compute_loss(trainer.model, batch_in_order(trainer))


# --- end to end -----------------------------------------------------------------------------------------------------


def test_postrain_dpo_with_shared_prefix_logs_the_losses_of_the_plain_run(tmp_path, monkeypatch):
    from postrain.trainers.shared_prefix_dpo import SharedLayout

    built = []
    build = SharedLayout.build.__func__
    monkeypatch.setattr(SharedLayout, "build", classmethod(lambda cls, *a, **k: built.append(1) or build(cls, *a, **k)))
    logged, layouts = {}, {}
    for shared in ("false", "true"):
        recipe = dpo_recipe(tmp_path / shared, "data: {train: {source: 'builtin:arithmetic', task: {n: 16}}}\n"
                                               f"trainer: {{shared_prefix: {shared}, max_steps: 3, "
                                               "per_device_train_batch_size: 4, "
                                               "logging_steps: 1, learning_rate: 1.0e-3, save_strategy: 'no'}")
        postrain("dpo", str(recipe), f"output_dir={tmp_path / shared / 'run'}")
        logged[shared] = [r for r in read_jsonl(tmp_path / shared / "run" / "metrics.jsonl") if "loss" in r]
        assert json.loads((tmp_path / shared / "run" / "status.json").read_text())["status"] == "done"
        layouts[shared], built[:] = len(built), []
    assert layouts == {"false": 0, "true": 3 * 2 + 2}  # policy and reference per step; the first batch's check
    assert len(logged["true"]) == len(logged["false"]) == 3
    for plain, shared in zip(logged["false"], logged["true"]):
        for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected"):
            assert shared[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-6), key
