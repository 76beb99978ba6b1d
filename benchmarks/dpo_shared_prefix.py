"""The DPO step with `trainer.shared_prefix: true` against plain TRL's DPOTrainer on the same work, side by side.

    .venv/bin/python benchmarks/dpo_shared_prefix.py                      # quick: prompts 64 and 512, ~1 minute
    .venv/bin/python benchmarks/dpo_shared_prefix.py --prompts 64,512,2048 --pairs 4 --repeats 7   # full sizes

Both sides get the same model (the embedded tiny Qwen2 at --layers / --hidden, 4 layers and hidden 256 by
default, or --model), the same reference model, the same rows and the same TRL config (sigmoid loss, bf16=False
on CPU as postrain sets it, max_length None); the baseline is `trl.DPOTrainer` itself, the other side
`PostrainDPOTrainer(shared_prefix=True)` with TRL's own loss. A step is what a training step computes from a batch:
the policy and reference forwards, the loss, the backward (`trainer.compute_loss` then `loss.backward()`), on one
collated batch of --pairs pairs whose prompts have --prompts tokens and whose chosen and rejected answers have
--answer tokens (EOS included). The optimizer step, the same on both sides, is left out.

Printed per prompt length: seconds per step (min / median / max over --repeats, the two sides alternating, which
goes first alternating too, after one warm-up step each: the shared side's first step also checks its log-probs
against the standard ones, once per run), the ratio of medians and the range of the per-repeat ratios, the
token-count limit (2P + Cw + Cl) / (P + Cw + Cl + 1) (the +1 is the copied last prompt token the shared row
holds), the peak memory of a step, and the largest differences between the two computations: |loss| and, over
parameters, max |grad_shared - grad_trl| / max |grad_trl|.

Peak memory of one step over the memory held just before it: on CUDA, torch.cuda.max_memory_allocated; on CPU
(Linux), the peak resident memory (VmHWM, reset just before the step, after malloc_trim has handed free memory
back). Measured after the timings, in this process; --fresh-memory measures each side in a fresh process instead
(nothing left by the other side or earlier steps; a few seconds more per size, TRL's import), --no-memory skips it.

Timings are only comparable within one run; on a shared machine they are noise. Say the thread count and whether
the machine was idle when quoting them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", default="64,512", help="prompt lengths in tokens, comma-separated")
    ap.add_argument("--answer", type=int, default=64, help="tokens of each chosen / rejected answer, EOS included")
    ap.add_argument("--pairs", type=int, default=2, help="pairs per batch (per_device_train_batch_size)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--model", default="tiny", help="tiny, or a model postrain loads (name_or_path)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--attn", default=None, help="attn_implementation (default: the model's, sdpa)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    ap.add_argument("--fresh-memory", action="store_true",
                    help="measure each side's peak memory in a fresh process (a few seconds more per size)")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)  # "trl" | "shared": one step, print
    return ap.parse_args(argv)


def model_spec(args) -> dict:
    spec = {"name_or_path": args.model, "dtype": args.dtype}
    if args.attn:
        spec["attn_implementation"] = args.attn
    if args.model == "tiny":
        prompts = [int(p) for p in args.prompts.split(",")]
        spec["tiny"] = {"hidden_size": args.hidden, "num_layers": args.layers, "num_heads": 4, "num_kv_heads": 2,
                        "intermediate_size": 4 * args.hidden,
                        "max_position_embeddings": max(4096, max(prompts) + 2 * args.answer + 8)}
    return spec


def rows(tokenizer, prompt_tokens: int, answer_tokens: int, pairs: int) -> list[dict]:
    """Rows whose prompt and answers have the asked token counts under `tokenizer` (single characters for the
    tiny model's per-character tokenizer; words that are one token each otherwise, checked by the caller)."""
    rng = random.Random(0)
    unit = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    if len(tokenizer("abc")["input_ids"]) != 3:  # a subword tokenizer: " a", " b", ... are one token each
        unit = [" " + c for c in unit]

    def text(n):
        return "".join(rng.choice(unit) for _ in range(n))

    # TRL appends EOS to non-conversational answers: answer_tokens - 1 characters plus EOS
    return [{"prompt": text(prompt_tokens), "chosen": text(answer_tokens - 1), "rejected": text(answer_tokens - 1)}
            for _ in range(pairs)]


def make_trainers(args, prompt_tokens: int, sides=("trl", "shared")):
    import datasets
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import DPOConfig, DPOTrainer

    from postrain.models.loading import load_model
    from postrain.trainers.dpo import PostrainDPOTrainer

    spec = model_spec(args)
    trainers = {}
    for side in sides:
        model, tokenizer, _ = load_model(spec)
        reference = load_model(spec)[0]
        config = DPOConfig(output_dir=f"/tmp/postrain-bench-dpo-{side}", report_to="none", bf16=False,
                           max_length=None, save_strategy="no", per_device_train_batch_size=args.pairs,
                           loss_type=["sigmoid"], beta=0.1)
        dataset = datasets.Dataset.from_list(rows(tokenizer, prompt_tokens, args.answer, args.pairs))
        kwargs = dict(model=model, ref_model=reference, args=config, train_dataset=dataset, processing_class=tokenizer)
        trainer = DPOTrainer(**kwargs) if side == "trl" else PostrainDPOTrainer(**kwargs, shared_prefix=True)
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        trainers[side] = trainer
    return trainers


def batch_of(trainer) -> dict:
    dataset = trainer.train_dataset
    return trainer._prepare_inputs(trainer.data_collator([dataset[i] for i in range(len(dataset))]))


def step(trainer, batch) -> tuple[float, float]:
    """One DPO step (policy and reference forwards, loss, backward): (seconds, loss)."""
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    sync()
    seconds = time.perf_counter() - start
    trainer.model.zero_grad(set_to_none=True)
    return seconds, loss.item()


def differences(trainers: dict, batches: dict) -> tuple[float, float]:
    """Largest |loss| difference and largest relative gradient difference (max over parameters of
    max|g_shared - g_trl| / max|g_trl|) on the same batch and weights."""
    import torch

    grads, losses = {}, {}
    for side, trainer in trainers.items():
        params = [p for p in trainer.model.parameters() if p.requires_grad]
        loss = trainer.compute_loss(trainer.model, batches[side])
        grads[side] = torch.autograd.grad(loss, params)
        losses[side] = loss.item()
    relative = max(((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()
                   for a, b in zip(grads["shared"], grads["trl"]))
    return abs(losses["shared"] - losses["trl"]), relative


def step_peak_mib(trainer, batch) -> float:
    """The peak memory of one step over the memory held just before it, in MiB. CUDA: max_memory_allocated. CPU
    (Linux): the peak resident set (VmHWM), reset just before the step after handing the allocator's free memory
    back (malloc_trim), so the peak is the step's and not an earlier one's (imports, loading, earlier steps)."""
    import ctypes
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(trainer, batch)
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    resident = _status_kib("VmRSS")
    step(trainer, batch)
    return (_status_kib("VmHWM") - resident) / 1024


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_child(args) -> None:
    """--fresh-memory: one step of one side in this fresh process; prints {"peak_mib": ...}."""
    side = args.memory_child
    trainer = make_trainers(args, int(args.prompts), sides=(side,))[side]
    batch = batch_of(trainer)
    if side == "shared":
        trainer._shared_prefix_verified = True  # the once-per-run check is not part of a step
    print(json.dumps({"peak_mib": step_peak_mib(trainer, batch)}))


def peak_memory(args, side: str, prompt_tokens: int) -> float:
    argv = [a for a in sys.argv[1:]]
    command = [sys.executable, __file__, *argv, "--prompts", str(prompt_tokens), "--memory-child", side]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def summary(values: list[float]) -> str:
    return f"{min(values):7.3f} {statistics.median(values):7.3f} {max(values):7.3f}"


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    from postrain.jobs.common import quiet_libraries

    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args)
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"DPO step, shared prefix (postrain) vs plain TRL DPOTrainer; model {args.model}"
          + (f" ({args.layers} layers, hidden {args.hidden})" if args.model == "tiny" else "")
          + f", {args.dtype}, {device}, torch threads {torch.get_num_threads()}, {args.pairs} pairs per batch, "
          f"answers {args.answer} tokens, {args.repeats} alternating repeats")
    print("prompt | tokens std->shared | trl s/step min med max | shared s/step min med max | speed-up "
          "(per-repeat min-max) | token limit | peak MiB trl / shared | max |dloss| | max rel |dgrad|")
    for prompt_tokens in [int(p) for p in args.prompts.split(",")]:
        trainers = make_trainers(args, prompt_tokens)
        batches = {side: batch_of(trainer) for side, trainer in trainers.items()}
        standard = batches["trl"]
        lengths = standard["attention_mask"].sum(1)
        completions = standard["completion_mask"].sum(1)
        prompts = (lengths - completions)[: args.pairs]
        chosen, rejected = completions.chunk(2)
        shared_tokens = int((prompts + chosen + rejected + 1).sum())
        limit = int(lengths.sum()) / shared_tokens
        for side, trainer in trainers.items():  # warm-up (and the shared side's one-time check)
            step(trainer, batches[side])
        times = {"trl": [], "shared": []}
        for repeat in range(args.repeats):
            order = ("trl", "shared") if repeat % 2 == 0 else ("shared", "trl")
            for side in order:
                times[side].append(step(trainers[side], batches[side])[0])
        loss_difference, grad_difference = differences(trainers, batches)
        ratios = [a / b for a, b in zip(times["trl"], times["shared"])]
        memory = "skipped"
        if args.fresh_memory:
            del trainers, batches
            peaks = [peak_memory(args, side, prompt_tokens) for side in ("trl", "shared")]
        elif not args.no_memory:
            peaks = [step_peak_mib(trainers[side], batches[side]) for side in ("trl", "shared")]
        if args.fresh_memory or not args.no_memory:
            memory = " / ".join(f"{p:.0f}" for p in peaks)
        speedup = statistics.median(times["trl"]) / statistics.median(times["shared"])
        print(f"{prompt_tokens:6d} | {int(lengths.sum()):6d} -> {shared_tokens:6d} | {summary(times['trl'])} | "
              f"{summary(times['shared'])} | {speedup:5.2f}x "
              f"({min(ratios):.2f}-{max(ratios):.2f}) | {limit:5.2f}x | {memory} | {loss_difference:.2e} | "
              f"{grad_difference:.2e}", flush=True)


if __name__ == "__main__":
    main()
