"""Shared-prefix GRPO (`trainer.shared_prefix`, postrain.trainers.shared_prefix): the same numbers, computed with
each group's prompt encoded once.

Per-token log-probs and entropies are compared with a forward pass written out here (logits, log-softmax; not
TRL's helper) on batches whose prompts are left-padded to uneven lengths and whose rows TRL's shuffle left in any
order; losses and gradients with the switch on and off, in fp32, on the same trainer and batch, for TRL's own loss
and the rl: path (sequence-level gspo, a KL regularizer with the reference forward, samplers that drop or reweight
rows, group losses over reordered rows, RePO's replay forward); generation with a shared prefill equals plain
generation (greedy: the same tokens; sampling: the same logits at every step); models and attention
implementations that cannot honour the block mask are refused when the recipe loads, or when the trainer is built.
Each comparison also checks that the packed path ran (fewer tokens than the standard rows), so none is vacuous.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from postrain.cli import app
from postrain.trainers import grpo_advantages
from tests import test_grpo_replay, test_grpo_samplers, test_grpo_trainer
from tests.conftest import source_digest, write_recipe
from tests.test_grpo_samplers import policy_logps
from tests.test_grpo_trainer import loss_and_grads

runner = CliRunner()
# Two layers, so that a mask or position error in one layer's output reaches the next one's attention.
TWO_LAYERS = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64}
GROUP, PROMPT_WIDTH, COMPLETION = 4, 7, 5
PROMPT_LENGTHS = [7, 4, 6]  # real tokens of the 3 prompts; the rest is left padding
# Completion lengths per row (generation order): empty, full and everything between.
LENGTHS = [5, 3, 1, 0, 2, 5, 5, 1, 3, 2, 4, 5]


def load(attn_implementation: str = "sdpa", **tiny):
    from postrain.models.loading import load_model

    model, tokenizer, _ = load_model({"name_or_path": "tiny", "dtype": "float32", "tiny": {**TWO_LAYERS, **tiny},
                                      "attn_implementation": attn_implementation})
    return model, tokenizer


@pytest.fixture(scope="module")
def tiny():
    return load()


def grouped_batch(pad_id: int, seed: int = 0) -> dict:
    """12 rows in generation order: 3 prompts of 7, 4 and 6 tokens, left-padded to 7, each repeated for its group
    of 4; completions of LENGTHS, right-padded with random tokens (masked)."""
    gen = torch.Generator().manual_seed(seed)
    prompts, masks = [], []
    for length in PROMPT_LENGTHS:
        pad = PROMPT_WIDTH - length
        prompts.append(torch.cat([torch.full((pad,), pad_id), torch.randint(3, 60, (length,), generator=gen)]))
        masks.append(torch.cat([torch.zeros(pad, dtype=torch.long), torch.ones(length, dtype=torch.long)]))
    n = len(LENGTHS)
    completion_mask = (torch.arange(COMPLETION).unsqueeze(0) < torch.tensor(LENGTHS).unsqueeze(1)).long()
    return {"prompt_ids": torch.stack(prompts).repeat_interleave(GROUP, 0),
            "prompt_mask": torch.stack(masks).repeat_interleave(GROUP, 0),
            "completion_ids": torch.randint(3, 60, (n, COMPLETION), generator=gen), "completion_mask": completion_mask,
            "advantages": torch.randn(n, generator=gen), "num_items_in_batch": completion_mask.sum()}


def shuffled(batch: dict, seed: int = 1) -> dict:
    """The batch's rows in another order, as TRL's shuffle_sequence_dict leaves them before the loss."""
    n = batch["completion_ids"].size(0)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return {k: (v[order] if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.size(0) == n else v)
            for k, v in batch.items()}


def with_old_and_ref(trainer, batch: dict, seed: int = 2) -> dict:
    """Old and reference log-probs off the current ones (ratios clip, the KL is not 0), from the written-out
    forward."""
    gen = torch.Generator().manual_seed(seed)
    logps = policy_logps(trainer.model, batch)
    return {**batch, "old_per_token_logps": logps + 0.3 * torch.randn(logps.shape, generator=gen),
            "ref_per_token_logps": logps + 0.5 * torch.randn(logps.shape, generator=gen)}


def forward(trainer, batch: dict, shared: bool, **kwargs):
    trainer.shared_prefix = shared
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    return trainer._get_per_token_logps_and_entropies(trainer.model, ids, attention, COMPLETION, **kwargs)


def packed_fractions(trainer) -> list[float]:
    return [x for mode in ("train", "eval") for x in trainer._metrics[mode].get("shared_prefix/token_fraction", [])]


def assert_same_loss_and_gradients(trainer, batch: dict) -> None:
    """Loss within 1e-5 and every gradient within 1e-4 relative (to the largest entry of that parameter's
    gradient), shared prefix off and on; and the shared computation packed the rows."""
    trainer.shared_prefix = False
    plain_loss, plain_grads = loss_and_grads(trainer, batch)
    before = len(packed_fractions(trainer))
    trainer.shared_prefix = True
    shared_loss, shared_grads = loss_and_grads(trainer, batch)
    fractions = packed_fractions(trainer)[before:]
    assert fractions and all(f < 0.9 for f in fractions), fractions  # the packed path ran, on fewer tokens
    assert plain_loss.abs() > 1e-4  # a batch that exercises the loss
    assert shared_loss.item() == pytest.approx(plain_loss.item(), rel=1e-5, abs=1e-8)
    assert plain_grads.keys() == shared_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        scale = grad.abs().max().clamp(min=1e-12)
        assert ((shared_grads[name] - grad).abs().max() / scale).item() < 1e-4, name


# --- per-token log-probs and entropies ---------------------------------------------------------------------------


def llama_model(tmp_path: Path, tokenizer, attn_implementation: str):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    return AutoModelForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch.float32,
                                                attn_implementation=attn_implementation)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_logps_equal_a_written_out_forward_with_padding_uneven_prompts_and_shuffled_rows(
        tmp_path, family, attn_implementation):
    model, tokenizer = load(attn_implementation)
    if family == "llama":
        model = llama_model(tmp_path, tokenizer, attn_implementation)
    trainer = test_grpo_trainer.make_trainer(tmp_path, (model, tokenizer))
    assert trainer.model.config.model_type == family
    assert trainer.model.config._attn_implementation == attn_implementation
    batch = shuffled(grouped_batch(tokenizer.pad_token_id))
    trainer.model.eval()
    with torch.no_grad():
        logps, entropies, _ = forward(trainer, batch, shared=True, compute_entropy=True)
        plain_logps, plain_entropies, _ = forward(trainer, batch, shared=False, compute_entropy=True)
    mask = batch["completion_mask"].bool()
    expected = policy_logps(trainer.model, batch)
    torch.testing.assert_close(logps[mask], expected[mask], rtol=0, atol=2e-5)
    assert (logps[~mask] == 0).all() and (entropies[~mask] == 0).all()  # as TRL's labels of -100 give
    torch.testing.assert_close(logps, plain_logps, rtol=0, atol=2e-5)
    torch.testing.assert_close(entropies, plain_entropies, rtol=0, atol=2e-5)
    # entropy of the written-out distribution
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    with torch.no_grad():
        logits = trainer.model(input_ids=ids, attention_mask=attention).logits[:, PROMPT_WIDTH - 1:-1]
    log_p = torch.log_softmax(logits, -1)
    torch.testing.assert_close(entropies[mask], -(log_p.exp() * log_p).sum(-1)[mask], rtol=0, atol=2e-5)
    # 3 prompts of 7 + 4 + 6 tokens and 36 completion tokens, instead of 12 rows of 12 columns
    assert packed_fractions(trainer) == [pytest.approx((6 + 3 + 5 + sum(LENGTHS)) / (12 * 12))]


def test_chunks_of_whole_groups_give_the_same_logps_as_one_call(tiny, tmp_path):
    """TRL's batch_size (old and reference forwards) splits the packed rows into chunks of whole groups."""
    from postrain.trainers.shared_prefix import pack

    trainer = test_grpo_trainer.make_trainer(tmp_path, tiny)
    batch = shuffled(grouped_batch(tiny[1].pad_token_id))
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    assert [c.input_ids.size(0) for c in pack(ids, attention, COMPLETION, 5)] == [1, 1, 1]
    assert [c.input_ids.size(0) for c in pack(ids, attention, COMPLETION, 8)] == [2, 1]
    with torch.no_grad():
        whole, _, _ = forward(trainer, batch, shared=True)
        chunked, _, _ = forward(trainer, batch, shared=True, batch_size=5)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)


