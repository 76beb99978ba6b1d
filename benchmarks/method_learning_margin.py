"""Calibrate the per-method learning checks (tests/test_learning_methods.py): how much each named GRPO method
raises held-out accuracy, and each registry preference loss raises held-out preference accuracy, over the noisy
SFT checkpoint they start from, across training seeds and CPU kernel paths.

A draw is one (seed, CPU path): SFT, then every method and every loss from that SFT model, in one process with
one thread (`ATEN_CPU_CAPABILITY` emulating another CPU's kernels). The script prints each draw's figures and, per
method / loss, the minimum, mean and sd of the gain over draws, so the test's margins can be set below them.

    .venv/bin/python benchmarks/method_learning_margin.py                   # seeds 3 4 5 x {native, default, avx2}
    .venv/bin/python benchmarks/method_learning_margin.py --seeds 3 --caps native --jobs 1
    .venv/bin/python benchmarks/method_learning_margin.py --methods grpo gspo --losses dpo simpo
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

from tests import learning  # noqa: E402  (the exact stages the test runs)


def draw(seed: int, out: Path, methods: list[str], losses: list[str]) -> dict:
    """One draw, in this process: the figures the test asserts on."""
    sft = learning.train_noisy_sft(out / "sft", seed)
    pairs = learning.held_out_pairs()
    row: dict = {"sft": learning.sampled_accuracy(sft, out / "eval_sft", seed),
                 "sft_pref": learning.preference_accuracy(sft, pairs)[0], "grpo": {}, "dpo": {}}
    for m in methods:
        model = learning.grpo_with_method(sft, out / f"grpo_{m}", m, seed)
        row["grpo"][m] = learning.sampled_accuracy(model, out / f"eval_{m}", seed)
    for name in losses:
        model, logged = learning.dpo_with_loss(sft, out / f"dpo_{name}", name, seed)
        row["dpo"][name] = {"pref": learning.preference_accuracy(model, pairs)[0],
                            "loss_first": logged[0], "loss_last": logged[-1]}
    return row


def spawn(seed: int, cap: str, workdir: Path, methods: list[str], losses: list[str]) -> dict:
    out = workdir / f"seed{seed}-{cap}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "POSTRAIN_CACHE": str(workdir / f"cache-{seed}-{cap}"),
           "POSTRAIN_RECIPES": str(REPO / "recipes")}
    if cap != "native":
        env["ATEN_CPU_CAPABILITY"] = cap
    cmd = [sys.executable, __file__, "--draw", str(seed), str(out), "--methods", *methods, "--losses", *losses]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"seed {seed} {cap} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return {"seed": seed, "cap": cap, **json.loads((out / "draw.json").read_text())}


def summarize(label: str, gains: list[float]) -> str:
    sd = statistics.stdev(gains) if len(gains) > 1 else 0.0
    return f"  {label:14s} min {min(gains):+.3f}  mean {statistics.mean(gains):+.3f}  sd {sd:.3f}  over {len(gains)}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[3, 4, 5])
    ap.add_argument("--caps", nargs="+", default=["native", "default", "avx2"])
    ap.add_argument("--methods", nargs="*", default=list(learning.GRPO_METHODS))
    ap.add_argument("--losses", nargs="*", default=learning.DPO_LOSSES)
    ap.add_argument("--jobs", type=int, default=1, help="draws run in parallel (one thread each)")
    ap.add_argument("--draw", nargs=2, metavar=("SEED", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.draw:  # a child process: one draw
        import torch

        torch.set_num_threads(1)
        out = Path(args.draw[1])
        row = draw(int(args.draw[0]), out, args.methods, args.losses)
        (out / "draw.json").write_text(json.dumps(row))
        return
    with tempfile.TemporaryDirectory(prefix="postrain-method-margin-") as tmp:
        draws = [(s, c) for s in args.seeds for c in args.caps]
        with ThreadPoolExecutor(args.jobs) as pool:
            rows = list(pool.map(lambda d: spawn(d[0], d[1], Path(tmp), args.methods, args.losses), draws))
    print("GRPO: held-out accuracy sampled at T=1, per named method (SFT first)")
    for r in rows:
        cells = " ".join(f"{m}={acc:.3f}" for m, acc in r["grpo"].items())
        print(f"seed {r['seed']} {r['cap']:>8}: sft={r['sft']:.3f} {cells}")
    print("DPO: held-out preference accuracy (loss first -> last logged)")
    for r in rows:
        cells = " ".join(f"{n}={d['pref']:.3f}({d['loss_first']:.3g}->{d['loss_last']:.3g})" for n, d in r["dpo"].items())
        print(f"seed {r['seed']} {r['cap']:>8}: sft={r['sft_pref']:.3f} {cells}")
    print("gain over the SFT model:")
    for m in args.methods:
        print(summarize(m, [r["grpo"][m] - r["sft"] for r in rows]))
    for n in args.losses:
        print(summarize(n, [r["dpo"][n]["pref"] - r["sft_pref"] for r in rows]))
    falls = sum(d["loss_last"] < d["loss_first"] for r in rows for d in r["dpo"].values())
    print(f"DPO loss fell in {falls} of {sum(len(r['dpo']) for r in rows)} runs")


if __name__ == "__main__":
    main()
