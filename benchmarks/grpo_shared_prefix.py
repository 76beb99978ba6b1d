"""Shared-prefix GRPO against plain TRL, side by side in one run: the training step and generation.

    .venv/bin/python benchmarks/grpo_shared_prefix.py          # quick check (small shapes), under a minute
    .venv/bin/python benchmarks/grpo_shared_prefix.py --full   # prompts 64/512/2048, completion 64, groups 8/16

For each prompt length P and group size G (completion length C, `--prompts` groups per step):
  step        TRL's GRPOTrainer `_compute_loss` + backward over all P*G completions of the step (TRL's default
              loss, dapo) against postrain's trainer with `trainer.shared_prefix: true` on the same weights and
              batch; plus the largest loss and gradient difference between the two, in the model's dtype.
  generation  TRL's `_generate_single_turn` (transformers' generate, sampling) against the same with shared
              prefill, same seed; plus how many completions came out identical.
Each measurement alternates the two computations (which goes first flips every repeat), after one warm-up each;
times are min / median / max over the repeats, the ratio is plain / shared (> 1: shared is faster), of the medians
and per pair. Wall time is the figure; the process' CPU time is printed beside it because on a machine shared
with other processes it is the steadier of the two (with --threads 1 it is the work done, without OpenMP waits). Peak memory is that of one computation above what was allocated before it (bench_common). The token
count of a step's forward, standard (rows x columns, as TRL computes them) and packed, bounds the step's speed-up.
The model is the embedded tiny model (Qwen2-style, `model.tiny`) at --layers / --hidden, fp32 (`--model` takes
any postrain model reference, e.g. smollm2-135m-instruct; `--bf16` for TRL's bf16 autocast on a GPU).
Timings on a machine other processes are using are noise: quote figures from an idle machine only.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench_common import add_model_flags, device_line, peak_memory, ratio_summary, summary, tiny_spec


# Shapes of the quick check and of the full measurement (issue 16); any flag given overrides them.
QUICK = {"prompt_lengths": [128], "groups": [4], "completion": 16, "repeats": 2}
FULL = {"prompt_lengths": [64, 512, 2048], "groups": [8, 16], "completion": 64, "repeats": 5}


def build_trainers(args, max_positions: int, rows: int, group: int):
    """A plain TRL GRPOTrainer and postrain's with shared_prefix, each on its own copy of the same weights."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from postrain.models.loading import load_model
    from postrain.trainers.grpo import PostrainGRPOConfig, PostrainGRPOTrainer

    spec = {"name_or_path": args.model, "dtype": args.dtype, "tiny": tiny_spec(args, max_positions)}
    common = dict(per_device_train_batch_size=rows, num_generations=group, max_completion_length=args.completion,
                  report_to="none", bf16=args.bf16, save_strategy="no", activation_checkpointing=False,
                  logging_steps=1, use_cpu=not torch.cuda.is_available())
    dataset = Dataset.from_list([{"prompt": "0"}])

    def reward(completions, **kwargs):
        return [0.0] * len(completions)

    trainers = []
    for trainer_cls, config_cls, extra in ((GRPOTrainer, GRPOConfig, {}),
                                           (PostrainGRPOTrainer, PostrainGRPOConfig, {"shared_prefix": True})):
        model, tokenizer, _ = load_model(spec)
        config = config_cls(output_dir="/tmp/postrain-bench-grpo", **common, **extra)
        trainer = trainer_cls(model=model, args=config, reward_funcs=[reward], processing_class=tokenizer,
                              train_dataset=dataset)
        trainer.current_gradient_accumulation_steps = 1
        trainers.append(trainer)
    return trainers


