"""Calibrate the learning test (tests/test_learning.py): how much GRPO and DPO move held-out accuracy over
the SFT checkpoint they start from, over training seeds and CPU kernel paths.

Runs on another CPU are not bit-identical (ATen dispatches AVX2 / AVX-512 / plain kernels, so one sampled token
can differ and the runs diverge): each (CPU, seed) is an independent draw of the training run. This script makes
such draws on one machine, `ATEN_CPU_CAPABILITY` emulating other CPUs, and prints each draw's accuracies and the
gaps the test asserts on, with their minimum, so the test's margin can be set below every observed gap.

    .venv/bin/python benchmarks/learning_margin.py                       # 3 seeds x {native, default, avx2}
    .venv/bin/python benchmarks/learning_margin.py --seeds 1 2 --caps native --jobs 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.learning import pipeline_yaml  # noqa: E402  (the exact pipeline the test runs)


def one_draw(seed: int, cap: str, workdir: Path) -> dict:
    out = workdir / f"seed{seed}-{cap}"
    recipe = workdir / f"pipeline-{seed}-{cap}.yaml"
    recipe.write_text(pipeline_yaml(out, seed))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "POSTRAIN_CACHE": str(workdir / f"cache-{seed}-{cap}"),
           "POSTRAIN_RECIPES": str(REPO / "recipes")}
    if cap != "native":
        env["ATEN_CPU_CAPABILITY"] = cap
    proc = subprocess.run([sys.executable, "-m", "postrain.cli", "run", str(recipe)], cwd=REPO, env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"seed {seed} {cap} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    acc = {stage: json.loads((out / f"eval_{stage}" / "results.json").read_text())["sets"]["sampled"]["accuracy"]
           for stage in ("sft", "grpo", "dpo")}
    greedy = {stage: json.loads((out / f"eval_{stage}" / "results.json").read_text())["sets"]["greedy"]["accuracy"]
              for stage in ("sft", "grpo", "dpo")}
    return {"seed": seed, "cap": cap, **acc, "grpo-sft": acc["grpo"] - acc["sft"], "dpo-sft": acc["dpo"] - acc["sft"],
            "greedy": greedy}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[3, 4, 5])
    ap.add_argument("--caps", nargs="+", default=["native", "default", "avx2"])
    ap.add_argument("--jobs", type=int, default=1, help="draws run in parallel (one thread each)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="postrain-margin-") as tmp:
        # recipes/base/ is found through POSTRAIN_RECIPES
        draws = [(s, c) for s in args.seeds for c in args.caps]
        with ThreadPoolExecutor(args.jobs) as pool:
            rows = list(pool.map(lambda d: one_draw(d[0], d[1], Path(tmp)), draws))
    print("held-out accuracy, sampled at T=1 (greedy in brackets)")
    print(f"{'seed':>4} {'cpu path':>8} {'sft':>14} {'grpo':>14} {'dpo':>14} {'grpo-sft':>9} {'dpo-sft':>8}")
    for r in rows:
        cells = "".join(f"{r[k]:7.3f} ({r['greedy'][k]:.3f})" for k in ("sft", "grpo", "dpo"))
        print(f"{r['seed']:>4} {r['cap']:>8} {cells} {r['grpo-sft']:9.3f} {r['dpo-sft']:8.3f}")
    for key in ("grpo-sft", "dpo-sft"):
        vals = [r[key] for r in rows]
        spread = statistics.stdev(vals) if len(vals) > 1 else 0.0
        print(f"{key}: min {min(vals):.3f}  mean {statistics.mean(vals):.3f}  sd {spread:.3f}  over {len(vals)} draws")


if __name__ == "__main__":
    main()
