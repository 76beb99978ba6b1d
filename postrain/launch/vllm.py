"""Generating GRPO rollouts with vLLM: TRL's own switches, checked before anything runs, and `postrain vllm-serve`.

A GRPO recipe picks the generator with TRL's keys, which every method (`method:`, `rl:`) composes with:

    trainer:
      use_vllm: true
      vllm_mode: colocate        # vLLM inside each training process (TRL's default), or `server`:
      # vllm_mode: server        #   a separate `postrain vllm-serve RECIPE` on other GPUs
      vllm_gpu_memory_utilization: 0.3
      vllm_importance_sampling_correction: true   # TRL's default; the rl: path applies it too

vLLM is an optional extra (`pip install 'postrain[vllm]'`, the vLLM range TRL 1.16 supports). A recipe that asks for
it where it is not installed stops before its run directory is made, naming what to install.

`postrain vllm-serve RECIPE` starts TRL's server for a `vllm_mode: server` recipe: the recipe's model (a run
directory, `tiny` or a packaged model resolved to its local folder), revision, dtype and the trainer's vLLM settings
(host, port, tensor parallelism, memory share, model length), through TRL's own `build_command` (trl/scripts/
vllm_serve.py), which adds what TRL's client needs (the NCCL weight-transfer engine, processed log-probs).
"""

from __future__ import annotations

import os
import sys
from importlib.util import find_spec
from typing import Any
from urllib.parse import urlparse

from postrain.errors import RecipeError, origin_of
from postrain.models.loading import resolve_model_path

INSTALL = "pip install 'postrain[vllm]' (the vLLM versions TRL 1.16 supports: trl[vllm])"


def vllm_installed() -> bool:
    return find_spec("vllm") is not None


def check_vllm_installed(cfg: dict[str, Any], origins: dict[str, str] | None = None) -> None:
    """A recipe that generates with vLLM needs vLLM here (checked before the run directory is made)."""
    trainer = cfg.get("trainer") or {}
    if trainer.get("use_vllm") and not vllm_installed():

        raise RecipeError(f"trainer.use_vllm (from {origin_of(origins or {}, 'trainer.use_vllm')}) generates with "
                          f"vLLM, which is not installed: {INSTALL}; or set trainer.use_vllm=false to generate with "
                          f"transformers")


def serve_arguments(cfg: dict[str, Any], origins: dict[str, str] | None = None):
    """TRL's vllm-serve arguments for a GRPO recipe that generates with a vLLM server."""
    # slow: trl, only for a recipe that serves vLLM
    from trl.scripts.vllm_serve import ScriptArguments

    trainer = cfg.get("trainer") or {}
    if not trainer.get("use_vllm") or trainer.get("vllm_mode", "colocate") != "server":
        where = origin_of(origins or {}, "trainer.vllm_mode")
        raise RecipeError(f"postrain vllm-serve serves a recipe that generates with a vLLM server: set "
                          f"trainer.use_vllm=true and trainer.vllm_mode=server (now use_vllm="
                          f"{trainer.get('use_vllm', False)}, vllm_mode={trainer.get('vllm_mode', 'colocate')}, "
                          f"from {where}); with vllm_mode: colocate each training process runs its own vLLM")
    model = cfg["model"]
    host, port = trainer.get("vllm_server_host", "0.0.0.0"), trainer.get("vllm_server_port", 8000)
    if trainer.get("vllm_server_base_url"):  # the trainer then connects there: serve on that port
        url = urlparse(trainer["vllm_server_base_url"])
        port = url.port or port
    max_len = trainer.get("vllm_max_model_length")
    if max_len is None and trainer.get("max_prompt_length") and trainer.get("max_completion_length"):
        max_len = int(trainer["max_prompt_length"]) + int(trainer["max_completion_length"])
    settings: dict[str, Any] = {
        "model": resolve_model_path(model["name_or_path"], model.get("tiny")),
        "revision": model.get("revision"),
        "dtype": model.get("dtype", "auto"),
        "trust_remote_code": bool(model.get("trust_remote_code")),
        "host": host, "port": int(port),
        "tensor_parallel_size": int(trainer.get("vllm_tensor_parallel_size") or 1),
        "max_model_len": max_len,
    }
    for ours, theirs in (("vllm_gpu_memory_utilization", "gpu_memory_utilization"),
                         ("vllm_model_impl", "vllm_model_impl")):
        if trainer.get(ours) is not None:
            settings[theirs] = trainer[ours]
    return ScriptArguments(**settings)


def serve_command(cfg: dict[str, Any], origins: dict[str, str] | None = None,
                  extra: list[str] | None = None) -> list[str]:
    """The `vllm serve` command line TRL builds for the recipe (Python executable first)."""
    # slow: trl, only for a recipe that serves vLLM
    from trl.scripts.vllm_serve import build_command

    return build_command(serve_arguments(cfg, origins), extra)


def check_serve_installed() -> None:
    if not vllm_installed():
        raise RecipeError(f"postrain vllm-serve runs vLLM, which is not installed: {INSTALL}")


def serve(cfg: dict[str, Any], origins: dict[str, str] | None = None, extra: list[str] | None = None) -> None:
    """Replace this process by TRL's vLLM server for the recipe (as `trl vllm-serve` does)."""
    check_serve_installed()

    command = serve_command(cfg, origins, extra)
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1"}  # TRL: its weight-transfer endpoints live in dev mode
    os.execve(sys.executable, command, env)
