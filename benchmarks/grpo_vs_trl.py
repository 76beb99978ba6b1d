"""Whole short GRPO runs: postrain against plain TRL on the same work, side by side in one run.

    .venv/bin/python benchmarks/grpo_vs_trl.py          # quick check (short prompts, 2 steps), about a minute
    .venv/bin/python benchmarks/grpo_vs_trl.py --full   # prompts of ~512 tokens, groups of 8, 4 steps, 3 repeats

Variants (each a whole process, as a user runs it):
  trl        benchmarks/plain_trl_grpo.py: TRL's GRPOTrainer used directly (the baseline)
  postrain   `postrain grpo` with every feature off: TRL's loss, no rl:, no shared prefix       (issue 16 (a))
  rl         the rl: path with `rl: {}` (TRL's defaults through postrain's registry parts)      (b)
  dapo       the rl: path with `method: dapo` (its dynamic sampling may generate extra batches)  (b)
  shared     `trainer.shared_prefix: true`: packed forwards and shared prefill                   (f)
  dapo+shared  both
All read the same model (the embedded tiny model at --layers / --hidden, fp32), the same JSONL prompts, the same
reward function and the same GRPOConfig (the recipe's resolved `trainer:` section, bf16 off on the CPU). The
order of the variants rotates every repeat. Printed per variant: the whole process' wall time and the median
step time over the steps after the first (TRL's `step_time`: generation, scoring, forward and backward), each as
min / median / max over the repeats, and the ratio to plain TRL of the medians (> 1: faster than TRL); and the first
step's reward and gradient norm, which must equal TRL's for `postrain` and `rl` (the same computation). Then each
variant's cost over TRL from the pairs of each repeat (the median paired difference of the process' wall time, its
CPU time with its children, and the step time), with a 95% bootstrap interval: a bound such as issue 16's 3% for
`postrain` is shown met when the interval's upper end is under it.
Timings on a machine other processes are using are noise: quote figures from an idle machine only.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench_common import add_model_flags, tiny_spec

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
QUICK = {"prompt_length": 64, "completion": 16, "group": 4, "steps": 2, "repeats": 1}
FULL = {"prompt_length": 512, "completion": 64, "group": 8, "steps": 4, "repeats": 3}
VARIANTS = {  # name -> recipe lines added to the common recipe (None: the plain TRL script)
    "trl": None,
    "postrain": "",
    "rl": "rl: {{}}\n",
    "dapo": "method: dapo\nrl: {{shaping: [{{name: dapo_overlong, overlong_buffer_len: {buffer}}}]}}\n",
    "shared": "trainer: {{shared_prefix: true}}\n",
    "dapo+shared": "method: dapo\nrl: {{shaping: [{{name: dapo_overlong, overlong_buffer_len: {buffer}}}]}}\n"
                   "trainer: {{shared_prefix: true}}\n",
}
REWARD = '''def digits(completions, **kwargs):
    """Share of digits in the completion: a reward that varies within a group."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]