def test_rows_with_the_same_prompt_are_found_by_their_ids():
    from postrain.trainers.shared_prefix import prompt_groups

    ids = torch.tensor([[0, 5, 6], [1, 1, 7], [0, 5, 6], [9, 5, 6], [1, 1, 7]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 1, 1], [0, 1, 1], [1, 1, 1]])
    groups, first = prompt_groups(ids, mask)
    # rows 0, 2 and 3 hold the same prompt (5, 6): row 3's pad id differs but is masked
    assert groups.tolist() == [0, 1, 0, 0, 1] and first.tolist() == [0, 1]


def test_a_batch_without_trls_layout_takes_trls_forward(tiny, tmp_path):
    """A completion mask with a hole (not TRL's layout) is not packed: TRL's own forward computes it."""
    trainer = test_grpo_trainer.make_trainer(tmp_path, tiny)
    batch = grouped_batch(tiny[1].pad_token_id)
    batch["completion_mask"][0, 1] = 0
    logps, _, _ = forward(trainer, batch, shared=True)
    assert packed_fractions(trainer) == []
    torch.testing.assert_close(logps, forward(trainer, batch, shared=False)[0], rtol=0, atol=0)


# --- losses and gradients: TRL's loss and the rl: path ------------------------------------------------------------

TRL_LOSSES = {  # GRPOConfig options of TRL's own loss
    "dapo": {"loss_type": "dapo"},
    "grpo": {"loss_type": "grpo", "scale_rewards": "group"},
    "gspo": {"loss_type": "grpo", "importance_sampling_level": "sequence", "epsilon": 3e-4, "epsilon_high": 4e-4},
    "dr_grpo_kl": {"loss_type": "dr_grpo", "beta": 0.04},
}


