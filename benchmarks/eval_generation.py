"""Batched generation with a KV cache (what `postrain eval` does) against the obvious alternative, one prompt
at a time without a cache, measured side by side in one run on the same model and prompts.

    .venv/bin/python benchmarks/eval_generation.py [--prompts 64] [--new-tokens 16] [--layers 3 --hidden 128]

Prints the seconds of each and the speed-up ratio. Greedy outputs are compared too: batching must not change
what the model says.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()

    from postrain.data.tasks import build_task
    from postrain.jobs.common import quiet_libraries
    from postrain.models.generation import generate
    from postrain.models.loading import load_model

    quiet_libraries()
    spec = {"hidden_size": args.hidden, "num_layers": args.layers, "num_heads": 4, "num_kv_heads": 2,
            "intermediate_size": 4 * args.hidden}
    model, tok, _ = load_model({"name_or_path": "tiny", "dtype": "float32", "tiny": spec})
    prompts = [r["prompt"] for r in build_task("arithmetic", "test", {"n": args.prompts, "digits": 3})]
    gen = {"max_new_tokens": args.new_tokens, "do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
           "num_samples": 1, "batch_size": args.batch_size}

    start = time.perf_counter()
    batched = generate(model, tok, prompts, gen)
    t_batched = time.perf_counter() - start

    start = time.perf_counter()
    single = []
    for p in prompts:
        ids = tok(p, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=args.new_tokens, do_sample=False, use_cache=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        single.append([tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)])
    t_single = time.perf_counter() - start

    same = sum(a == b for a, b in zip(batched, single))
    print(f"prompts={len(prompts)} new_tokens={args.new_tokens} model=tiny(layers={args.layers}, hidden={args.hidden})")
    print(f"one at a time, no KV cache : {t_single:8.3f} s")
    print(f"batched + KV cache (eval)  : {t_batched:8.3f} s")
    print(f"speed-up                   : {t_single / t_batched:8.2f}x")
    print(f"identical greedy outputs   : {same}/{len(prompts)}")


if __name__ == "__main__":
    main()