def step_batch(args, prompt_length: int, group: int, vocab: int, device) -> dict:
    """`--prompts` groups of `group` completions: prompts of `prompt_length` tokens (with --uneven, shorter ones
    left-padded), completions of `--completion` tokens (with --uneven, between half and all of them)."""
    gen = torch.Generator().manual_seed(0)
    n, c = args.prompts * group, args.completion
    lengths = [max(2, prompt_length - (i * prompt_length // 8 if args.uneven else 0)) for i in range(args.prompts)]
    prompt_ids, prompt_mask = [], []
    for length in lengths:
        ids = torch.randint(3, vocab, (length,), generator=gen)
        pad = prompt_length - length
        prompt_ids.append(torch.cat([torch.zeros(pad, dtype=torch.long), ids]))
        prompt_mask.append(torch.cat([torch.zeros(pad, dtype=torch.long), torch.ones(length, dtype=torch.long)]))
    completion_lengths = (torch.randint(c // 2, c + 1, (n,), generator=gen) if args.uneven
                          else torch.full((n,), c))
    mask = (torch.arange(c).unsqueeze(0) < completion_lengths.unsqueeze(1)).long()
    batch = {"prompt_ids": torch.stack(prompt_ids).repeat_interleave(group, 0),
             "prompt_mask": torch.stack(prompt_mask).repeat_interleave(group, 0),
             "completion_ids": torch.randint(3, vocab, (n, c), generator=gen), "completion_mask": mask,
             "advantages": torch.randn(n, generator=gen), "num_items_in_batch": mask.sum()}
    return {k: v.to(device) for k, v in batch.items()}


def token_counts(batch: dict) -> tuple[int, int]:
    """Tokens of the standard forward (rows x columns) and of the packed one (postrain.trainers.shared_prefix)."""
    from postrain.trainers.shared_prefix import pack

    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    packed = sum(chunk.tokens for chunk in pack(ids, attention, batch["completion_ids"].size(1)))
    return ids.numel(), packed


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_step(trainer, batch):
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer._compute_loss(trainer.model, batch)
    loss.backward()
    return loss


def step_difference(plain, shared, batch) -> tuple[float, float, float]:
    """|loss difference|, its relative size, and the largest gradient difference relative to the largest entry of
    that parameter's gradient."""
    losses, grads = [], []
    for trainer in (plain, shared):
        loss = run_step(trainer, batch)
        losses.append(loss.detach().float())
        grads.append({k: p.grad.detach().float().clone() for k, p in trainer.model.named_parameters()
                      if p.grad is not None})
        trainer.model.zero_grad(set_to_none=True)
    diff = (losses[0] - losses[1]).abs().item()
    grad_diff = max(((grads[1][k] - g).abs().max() / g.abs().max().clamp(min=1e-30)).item()
                    for k, g in grads[0].items())
    return diff, diff / max(losses[0].abs().item(), 1e-30), grad_diff


def alternate(plain_fn, shared_fn, repeats: int, device) -> dict[str, dict[str, list[float]]]:
    """{"wall" | "cpu": {"plain" | "shared": seconds per repeat}}."""
    times = {"wall": {"plain": [], "shared": []}, "cpu": {"plain": [], "shared": []}}
    plain_fn(), shared_fn()  # warm-up
    for r in range(repeats):
        order = (("plain", plain_fn), ("shared", shared_fn))
        for name, fn in (order if r % 2 == 0 else order[::-1]):
            sync(device)
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            times["wall"][name].append(time.perf_counter() - wall)
            times["cpu"][name].append(time.process_time() - cpu)
    return times


def report(tag: str, times: dict, memory: tuple[float, float], names=("plain TRL", "shared prefix")) -> None:
    for key, name, mib in (("plain", names[0], memory[0]), ("shared", names[1], memory[1])):
        print(f"{tag}  {name:15s} wall s: {summary(times['wall'][key])}   peak {mib:8.1f} MiB")
    print(f"{tag}  speed-up (wall)      : {ratio_summary(times['wall']['plain'], times['wall']['shared'])}")
    print(f"{tag}  speed-up (CPU time)  : {ratio_summary(times['cpu']['plain'], times['cpu']['shared'])}")


def measure_memory(fn, device) -> float:
    with peak_memory(device) as peak:
        fn()
        sync(device)
    return peak["mib"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help=f"the full measurement: {FULL}")
    ap.add_argument("--prompt-lengths", type=int, nargs="+")
    ap.add_argument("--groups", type=int, nargs="+", help="completions per prompt (num_generations)")
    ap.add_argument("--completion", type=int)
    ap.add_argument("--prompts", type=int, default=2, help="groups (distinct prompts) per step")
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--what", nargs="+", choices=["step", "generation"], default=["step", "generation"])
    ap.add_argument("--uneven", action="store_true", help="left-padded prompts of several lengths, completions of "
                                                          "several lengths")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--bf16", action="store_true")
    add_model_flags(ap)
    args = ap.parse_args()
    for key, value in (FULL if args.full else QUICK).items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    from postrain.jobs.common import quiet_libraries

    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    max_positions = max(args.prompt_lengths) + args.completion + 8
    print(f"model {args.model} (tiny: layers {args.layers}, hidden {args.hidden}, heads {args.heads}/"
          f"{args.kv_heads}), dtype {args.dtype}, bf16 autocast {args.bf16}; {device_line()}")
    print(f"completion {args.completion}, {args.prompts} prompts per step, repeats {args.repeats}, "
          f"{'uneven' if args.uneven else 'equal'} lengths; ratio = plain TRL / shared (> 1: shared is faster)")
    for group in args.groups:
        plain, shared = build_trainers(args, max_positions, args.prompts * group, group)
        device = plain.accelerator.device
        vocab = plain.model.config.vocab_size
        for prompt_length in args.prompt_lengths:
            rows = args.prompts * group
            print(f"\n== prompt {prompt_length}, completion {args.completion}, group {group} ({rows} rows)")
            if "step" in args.what:
                batch = step_batch(args, prompt_length, group, vocab, device)
                standard, packed = token_counts(batch)
                for trainer in (plain, shared):
                    trainer.model.train()
                times = alternate(lambda: run_step(plain, batch), lambda: run_step(shared, batch), args.repeats,
                                  device)
                memory = (measure_memory(lambda: run_step(plain, batch), device),
                          measure_memory(lambda: run_step(shared, batch), device))
                loss_diff, loss_rel, grad_rel = step_difference(plain, shared, batch)
                print(f"step  tokens per forward: standard {standard}, packed {packed} "
                      f"(token-count limit {standard / packed:.2f}x)")
                report("step", times, memory)
                print(f"step  largest difference: loss {loss_diff:.2e} (relative {loss_rel:.2e}), "
                      f"gradient {grad_rel:.2e} relative")
            if "generation" in args.what:
                gen = torch.Generator().manual_seed(1)
                prompts = [torch.randint(3, vocab, (prompt_length,), generator=gen).tolist()
                           for _ in range(args.prompts)]
                prompt_ids = [p for p in prompts for _ in range(group)]
                outputs = {}

                def generate(trainer, name):
                    torch.manual_seed(2)
                    outputs[name] = trainer._generate_single_turn(prompt_ids, None, {}, group)[0]

                times = alternate(lambda: generate(plain, "plain"), lambda: generate(shared, "shared"),
                                  args.repeats, device)
                memory = (measure_memory(lambda: generate(plain, "plain"), device),
                          measure_memory(lambda: generate(shared, "shared"), device))
                same = sum(a == b for a, b in zip(outputs["plain"], outputs["shared"]))
                mean_length = statistics.mean(len(c) for c in outputs["plain"])
                report("gen ", times, memory, names=("plain TRL", "shared prefill"))
                print(f"gen   identical completions (same seed): {same}/{len(prompt_ids)}, mean length "
                      f"{mean_length:.1f} of {args.completion}")
        plain = shared = None  # the next group size builds its own trainers: free these first


if __name__ == "__main__":
    main()