@pytest.mark.parametrize("case", list(TRL_LOSSES))
def test_trls_loss_and_gradients_are_unchanged(tmp_path, tiny, case):
    trainer = test_grpo_trainer.make_trainer(tmp_path, tiny, **TRL_LOSSES[case])
    batch = with_old_and_ref(trainer, shuffled(grouped_batch(tiny[1].pad_token_id)))
    assert_same_loss_and_gradients(trainer, batch)


RL_PARTS = {  # rl: sections, each on the batch as TRL's shuffle leaves it
    "rl_defaults": {},
    "gspo": {"policy_loss": "gspo", "aggregation": "seq_mean_token_mean"},
    "cispo_dr_grpo": {"advantage": "dr_grpo", "policy_loss": "cispo", "aggregation": "seq_mean_token_sum_norm"},
    "kl_entropy": {"regularizers": [{"name": "kl_k3", "beta": 0.04}, {"name": "entropy_bonus", "entropy_coef": 0.01},
                                    {"name": "high_entropy_tokens", "top_entropy_quantile": 0.5}]},
}


@pytest.mark.parametrize("case", list(RL_PARTS))
def test_rl_path_loss_and_gradients_are_unchanged(tmp_path, tiny, case):
    trainer = test_grpo_trainer.make_trainer(tmp_path, tiny, rl=RL_PARTS[case])
    batch = with_old_and_ref(trainer, shuffled(grouped_batch(tiny[1].pad_token_id)))
    assert_same_loss_and_gradients(trainer, batch)


SAMPLED = {  # samplers that drop rows, reweight them, and a group loss over rows put back in generation order
    "reinforce_rej": {"samplers": ["reinforce_rej"], "aggregation": "token_mean"},
    "gfpo_length": {"samplers": [{"name": "gfpo_length", "k": 2}], "aggregation": "seq_mean_token_mean"},
    "pf_ppo_delta_l": {"samplers": ["pf_ppo"], "aggregation": "delta_l"},
    "gvpo_whole_groups": {"policy_loss": "gvpo", "aggregation": "seq_mean_token_mean"},
}


