"""Plain TRL GRPO: the baseline of benchmarks/grpo_vs_trl.py. TRL's GRPOTrainer used directly, as a TRL user
writes it, on the work a postrain recipe describes (benchmarks/grpo_vs_trl.py writes both):

    .venv/bin/python benchmarks/plain_trl_grpo.py SETUP.json OUTPUT_DIR

SETUP.json: {"model": a model folder, "data": a JSONL file, "rewards": "file.py:function", "seed": int,
"trainer": GRPOConfig fields (the recipe's resolved `trainer:` section)}. bf16 is off on the CPU, as postrain
sets it (TRL's default bf16=True would make the CPU baseline run in emulated bf16). Writes OUTPUT_DIR/model (the
trained model and tokenizer, as postrain saves its final model) and OUTPUT_DIR/log_history.json (TRL's logs:
step_time per step).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path


def main() -> None:
    setup_path, output_dir = Path(sys.argv[1]), Path(sys.argv[2])
    setup = json.loads(setup_path.read_text())

    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    file, function = setup["rewards"].rsplit(":", 1)
    spec = importlib.util.spec_from_file_location("bench_rewards", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    model = AutoModelForCausalLM.from_pretrained(setup["model"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(setup["model"])
    dataset = load_dataset("json", data_files=setup["data"], split="train")
    bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    args = GRPOConfig(output_dir=str(output_dir / "checkpoints"), seed=setup["seed"], bf16=bf16,
                      **setup["trainer"])
    trainer = GRPOTrainer(model=model, args=args, reward_funcs=[getattr(module, function)],
                          train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(str(output_dir / "model"))
    tokenizer.save_pretrained(output_dir / "model")
    (output_dir / "log_history.json").write_text(json.dumps(trainer.state.log_history))


if __name__ == "__main__":
    main()
