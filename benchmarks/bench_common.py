"""What the GRPO benchmarks share: timing summaries, peak memory of one computation, the model size flags.

Peak memory: on CUDA, `torch.cuda.max_memory_allocated` after a reset; on the CPU, the process' peak resident
set size (VmHWM) above its resident size just before the computation, with the peak reset through
/proc/self/clear_refs (Linux) and freed heap returned to the system (malloc_trim) first, so that each computation
is measured on its own in one process.
"""

from __future__ import annotations

import ctypes
import gc
import re
import statistics
from contextlib import contextmanager

import torch


def add_model_flags(parser) -> None:
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")


def tiny_spec(args, max_positions: int) -> dict:
    """The embedded tiny model (Qwen2-style) at the benchmark's size: `model.tiny` of a recipe."""
    return {"hidden_size": args.hidden, "num_layers": args.layers, "num_heads": args.heads,
            "num_kv_heads": args.kv_heads, "intermediate_size": 4 * args.hidden,
            "max_position_embeddings": max_positions}


def summary(values: list[float]) -> str:
    return f"min {min(values):8.3f}  median {statistics.median(values):8.3f}  max {max(values):8.3f}"


def ratio_summary(base: list[float], other: list[float]) -> str:
    """base / other of each alternating pair (> 1: `other` is faster), and of the medians."""
    pairs = [b / o for b, o in zip(base, other)]
    return (f"{statistics.median(base) / statistics.median(other):6.2f}x of medians  (pairs: min {min(pairs):.2f}"
            f"  median {statistics.median(pairs):.2f}  max {max(pairs):.2f})")


def _rss_kib() -> tuple[int, int]:
    status = open("/proc/self/status").read()
    return (int(re.search(r"VmHWM:\s+(\d+)", status).group(1)), int(re.search(r"VmRSS:\s+(\d+)", status).group(1)))


@contextmanager
def peak_memory(device: torch.device):
    """Yields a dict whose "mib" is, after the block, the peak memory the block used above its start."""
    result = {"mib": float("nan")}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        yield result
        torch.cuda.synchronize()
        result["mib"] = (torch.cuda.max_memory_allocated() - start) / 2**20
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident size
        start = _rss_kib()[1]
    except OSError:  # not Linux: no per-computation peak
        start = None
    yield result
    if start is not None:
        result["mib"] = (_rss_kib()[0] - start) / 1024


def device_line() -> str:
    if torch.cuda.is_available():
        return f"device: {torch.cuda.get_device_name()} (CUDA)"
    return f"device: CPU, torch threads {torch.get_num_threads()}"