@pytest.mark.parametrize("case", list(SAMPLED))
def test_samplers_and_group_losses_loss_and_gradients_are_unchanged(tmp_path, tiny, case):
    trainer = test_grpo_samplers.make_trainer(tmp_path, tiny, SAMPLED[case])
    batch = grouped_batch(tiny[1].pad_token_id)
    batch["old_per_token_logps"] = with_old_and_ref(trainer, batch)["old_per_token_logps"]
    trainer.rl_rewards_per_func = torch.tensor(test_grpo_samplers.REWARDS).unsqueeze(1)
    trainer.shared_prefix = True  # the advantage's own forwards (old log-probs, entropies) go through it too
    batch = grpo_advantages.replace_advantages(trainer, batch)
    if case != "gvpo_whole_groups":
        assert (batch["rl_weight"] == 0).any()  # rows were dropped
    assert_same_loss_and_gradients(trainer, shuffled(batch))


def test_repo_replay_forward_is_unchanged(tmp_path, tiny):
    """RePO's off-policy term scores replayed completions of each row's prompt: another packed forward."""
    trainer = test_grpo_replay.make_trainer(tmp_path, tiny, {"samplers": [test_grpo_replay.REPLAY]})
    batch, _, _ = test_grpo_replay.fixed_batch(trainer, torch.Generator().manual_seed(0))
    assert batch["rl_replay_valid"].sum() == 6
    assert_same_loss_and_gradients(trainer, shuffled(batch))


def test_lora_policy_and_its_adapter_free_reference_are_unchanged(tmp_path):
    """With peft (LoRA), the policy forward goes through the adapter and the reference forward is the same model
    with the adapter disabled (TRL's `use_adapter`): both packed, the loss and the LoRA gradients unchanged."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig

    from postrain.trainers.grpo import PostrainGRPOTrainer

    model, tokenizer = load()
    args = GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=len(LENGTHS),
                      num_generations=GROUP, max_completion_length=COMPLETION, report_to="none", bf16=False,
                      save_strategy="no", activation_checkpointing=False, beta=0.04)
    trainer = PostrainGRPOTrainer(model=model, args=args, reward_funcs=[test_grpo_trainer.fixed_reward],
                                  processing_class=tokenizer, train_dataset=Dataset.from_list([{"prompt": "1+1="}]),
                                  peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                         init_lora_weights=False, task_type="CAUSAL_LM"))
    trainer.current_gradient_accumulation_steps = 1
    batch = shuffled(grouped_batch(tokenizer.pad_token_id))
    references = {}
    for shared in (False, True):
        trainer.shared_prefix = shared
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
        attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
        with torch.no_grad(), trainer.accelerator.unwrap_model(trainer.model).disable_adapter():
            references[shared], _, _ = trainer._get_per_token_logps_and_entropies(
                trainer.model, ids, attention, COMPLETION)
    torch.testing.assert_close(references[True], references[False], rtol=0, atol=2e-5)
    with torch.no_grad():  # the adapter changes the policy: the reference is another model
        assert (forward(trainer, batch, shared=True)[0] - references[True]).abs().max() > 1e-3
    batch = with_old_and_ref(trainer, batch)
    batch["ref_per_token_logps"] = references[False]
    assert_same_loss_and_gradients(trainer, batch)
    assert all("lora" in name for name in loss_and_grads(trainer, batch)[1])


def test_old_and_reference_forwards_of_a_generation_batch_are_unchanged(tmp_path, tiny):
    """TRL's `_generate_and_score_completions` with a reference model (beta) and old log-probs (num_iterations 2):
    generation (shared prefill), the old-policy and the reference forwards, then TRL's loss with the KL term."""
    trainer = test_grpo_trainer.make_trainer(tmp_path, tiny, beta=0.04, num_iterations=2, loss_type="grpo")
    assert trainer.ref_model is not None
    trainer.model.train()
    outputs = {}
    for shared in (False, True):
        trainer.shared_prefix = shared
        torch.manual_seed(3)
        outputs[shared] = trainer._generate_and_score_completions(test_grpo_trainer.generation_batch())
    plain, shared = outputs[False], outputs[True]
    assert torch.equal(plain["completion_ids"], shared["completion_ids"])  # the same samples (same logits)
    assert plain["old_per_token_logps"] is not None and plain["ref_per_token_logps"] is not None
    for key in ("old_per_token_logps", "ref_per_token_logps"):
        torch.testing.assert_close(shared[key], plain[key], rtol=0, atol=1e-5)
    assert packed_fractions(trainer)  # the old and reference forwards were packed
    # The policy has not moved since generation (ratio 1, KL 0) and group-centred advantages sum to 0 per group,
    # so the loss is ~0: shift the advantages for a loss that is not.
    assert_same_loss_and_gradients(trainer, shuffled({**shared, "advantages": shared["advantages"] + 0.5}))