'''


def write_work(work: Path, args) -> dict:
    """The data, reward and base recipe every variant runs on; returns the plain TRL script's setup."""
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz0123456789 "
    rows = []
    for _ in range(args.prompts_per_step * args.steps * 2):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        question = f"\nQuestion: {a}+{b}="
        context = "".join(rng.choice(letters) for _ in range(max(0, args.prompt_length - len(question) - 9)))
        rows.append({"prompt": f"Context: {context}{question}", "answer": str(a + b)})
    (work / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (work / "rewards.py").write_text(REWARD)
    spec = tiny_spec(args, max_positions=args.prompt_length + args.completion + 64)
    base = {"defaults": ["base/grpo"], "seed": 0,
            "model": {"name_or_path": "tiny", "dtype": "float32", "tiny": spec},
            "data": {"train": {"source": str(work / "data.jsonl")}},
            "rewards": [{"fn": f"{work / 'rewards.py'}:digits"}],
            "trainer": {"max_steps": args.steps, "per_device_train_batch_size": args.prompts_per_step * args.group,
                        "num_generations": args.group, "max_completion_length": args.completion,
                        "logging_steps": 1, "activation_checkpointing": False}}
    (work / "base.yaml").write_text(yaml.safe_dump(base))
    resolved = yaml.safe_load(subprocess.run(
        [sys.executable, "-m", "postrain.cli", "config", str(work / "base.yaml")], check=True, capture_output=True,
        text=True, env=environment(args)).stdout.split("\n", 1)[1])
    from postrain.models.loading import resolve_model_path

    os.environ.setdefault("POSTRAIN_CACHE", environment(args)["POSTRAIN_CACHE"])
    trainer = {k: v for k, v in resolved["trainer"].items() if k != "shared_prefix"}  # a postrain field
    return {"model": resolve_model_path("tiny", spec), "data": str(work / "data.jsonl"),
            "rewards": f"{work / 'rewards.py'}:digits", "seed": resolved["seed"], "trainer": trainer}


def environment(args) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "POSTRAIN_RECIPES": str(REPO / "recipes"), "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("POSTRAIN_CACHE", str(Path.home() / ".cache" / "postrain"))
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    return env


def run_variant(name: str, work: Path, setup: dict, args, out: Path) -> dict:
    """One whole process; its wall time and logged steps."""
    if VARIANTS[name] is None:
        (work / "setup.json").write_text(json.dumps(setup))
        command = [sys.executable, str(HERE / "plain_trl_grpo.py"), str(work / "setup.json"), str(out)]
    else:
        recipe = work / f"{name.replace('+', '_')}.yaml"
        recipe.write_text("defaults: [base.yaml]\n" + VARIANTS[name].format(buffer=max(1, args.completion // 2)))
        command = [sys.executable, "-m", "postrain.cli", "grpo", str(recipe), f"output_dir={out}", "--overwrite"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=environment(args))
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)  # the process and its children
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    logs = (json.loads((out / "log_history.json").read_text()) if VARIANTS[name] is None else
            [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()])
    steps = [m for m in logs if "step_time" in m]
    return {"wall": wall, "cpu": cpu, "step": statistics.median(m["step_time"] for m in steps[1:] or steps),
            "first": steps[0]}


def paired_overhead(variant: list[dict], baseline: list[dict], key: str, resamples: int = 10000) -> str:
    """The variant's cost over the baseline from the pairs run back to back in each repeat: the median of the
    paired differences (variant - baseline) as a share of the baseline's median, with a seeded 95% percentile
    bootstrap interval of that median. Pairing removes what drifts between repeats (a neighbour's load); the
    interval says whether the repeats pin the figure down (a bound is shown met only when the interval is under
    it)."""
    base = statistics.median(r[key] for r in baseline)
    diffs = [v[key] - b[key] for v, b in zip(variant, baseline)]
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(diffs, k=len(diffs))) for _ in range(resamples))
    low, high = medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]
    return (f"{statistics.median(diffs):+.2f} s ({100 * statistics.median(diffs) / base:+.1f}%), 95% "
            f"[{100 * low / base:+.1f}%, {100 * high / base:+.1f}%]")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help=f"the full measurement: {FULL}")
    ap.add_argument("--prompt-length", type=int, help="characters of each prompt (tokens, for the tiny model)")
    ap.add_argument("--completion", type=int)
    ap.add_argument("--group", type=int)
    ap.add_argument("--prompts-per-step", type=int, default=2)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--workdir", help="keep the runs here (default: a temporary directory)")
    add_model_flags(ap)
    args = ap.parse_args()
    for key, value in (FULL if args.full else QUICK).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if "trl" not in args.variants:
        args.variants.insert(0, "trl")
    # postrain's bytecode, as TRL's installed package has its own (`make bytecode`): under PYTHONDONTWRITEBYTECODE
    # an editable install would otherwise compile its ~19,000 lines in every process (about 0.3 s), a cost of
    # this install, not of the wrapper. Only changed files are compiled.
    compileall.compile_dir(str(REPO / "postrain"), quiet=1)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        setup = write_work(work, args)
        print(f"tiny model: layers {args.layers}, hidden {args.hidden}; prompts ~{args.prompt_length} tokens, "
              f"completions <= {args.completion}, group {args.group}, {args.prompts_per_step} prompts per step, "
              f"{args.steps} steps; repeats {args.repeats}; threads {args.threads or 'torch default'}; "
              f"cpus {os.cpu_count()}")
        results: dict[str, list[dict]] = {name: [] for name in args.variants}
        for repeat in range(args.repeats):
            shift = repeat % len(args.variants)
            for name in args.variants[shift:] + args.variants[:shift]:
                results[name].append(run_variant(name, work, setup, args, work / "runs" / name.replace("+", "_")))
                print(f"  repeat {repeat + 1}: {name:12s} {results[name][-1]['wall']:7.2f} s", flush=True)

    def stats(values):
        return f"{min(values):7.2f} {statistics.median(values):7.2f} {max(values):7.2f}"

    base_wall = statistics.median(r["wall"] for r in results["trl"])
    base_step = statistics.median(r["step"] for r in results["trl"])
    print(f"\n{'variant':12s} {'process s (min med max)':>24s} {'step s (min med max)':>24s} "
          f"{'vs TRL process':>15s} {'vs TRL step':>12s}   step-1 reward, grad_norm")
    for name, runs in results.items():
        walls, steps = [r["wall"] for r in runs], [r["step"] for r in runs]
        first = runs[0]["first"]
        print(f"{name:12s} {stats(walls):>24s} {stats(steps):>24s} {base_wall / statistics.median(walls):14.3f}x "
              f"{base_step / statistics.median(steps):11.3f}x   {first.get('reward', float('nan')):.6f}, "
              f"{first.get('grad_norm', float('nan')):.6f}")
    print("\npaired with TRL in each repeat: median (variant - TRL) over the repeats, share of TRL's median, and "
          "its 95% bootstrap interval")
    for name, runs in results.items():
        if name != "trl":
            print(f"{name:12s} process wall {paired_overhead(runs, results['trl'], 'wall')}; process CPU "
                  f"{paired_overhead(runs, results['trl'], 'cpu')}; step {paired_overhead(runs, results['trl'], 'step')}")


if __name__ == "__main__":
    main()
