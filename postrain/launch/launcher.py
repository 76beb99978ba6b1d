"""Running a recipe on many processes: postrain re-executes itself under `accelerate launch`, as TRL's CLI does.

    postrain grpo recipe.yaml launch.num_processes=8 launch.config=zero3
      -> accelerate launch --config_file <postrain>/launch/configs/zero3.yaml --num_processes 8 ... \
             -m postrain.cli grpo recipe.yaml launch.num_processes=8 launch.config=zero3

The calling process loads and checks the recipe and the run directory first (so a mistake is reported once, before
any worker starts), then runs accelerate's launcher in-process (as trl/cli/accelerate_launcher.py does); the workers
run the same command line and see that they were launched (`inside_launch`), so they run the job instead of
launching again. A recipe can equally be started by hand under `accelerate launch` or `torchrun`.

When a worker fails, torch's elastic agent stops the others (no rank is left waiting in a collective). Each worker
writes its error into the launch's error folder (`record_rank_error`), and the calling process prints the first
one, naming the rank, and exits with that worker's exit code; the run directory's status says `failed` with it.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import yaml

from postrain.errors import RecipeError, did_you_mean, origin_of
from postrain.recipes.schema import LaunchSpec

CONFIG_DIR = Path(__file__).parent / "configs"
# The shipped accelerate configurations, by name (postrain/launch/configs/<name>.yaml); what each is for is written
# at the top of its file and in the README.
SHIPPED_CONFIGS = ("ddp", "fsdp2", "fsdp2_offload", "zero2", "zero3", "zero3_offload")
DEFAULT_MULTI_PROCESS_CONFIG = "ddp"

# Set in the workers' environment by `relaunch`: they must run the job, not launch again.
LAUNCHED_ENV = "POSTRAIN_LAUNCHED"
# The calling process' start time: the run's wall time counts from there, not from a worker's start.
START_ENV = "POSTRAIN_LAUNCH_START"
# The folder where a failing worker writes its error for the calling process (`record_rank_error`).
ERRORS_ENV = "POSTRAIN_LAUNCH_ERRORS"


@dataclass(frozen=True)
class Layout:
    """Where this process stands: its global rank, the number of processes, and whether it writes the run directory."""

    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current_layout() -> Layout:
    """This process' rank and the world size, from the variables torchrun / accelerate set for every worker (so it
    is known before torch.distributed is initialized); one process otherwise."""
    return Layout(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))


def inside_launch() -> bool:
    """Whether this process is a worker of a launch (postrain's, or accelerate / torchrun started by hand)."""
    return bool(os.environ.get(LAUNCHED_ENV)) or "WORLD_SIZE" in os.environ or "LOCAL_RANK" in os.environ


def launch_section(cfg: dict) -> dict[str, Any] | None:
    """The recipe's `launch:` section with its defaults, or None for a command that has none."""
    section = cfg.get("launch")
    if section is None:
        return None

    return {**asdict(LaunchSpec()), **section}


def world_size(section: dict[str, Any] | None) -> int:
    """The number of processes a recipe's launch section asks for, over every machine."""
    if not section:
        return 1
    return int(section["num_processes"]) * int(section["num_machines"])


def needs_launch(section: dict[str, Any] | None) -> bool:
    """Whether running this recipe means starting workers: more than one process, or a sharding configuration
    (ZeRO-2 or FSDP2 on one GPU still needs accelerate to set the engine up), and this process is not one of them."""
    if not section or inside_launch():
        return False
    return world_size(section) > 1 or section.get("config") is not None


def check_launch_section(command: str, cfg: dict, origins: dict[str, str]) -> None:
    """Load-time checks of `launch:` (postrain.jobs.checks): counts in range, a known or existing config file,
    what a multi-node launch needs."""
    section = launch_section(cfg)
    if section is None:
        return

    def where(key: str) -> str:
        return f"launch.{key} (from {origin_of(origins, f'launch.{key}')})"

    for key in ("num_processes", "num_machines"):
        if section[key] < 1:
            raise RecipeError(f"{where(key)} must be at least 1, got {section[key]}")
    if not 0 <= section["machine_rank"] < section["num_machines"]:
        raise RecipeError(f"{where('machine_rank')} must lie in 0..num_machines - 1 ({section['num_machines'] - 1}), "
                          f"got {section['machine_rank']}")
    if section["num_machines"] > 1 and not section["main_process_ip"]:
        raise RecipeError(f"{where('main_process_ip')} is required when launch.num_machines > 1: the address of the "
                          f"machine with machine_rank 0, which every machine connects to")
    if not 1 <= section["main_process_port"] <= 65535:
        raise RecipeError(f"{where('main_process_port')} must be a TCP port (1-65535), got {section['main_process_port']}")
    config = section["config"]
    if config is not None and config not in SHIPPED_CONFIGS and not config_file(section, origins).is_file():
        near = did_you_mean(config, SHIPPED_CONFIGS)
        raise RecipeError(f"{where('config')} is {config!r}: neither a shipped configuration "
                          f"({', '.join(SHIPPED_CONFIGS)}) nor an accelerate config file"
                          f"{'; ' + near if near else ''}")


def config_file(section: dict[str, Any], origins: dict[str, str] | None = None) -> Path:
    """The accelerate config file of a launch section: a shipped one by name, or the user's own file."""
    name = section.get("config") or DEFAULT_MULTI_PROCESS_CONFIG
    if name in SHIPPED_CONFIGS:
        return CONFIG_DIR / f"{name}.yaml"
    path = Path(name).expanduser()
    origin = (origins or {}).get("launch.config")
    if not path.is_absolute() and origin and Path(origin).is_file():  # relative to the recipe file that set it
        path = Path(origin).parent / path
    return path.resolve()


def accelerate_arguments(section: dict[str, Any], origins: dict[str, str] | None = None) -> list[str]:
    """`accelerate launch` arguments for a launch section: the config file for the sharding, and the process
    layout on the command line (accelerate's arguments override the file's, so a shipped file serves any size)."""
    args = ["--config_file", str(config_file(section, origins)),
            "--num_processes", str(world_size(section)),  # accelerate counts processes over all machines
            "--num_machines", str(section["num_machines"]),
            "--machine_rank", str(section["machine_rank"]),
            "--main_process_port", str(section["main_process_port"])]
    if section.get("main_process_ip"):
        args += ["--main_process_ip", str(section["main_process_ip"])]
    return args + [str(a) for a in section.get("extra_args") or []]


def worker_command(cli_args: list[str]) -> list[str]:
    """What each worker runs: postrain's own command line (the same recipe, overrides and flags)."""
    return ["-m", "postrain.cli", *cli_args]


def command_line(section: dict[str, Any], cli_args: list[str], origins: dict[str, str] | None = None) -> str:
    """The launch as a shell command a user can run by hand (`--dry-run` prints it)."""
    words = ["accelerate", "launch", *accelerate_arguments(section, origins), *worker_command(cli_args)]
    return " ".join(shlex.quote(w) for w in words)


def launched_worker() -> bool:
    """Whether this process is a worker of postrain's own launch (whose calling process reports for it)."""
    return bool(os.environ.get(LAUNCHED_ENV))


def check_runnable_here(section: dict[str, Any], origins: dict[str, str] | None = None) -> None:
    """Before starting workers: a sharding configuration this machine cannot run is an error now, not a run that
    silently trains without it. accelerate 1.16 turns FSDP and DeepSpeed on only over GPU-type backends
    (accelerate/state.py, AcceleratorState: MULTI_GPU, MULTI_NPU, ...; never MULTI_CPU), and DeepSpeed is an
    optional package."""

    strategy = sharding_strategy(section, origins)
    if strategy == "ddp":
        return
    where = f"launch.config {section.get('config')!r} (from {origin_of(origins or {}, 'launch.config')})"
    # slow: torch, only to ask for GPUs when a recipe shards the model
    import torch

    if not torch.cuda.is_available():
        raise RecipeError(f"{where} shards the model with {'DeepSpeed' if strategy.startswith('zero') else 'FSDP'}, "
                          f"which accelerate sets up on GPUs only, and this machine has none: without GPUs the "
                          f"processes would train unsharded. Use launch.config: ddp (or none) here")
    if strategy.startswith("zero") and find_spec("deepspeed") is None:
        raise RecipeError(f"{where} needs DeepSpeed, which is not installed: pip install deepspeed")


def record_rank_error(message: str, exit_code: int, traceback: str | None = None) -> bool:
    """In a worker of postrain's launch: leave this rank's error (and the traceback of an unexpected one) for the
    calling process, which prints the first failure; False elsewhere (the error is this process' to print)."""
    folder = os.environ.get(ERRORS_ENV)
    if not folder:
        return False
    layout = current_layout()
    record = {"rank": layout.rank, "world_size": layout.world_size, "message": message, "exit_code": exit_code,
              "traceback": traceback, "time": time.time()}
    try:
        Path(folder, f"rank-{layout.rank}.json").write_text(json.dumps(record))
    except OSError:
        return False
    return True


def first_rank_error(folder: Path) -> dict | None:
    """The earliest error a worker recorded: the cause; later ones are usually peers losing their connection."""
    records = []
    for path in Path(folder).glob("rank-*.json"):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return min(records, key=lambda r: r["time"]) if records else None


def relaunch(section: dict[str, Any], cli_args: list[str], origins: dict[str, str] | None = None,
             started: float | None = None, env: dict[str, str] | None = None) -> tuple[int, str | None]:
    """Run `cli_args` under `accelerate launch` with the recipe's layout; returns the exit code and, on failure,
    the first failing rank's message ("rank R of N: ..."). Blocks until every worker has ended. `started`: when
    the command started (the run's wall time counts from there); `env`: further variables for the workers."""

    # slow: accelerate (torch), only when a run starts workers
    from accelerate.commands.launch import launch_command, launch_command_parser

    # torch's elastic agent logs each failed worker with a long traceback summary; the worker's own error line and
    # the one-line summary below say it better.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="postrain-launch-") as errors:
        args = launch_command_parser().parse_args(accelerate_arguments(section, origins)
                                                  + worker_command(cli_args))
        args.module = True  # `-m postrain.cli`: the script is a module
        env = {**(env or {}), LAUNCHED_ENV: "1", START_ENV: str(started or time.time()), ERRORS_ENV: errors}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            launch_command(args)
            return 0, None
        except (Exception, SystemExit) as e:  # ChildFailedError (torchrun), CalledProcessError (one process)
            code = _exit_code(e)
            record = first_rank_error(Path(errors))
            if record is None:
                return code or 1, f"a launched process failed ({type(e).__name__}: {str(e).strip()[:300]})"
            if record.get("traceback"):  # an unexpected error: where it happened, as the worker would have shown it
                print(f"rank {record['rank']}: {record['traceback']}", file=sys.stderr, end="", flush=True)
            return record["exit_code"] or code or 1, (f"rank {record['rank']} of {record['world_size']}: "
                                                      f"{record['message']}")
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _exit_code(error: BaseException) -> int:
    if isinstance(error, SystemExit):
        return error.code if isinstance(error.code, int) else 1
    code = getattr(error, "returncode", None)
    if isinstance(code, int):
        return code
    failures = getattr(error, "failures", None)  # torch.distributed.elastic ChildFailedError: rank -> failure
    if failures:
        first = min(failures.values(), key=lambda f: f.timestamp)
        return int(first.exitcode) if first.exitcode and first.exitcode > 0 else 1
    return 1


def launch_started() -> float | None:
    """When the calling process started the launch (a worker's wall time counts from there)."""
    value = os.environ.get(START_ENV)
    return float(value) if value else None


def sharding_strategy(section: dict[str, Any] | None, origins: dict[str, str] | None = None) -> str:
    """The sharding a launch section's accelerate config applies, as one of the shipped names (a config file of
    one's own is read: its distributed_type, ZeRO stage and offload settings)."""
    if not section or (section.get("config") is None and world_size(section) == 1):
        return "ddp"  # one process: a full copy of everything, as ddp keeps per process
    name = section.get("config") or DEFAULT_MULTI_PROCESS_CONFIG
    if name in SHIPPED_CONFIGS:
        return name

    data = yaml.safe_load(config_file(section, origins).read_text()) or {}
    kind = str(data.get("distributed_type", "")).upper()
    if kind == "DEEPSPEED":
        ds = data.get("deepspeed_config") or {}
        stage = int(ds.get("zero_stage", 2))
        offload = str(ds.get("offload_optimizer_device", "none")) != "none"
        return "zero3_offload" if stage == 3 and offload else "zero3" if stage == 3 else "zero2"
    if kind == "FSDP":
        offload = bool((data.get("fsdp_config") or {}).get("fsdp_offload_params"))
        return "fsdp2_offload" if offload else "fsdp2"
    return "ddp"
