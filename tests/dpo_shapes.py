"""Helpers of the list-wise and unpaired DPO trainer tests (tests/test_dpo_listwise.py, test_dpo_unpaired.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.conftest import TINY, write_recipe

TINY_SPEC = {"name_or_path": "tiny", "dtype": "float32", "tiny": TINY}
TINY_MODEL = "model: {name_or_path: tiny, dtype: float32, tiny: %s}\n" % json.dumps(TINY)


def make_trainer(trainer_cls, losses, rows: list[dict], ref_seed: int | None = 5, **config):
    """A `trainer_cls` on the tiny model; the reference is another tiny model (seed `ref_seed`), so that
    log-ratios are not all zero, or TRL's implicit copy of the policy (ref_seed None)."""
    import datasets
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import DPOConfig

    from postrain.models.loading import load_model

    model, tokenizer, _ = load_model(TINY_SPEC)
    ref = load_model({**TINY_SPEC, "tiny": {**TINY, "seed": ref_seed}})[0] if ref_seed is not None else None
    config = {"output_dir": "/tmp/postrain-dpo-shapes-test", "per_device_train_batch_size": 4, "logging_steps": 1,
              "report_to": "none", "bf16": False, "max_length": 32, "save_strategy": "no", **config}
    args = DPOConfig(**{**config, "output_dir": str(config["output_dir"])})
    trainer = trainer_cls(model=model, ref_model=ref, args=args, train_dataset=datasets.Dataset.from_list(rows),
                          processing_class=tokenizer, losses=losses)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


def summed_logps(model, tokenizer, prompt: str, completion: str) -> torch.Tensor:
    """log π(completion + EOS | prompt) from a plain forward of the model on this one sequence (its logits, a
    float32 log-softmax, the completion tokens' entries summed): the reference the trainers' batched, fused-head
    log-probs are checked against. Differentiable."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = tokenizer(prompt + completion + tokenizer.eos_token)["input_ids"]
    assert ids[:len(prompt_ids)] == prompt_ids  # the character-level tiny tokenizer never merges across the seam
    logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    log_probs = logits.log_softmax(dim=-1)
    return sum(log_probs[t - 1, ids[t]] for t in range(len(prompt_ids), len(ids)))


def loss_before_and_after_training(trainer, whole_batch) -> tuple[float, float]:
    """The loss on the whole training set (as `whole_batch(trainer)` collates it) before and after training."""

    def whole_set_loss() -> float:
        trainer.model.eval()
        with torch.no_grad():
            return trainer.compute_loss(trainer.model, whole_batch(trainer)).item()

    before = whole_set_loss()
    trainer.train()
    return before, whole_set_loss()


def logged(trainer, key: str) -> list[float]:
    return [h[key] for h in trainer.state.log_history if key in h]


def dpo_recipe(tmp_path: Path, extra: str) -> Path:
    return write_recipe(tmp_path / "dpo.yaml", f"defaults: [base/dpo]\n{TINY_MODEL}{extra}\n")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def source_digest(reference: str) -> str:
    """sha256 of the source of `module:Qualified.name` (a TRL method postrain copies from, mirrors or calls)."""
    import hashlib
    import importlib
    import inspect

    module, _, qualname = reference.partition(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()