# --- generation ---------------------------------------------------------------------------------------------------


def count_tokens(model):
    """A hook counting the tokens the model's embedding layer sees (prefill and decoding)."""
    seen = []
    handle = model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].numel()))
    return seen, handle


def test_generation_with_shared_prefill_is_greedy_equal_and_prefills_each_prompt_once(tmp_path, tiny):
    trainer = test_grpo_trainer.make_trainer(tmp_path, tiny, generation_kwargs={"do_sample": False})
    prompts = [trainer.processing_class.encode(p) for p in ("12+3=", "7*8=", "100-1=")]
    prompt_ids = [ids for ids in prompts for _ in range(GROUP)]
    results = {}
    for shared in (False, True):
        trainer.shared_prefix = shared
        seen, handle = count_tokens(trainer.model)
        results[shared] = (trainer._generate_single_turn(prompt_ids, None, {}, GROUP)[0], sum(seen))
        handle.remove()
    (plain, plain_tokens), (ours, our_tokens) = results[False], results[True]
    assert ours == plain
    width = max(len(p) for p in prompts)
    # the prompt prefill: 12 rows of `width` columns, or 3 rows of width - 1 and then 12 last prompt tokens
    assert plain_tokens - our_tokens == 12 * width - (3 * (width - 1) + 12)


def test_sampling_with_shared_prefill_has_the_same_logits_at_every_step(tiny):
    from transformers import GenerationConfig

    from postrain.trainers.shared_prefix import generate_with_shared_prefill

    model, tokenizer = tiny
    model.eval()
    batch = grouped_batch(tokenizer.pad_token_id)
    config = GenerationConfig(max_new_tokens=8, do_sample=True, temperature=1.0, top_p=1.0,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                              output_logits=True, return_dict_in_generate=True, disable_compile=True)
    runs = []
    for generate in (model.generate, lambda **kw: generate_with_shared_prefill(model.generate, model, **kw)):
        torch.manual_seed(7)
        runs.append(generate(input_ids=batch["prompt_ids"], attention_mask=batch["prompt_mask"],
                             generation_config=config))
    plain, shared = runs
    assert len(plain.logits) == len(shared.logits) == 8
    for step, (a, b) in enumerate(zip(plain.logits, shared.logits)):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5, msg=f"step {step}")
    assert torch.equal(plain.sequences, shared.sequences)  # the same draws from the same distribution


def test_trls_fused_lm_head_which_scores_the_packed_rows_is_unchanged():
    """The packed rows are scored by TRL's fused LM head through `shift_labels` (labels not shifted again);
    a TRL change there fails here: re-check postrain.trainers.shared_prefix.packed_logps_and_entropies."""
    assert source_digest("trl.trainer.utils:add_fused_lm_head") == (
        "422d009f04b66659982f9545a90d560bdcc27fde3268de203d0c5c6d1449d211")


# --- refusals -----------------------------------------------------------------------------------------------------


def grpo_recipe(tmp_path: Path, model: str = "name_or_path: tiny", trainer: str = "") -> Path:
    (tmp_path / "my_rewards.py").write_text(
        "def varied(completions, **kwargs):\n"
        "    return [float(len(c) % 3) for c in completions]\n")
    return write_recipe(tmp_path / "grpo.yaml", f"""
defaults: [base/grpo]
model: {{{model}, dtype: float32, tiny: {json.dumps(TWO_LAYERS)}}}
data: {{train: {{source: "builtin:arithmetic", task: {{n: 16, digits: 1}}}}}}
rewards: [{{fn: "my_rewards.py:varied"}}]
trainer: {{max_steps: 2, per_device_train_batch_size: 8, logging_steps: 1, num_generations: 4,
          max_completion_length: 6, activation_checkpointing: false, shared_prefix: true{trainer}}}
""")


def gpt2_folder(tmp_path: Path) -> Path:
    from transformers import AutoModelForCausalLM, GPT2Config

    from postrain.models.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    return tmp_path / "gpt2"


@pytest.mark.parametrize("override, expected", [
    ("model.attn_implementation=flash_attention_2",
     "attention implementation 'flash_attention_2' cannot take the block attention mask"),
    ("model.attn_implementation=flex_attention", "supported: sdpa, eager"),
    ("trainer.use_liger_kernel=true", "cannot be combined with trainer.use_liger_kernel (from command line)"),
    ("model.name_or_path=GPT2", "model type 'gpt2' is not one whose attention is known to honour a custom 4D mask"),
])
def test_unsupported_models_are_refused_when_the_recipe_loads(tmp_path, override, expected):
    if "GPT2" in override:
        override = f"model.name_or_path={gpt2_folder(tmp_path)}"
    recipe = str(grpo_recipe(tmp_path))
    result = runner.invoke(app, ["config", recipe, override])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    output = " ".join(result.output.split())
    assert f"trainer.shared_prefix (from {recipe})" in output and expected in output
    assert runner.invoke(app, ["config", recipe, override, "trainer.shared_prefix=false"]).exit_code == 0


def test_unsupported_model_is_refused_when_the_trainer_is_built(tmp_path):
    """A model the recipe check could not read (a hub model not yet on disk) is checked on the loaded model."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from postrain.errors import RecipeError
    from postrain.trainers.grpo import PostrainGRPOConfig, PostrainGRPOTrainer

    folder = gpt2_folder(tmp_path)
    args = PostrainGRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
                              report_to="none", bf16=False, shared_prefix=True)
    with pytest.raises(RecipeError, match="trainer.shared_prefix cannot run on this model: model type 'gpt2'"):
        PostrainGRPOTrainer(model=AutoModelForCausalLM.from_pretrained(folder), args=args,
                            reward_funcs=[test_grpo_trainer.fixed_reward],
                            processing_class=AutoTokenizer.from_pretrained(folder),
                            train_dataset=Dataset.from_list([{"prompt": "1+1="}]))


def test_sliding_window_and_length_dependent_rope_are_refused():
    from transformers import LlamaConfig, Qwen2Config

    from postrain.trainers.shared_prefix import unsupported_reason

    assert unsupported_reason(Qwen2Config(num_hidden_layers=2)) is None
    assert "sliding-window" in unsupported_reason(Qwen2Config(num_hidden_layers=2, use_sliding_window=True,
                                                              max_window_layers=1))
    dynamic = LlamaConfig(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    assert "RoPE type 'dynamic'" in unsupported_reason(dynamic)


# --- end to end ---------------------------------------------------------------------------------------------------


def test_a_run_with_shared_prefix_logs_what_a_run_without_logs(tmp_path):
    """Two steps of `method: dapo` (rl: path, HF generation), switch on and off, same seed: the same completions
    (shared prefill samples from the same logits), so the same rewards, losses and entropies."""
    recipe = grpo_recipe(tmp_path, trainer=", seed: 3")
    (tmp_path / "grpo.yaml").write_text((tmp_path / "grpo.yaml").read_text() + "method: dapo\nrl: {shaping: [{name: dapo_overlong, overlong_buffer_len: 3}]}\n")
    logs = {}
    for shared in ("true", "false"):
        out = tmp_path / f"run_{shared}"
        result = runner.invoke(app, ["grpo", str(recipe), f"output_dir={out}", f"trainer.shared_prefix={shared}"])
        assert result.exit_code == 0, result.output + repr(result.exception)
        logs[shared] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                        if "loss" in json.loads(line)]
    on, off = logs["true"], logs["false"]
    assert [m["step"] for m in on] == [m["step"] for m in off] == [1, 2]
    for a, b in zip(on, off):
        assert 0 < a["shared_prefix/token_fraction"] < 0.9 and "shared_prefix/token_fraction" not in b
        assert a["completions/mean_length"] == b["completions/mean_length"]
        assert a["reward_std"] > 0 and a["grad_norm"] > 0  # a learning signal, so the losses mean something
        for key in ("reward", "loss", "entropy", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), key
