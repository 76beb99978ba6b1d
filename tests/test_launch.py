"""Launching a recipe on many processes (postrain.launch, issue #15).

Fast checks: every shipped accelerate configuration loads and passes `accelerate launch`'s own validation; the dry
run prints the exact launch command and the memory plan, whose arithmetic is checked against the ZeRO paper's own
figures; load-time errors of `launch:`; the recipe hash; the layout-coupled preference losses split over processes.

End to end (one xdist group: the launches run one after another on one worker): sft, dpo (beta_dpo, whose pair
selection and β couple the batch) and grpo (`method: dapo`, dynamic sampling with refill) each run under
`accelerate launch` on 2 CPU processes (gloo) and as 1 process with the same global batch; the first steps' logged
loss, gradient norm, rewards and advantage statistics must agree, and the run directory must have exactly one
writer. HF sampling draws from one random stream per process, so for grpo a deterministic stand-in for `generate`
(tests/launch_hooks/sitecustomize.py) gives both runs the same completions; everything postrain adds after
generation is then compared exactly.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from postrain.errors import RecipeError
from postrain.launch.launcher import SHIPPED_CONFIGS, accelerate_arguments, config_file, worker_command
from postrain.launch.memory import count_parameters, training_memory
from tests.conftest import REPO, TINY, read_jsonl, write_recipe

HOOKS = REPO / "tests" / "launch_hooks"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def section(**kw) -> dict:
    from dataclasses import asdict

    from postrain.recipes.schema import LaunchSpec

    return {**asdict(LaunchSpec()), **kw}


# --- the shipped configurations -------------------------------------------------------------------------------------

EXPECTED = {  # what accelerate makes of each file: (deepspeed, fsdp, multi_gpu, zero stage, fsdp version, offload)
    "ddp": (False, False, True, None, None, False),
    "fsdp2": (False, True, False, None, 2, False),
    "fsdp2_offload": (False, True, False, None, 2, True),
    "zero2": (True, False, False, 2, None, False),
    "zero3": (True, False, False, 3, None, False),
    "zero3_offload": (True, False, False, 3, None, True),
}


def test_every_shipped_config_is_tested():
    assert set(EXPECTED) == set(SHIPPED_CONFIGS)
    assert {p.stem for p in config_file(section(config="ddp")).parent.glob("*.yaml")} == set(SHIPPED_CONFIGS)


@pytest.mark.parametrize("name", SHIPPED_CONFIGS)
def test_shipped_config_loads_and_passes_accelerates_validation(name):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    load_config_from_file(str(config_file(section(config=name))))  # the installed accelerate reads the file
    launch = section(config=name, num_processes=4, num_machines=2, machine_rank=1, main_process_ip="10.1.2.3")
    parsed = launch_command_parser().parse_args(accelerate_arguments(launch) + worker_command(["sft", "x.yaml"]))
    args, _, _ = _validate_launch_command(parsed)  # what `accelerate launch` runs before launching
    deepspeed, fsdp, multi_gpu, stage, version, offload = EXPECTED[name]
    assert (args.use_deepspeed, args.use_fsdp, args.multi_gpu) == (deepspeed, fsdp, multi_gpu)
    # the layout comes from the launch section, not the file (accelerate counts processes over all machines)
    assert (args.num_processes, args.num_machines, args.machine_rank) == (8, 2, 1)
    assert args.main_process_ip == "10.1.2.3" and args.mixed_precision == "no"
    if deepspeed:
        assert int(args.zero_stage) == stage
        assert (args.offload_optimizer_device == "cpu") == offload == (args.offload_param_device == "cpu")
    if fsdp:
        assert int(args.fsdp_version) == version and str(args.fsdp_offload_params).lower() == str(offload).lower()
    assert args.module and args.training_script == "postrain.cli" and args.training_script_args == ["sft", "x.yaml"]


# --- memory arithmetic ----------------------------------------------------------------------------------------------

def test_deepspeed_memory_matches_the_zero_papers_figure_1():
    """ZeRO (arXiv 1910.02054) Figure 1: a 7.5B model on 64 GPUs with mixed-precision Adam (K = 12) needs 120 GB per
    device unsharded, 16.6 GB with optimizer state and gradients partitioned (P_os+g, stage 2), 1.9 GB with the
    parameters too (P_os+g+p, stage 3)."""
    psi = 7.5e9

    def total(strategy):
        return training_memory(int(psi), int(psi), strategy=strategy, processes=64, weight_bytes=2,
                               mixed_precision=True).device_total / 1e9

    assert training_memory(int(psi), int(psi), strategy="zero2", processes=1, weight_bytes=2,
                           mixed_precision=True).device_total / 1e9 == pytest.approx(120.0)
    assert total("zero2") == pytest.approx(16.6, abs=0.05)
    assert total("zero3") == pytest.approx(1.875)
    offloaded = training_memory(int(psi), int(psi), strategy="zero3_offload", processes=64, weight_bytes=2,
                                mixed_precision=True)
    assert offloaded.device_total == 0 and offloaded.cpu_offloaded / 1e9 == pytest.approx(1.875)


def test_torch_memory_keeps_the_weights_dtype_and_lora_trains_few_parameters():
    # ddp: weights, gradients and AdamW's two moments all in the weights' dtype (4 bytes each in float32)
    full = training_memory(1000, 1000, strategy="ddp", processes=8, weight_bytes=4, mixed_precision=False)
    assert (full.weights, full.gradients, full.optimizer) == (4000, 4000, 8000)
    sharded = training_memory(1000, 10, strategy="fsdp2", processes=8, weight_bytes=2, mixed_precision=True,
                              reference_parameters=1000)
    assert (sharded.weights, sharded.gradients, sharded.optimizer, sharded.reference) == (250, 2.5, 5, 250)


def test_parameter_count_on_the_meta_device_equals_the_loaded_model_and_lora_count_is_by_hand():
    from postrain.launch.memory import model_config
    from postrain.models.loading import load_model

    spec = {"name_or_path": "tiny", "tiny": TINY, "dtype": "float32"}
    model, _, _ = load_model(spec)
    config = model_config(spec)
    assert count_parameters(config) == (sum(p.numel() for p in model.parameters()),) * 2
    total, trainable = count_parameters(config, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    hidden, head = TINY["hidden_size"], TINY["hidden_size"] // TINY["num_heads"]
    per_layer = 4 * (hidden + TINY["num_heads"] * head) + 4 * (hidden + TINY["num_kv_heads"] * head)
    assert trainable == per_layer * TINY["num_layers"] and total == sum(p.numel() for p in model.parameters()) \
        + trainable


# --- dry run, options, load-time checks, hash -----------------------------------------------------------------------

def grpo_recipe(tmp_path: Path) -> Path:
    return write_recipe(tmp_path / "grpo.yaml", f"""defaults: [base/grpo]
model: {{name_or_path: tiny, dtype: float32, tiny: {json.dumps(TINY)}}}
data: {{train: {{source: "builtin:arithmetic", task: {{n: 64}}}}}}
rewards: [{{name: exact_match}}]
trainer: {{per_device_train_batch_size: 4, num_generations: 4, max_completion_length: 8}}
""")


def invoke(*args: str):
    from typer.testing import CliRunner

    from postrain.cli import app

    return CliRunner().invoke(app, list(args))


def test_dry_run_prints_the_launch_command_the_batch_and_the_memory_plan(tmp_path):
    recipe = grpo_recipe(tmp_path)
    result = invoke("grpo", str(recipe), "launch.num_processes=8", "launch.config=zero3", "--dry-run")
    assert result.exit_code == 0, result.output
    out = result.output
    command = re.search(r"^  (accelerate launch .*)$", out, re.M).group(1)
    assert command.startswith(f"accelerate launch --config_file {config_file(section(config='zero3'))} "
                              f"--num_processes 8 --num_machines 1 --machine_rank 0 --main_process_port 29500 ")
    assert command.endswith(f"-m postrain.cli grpo {recipe} launch.num_processes=8 launch.config=zero3")
    from postrain.jobs.plan import plan
    from postrain.launch.memory import model_config
    from postrain.jobs import load_recipe

    rows = plan(load_recipe(recipe, ["launch.num_processes=8", "launch.config=zero3"]))
    assert rows["processes"] == "8"
    assert rows["completions per optimizer step"] == "4 per device x 1 accumulation x 8 processes = 32"
    assert rows["generation batch"].startswith("32 completions = 8 prompts x 4")  # TRL's derivation at that size
    # the training state per device: zero3 shards weights (4 bytes), gradients (4) and AdamW (8) over 8 processes
    params = count_parameters(model_config({"name_or_path": "tiny", "tiny": TINY}))[0]
    shown = re.search(r"= ([\d.]+) KB \(zero3 over 8 processes", rows["memory per device (training state)"])
    assert shown and float(shown.group(1)) == pytest.approx(16 * params / 8 / 1e3, rel=1e-2)
    assert not (tmp_path / "runs").exists() and not Path("runs/run").exists()


def test_num_processes_and_launch_config_options_are_the_launch_overrides(tmp_path):
    result = invoke("grpo", str(grpo_recipe(tmp_path)), "--num-processes", "2", "--launch-config", "zero2",
                    "--dry-run")
    assert result.exit_code == 0, result.output
    assert re.search(r"│ processes +│ 2 ", result.output)
    assert "configs/zero2.yaml --num_processes 2" in result.output
    assert "launch.num_processes=2 launch.config=zero2" in result.output  # what the workers are given


def test_one_process_runs_here(tmp_path):
    result = invoke("grpo", str(grpo_recipe(tmp_path)), "--dry-run")
    assert result.exit_code == 0 and "this process (launch.num_processes: 1" in result.output
    assert "accelerate launch" not in result.output


@pytest.mark.parametrize("override,message", [
    ("launch.num_processes=0", r"launch.num_processes \(from command line\) must be at least 1, got 0"),
    ("launch.machine_rank=1", r"launch.machine_rank .* must lie in 0..num_machines - 1 \(0\), got 1"),
    ("launch.num_machines=2", r"launch.main_process_ip .* is required when launch.num_machines > 1"),
    ("launch.main_process_port=70000", r"launch.main_process_port .* must be a TCP port"),
    ("launch.config=zero-3", r"launch.config .* is 'zero-3': neither a shipped configuration .*did you mean 'zero3'"),
    ("launch.nprocs=2", r"unknown key 'launch.nprocs'"),
])
def test_bad_launch_sections_fail_at_load_time(tmp_path, override, message):
    from postrain.jobs import load_recipe

    with pytest.raises(RecipeError, match=message):
        load_recipe(grpo_recipe(tmp_path), [override])


def test_a_config_file_of_ones_own_is_read_relative_to_the_recipe(tmp_path):
    from postrain.launch.launcher import sharding_strategy
    from postrain.jobs import load_recipe

    (tmp_path / "mine.yaml").write_text("distributed_type: DEEPSPEED\ndeepspeed_config: {zero_stage: 3}\n")
    write_recipe(tmp_path / "r.yaml", "defaults: [base/grpo]\nlaunch: {num_processes: 2, config: mine.yaml}\n")
    recipe = load_recipe(tmp_path / "r.yaml")
    launch = recipe.cfg["launch"]
    assert config_file(launch, recipe.origins) == (tmp_path / "mine.yaml").resolve()
    assert sharding_strategy(launch, recipe.origins) == "zero3"


def test_the_recipe_hash_counts_the_process_layout_not_where_it_runs(tmp_path):
    from postrain.jobs import load_recipe
    from postrain.recipes.loader import recipe_hash

    recipe = grpo_recipe(tmp_path)
    one = load_recipe(recipe)
    assert one.hash == recipe_hash({k: v for k, v in one.cfg.items() if k != "launch"})  # older runs keep theirs
    two = load_recipe(recipe, ["launch.num_processes=2"])
    assert two.hash != one.hash
    elsewhere = load_recipe(recipe, ["launch.num_processes=2", "launch.num_machines=2", "launch.machine_rank=1",
                                     "launch.main_process_ip=10.0.0.1"])
    assert elsewhere.hash == load_recipe(recipe, ["launch.num_processes=2", "launch.num_machines=2",
                                                  "launch.main_process_ip=10.0.0.2"]).hash


def test_smoke_runs_one_process_unless_overridden(tmp_path):
    from postrain.jobs import load_smoke_recipe

    recipe = write_recipe(tmp_path / "r.yaml", "defaults: [base/grpo]\nlaunch: {num_processes: 8, config: zero3}\n")
    smoke = load_smoke_recipe(recipe).cfg["launch"]
    assert (smoke["num_processes"], smoke["config"]) == (1, None)  # a paper's 8 GPUs: the smoke run is one process
    assert load_smoke_recipe(recipe, ["launch.num_processes=2"]).cfg["launch"]["num_processes"] == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without GPUs")
@pytest.mark.parametrize("config", ["fsdp2", "zero2"])
def test_a_sharded_config_without_gpus_is_refused_before_anything_starts(tmp_path, config):
    result = invoke("grpo", str(grpo_recipe(tmp_path)), f"output_dir={tmp_path / 'run'}", "--launch-config", config)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "accelerate sets up on GPUs only, and this machine has none" in " ".join(result.output.split())
    assert not (tmp_path / "run").exists()


# --- preference losses coupled through the batch, split over processes ----------------------------------------------

def split_batch(n: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: -torch.rand(n, generator=g) * 20 for k in ("chosen_logps", "rejected_logps", "ref_chosen_logps",
                                                          "ref_rejected_logps")}


def test_beta_dpo_with_the_gathered_statistics_gives_the_whole_batchs_loss_when_split():
    from postrain.preference import PREFERENCE

    data = split_batch(8, 0)
    mask = torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 1])  # uneven: 2 kept on the first process, 4 on the second
    margins = (data["chosen_logps"] - data["ref_chosen_logps"]) - (data["rejected_logps"] - data["ref_rejected_logps"])
    state = {"margin_ema_mean": torch.tensor(0.3), "margin_ema_std": torch.tensor(2.0)}
    whole = PREFERENCE.call("beta_dpo", {**data, **state, "selection_mask": mask}, {}).mean()
    # the paper's masked average with β_b from the mean margin of the selected pairs (written out here)
    beta_b = 0.1 * (1 + 0.6 * ((margins * mask).sum() / mask.sum() - 0.3))
    assert whole.item() == pytest.approx((mask * -torch.nn.functional.logsigmoid(beta_b * margins)).sum().item()
                                         / mask.sum().item(), rel=1e-6)
    gathered = {"selected_margin_mean": (margins * mask).sum() / mask.sum(), "selected_fraction": mask.mean()}
    halves = [PREFERENCE.call("beta_dpo", {**{k: v[s] for k, v in data.items()}, **state, "selection_mask": mask[s],
                                           **gathered}, {}).mean() for s in (slice(0, 4), slice(4, 8))]
    assert (sum(halves) / 2).item() == pytest.approx(whole.item(), rel=1e-6)  # DDP averages the processes
    alone = [PREFERENCE.call("beta_dpo", {**{k: v[s] for k, v in data.items()}, **state, "selection_mask": mask[s]},
                             {}).mean() for s in (slice(0, 4), slice(4, 8))]
    assert (sum(alone) / 2).item() != pytest.approx(whole.item(), rel=1e-3)  # without them it would differ


def test_group_robust_po_with_the_gathered_group_counts_gives_the_whole_batchs_loss_when_split():
    from postrain.preference import PREFERENCE

    data = split_batch(8, 1)
    groups = torch.tensor([0, 0, 1, 0, 1, 1, 1, 2])
    weights = torch.tensor([0.2, 0.5, 0.3])
    whole = PREFERENCE.call("group_robust_po", {**data, "group_ids": groups, "group_weights": weights},
                            {"ipo": False}).mean()
    counts = torch.bincount(groups, minlength=3)
    halves = [PREFERENCE.call("group_robust_po", {**{k: v[s] for k, v in data.items()}, "group_ids": groups[s],
                                                  "group_weights": weights, "group_counts": counts},
                              {"ipo": False}).mean() for s in (slice(0, 4), slice(4, 8))]
    assert (sum(halves) / 2).item() == pytest.approx(whole.item(), rel=1e-6)


# --- end to end under accelerate launch -----------------------------------------------------------------------------

FAKE_GROUP = 2  # the smoke layer's num_generations
REWARD = '''def text(c):
    return c if isinstance(c, str) else c[-1]["content"]


def has_a(completions, **kwargs):
    return [1.0 if "A" in text(c) else 0.0 for c in completions]


def fails_on_odd_lengths(completions, **kwargs):  # scored as failed and counted under reward_errors.policy: score
    if any(len(text(c)) % 2 for c in completions):
        raise ValueError("odd")
    return [0.0 for _ in completions]
'''
FAILING_REWARD = '''import os
def fails_on_rank_1(completions, **kwargs):
    if os.environ.get("RANK") == "1":
        raise ValueError("rank 1 cannot score")
    return [0.0 for _ in completions]
'''


def run_cli(cwd: Path, *args: str, fake_generation: bool = False) -> tuple[subprocess.CompletedProcess, tuple]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *([str(HOOKS)] if fake_generation else []),
                                                        os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    env.pop("POSTRAIN_TEST_FAKE_GENERATION", None)
    if fake_generation:
        env["POSTRAIN_TEST_FAKE_GENERATION"] = str(FAKE_GROUP)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "POSTRAIN_LAUNCHED"):  # this is no worker
        env.pop(key, None)
    start = time.time()
    result = subprocess.run([sys.executable, "-m", "postrain.cli", *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=600)
    return result, (start, time.time())


def two_processes() -> list[str]:
    return ["launch.num_processes=2", f"launch.main_process_port={free_port()}"]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Each job once as 1 process (per-device batch 8) and once on 2 processes (4 each): the same global batch."""
    root = tmp_path_factory.mktemp("launch")
    (root / "reward.py").write_text(REWARD)
    (root / "failing.py").write_text(FAILING_REWARD)
    papers = REPO / "recipes" / "papers"
    jobs = {
        "sft": ("sft", str(REPO / "recipes" / "demo" / "sft.yaml"), []),
        # a reference other than the policy: margins differ from 0 at the first step, so the selection matters
        "dpo": ("dpo", str(papers / "beta_dpo.yaml"), ["ref_model.name_or_path=tiny", "ref_model.tiny.seed=7"]),
        "grpo": ("grpo", str(papers / "dapo.yaml"), [f"rewards=[{{fn: {root / 'reward.py'}:has_a}}, "
                                                     f"{{fn: {root / 'reward.py'}:fails_on_odd_lengths, weight: 0.0}}]"]),
    }
    out = {}
    for job, (command, recipe, extra) in jobs.items():
        for n in (1, 2):
            args = [command, recipe, "--smoke", f"name={job}{n}", f"trainer.per_device_train_batch_size={8 // n}",
                    *extra, *(two_processes() if n == 2 else [])]
            if job == "sft" and n == 2:  # through a pipeline stage with its own launch
                pipeline = write_recipe(root / "pipeline.yaml", f"""command: pipeline
name: pipe
stages:
  train: {{command: sft, recipe: {recipe}, overrides: {{trainer.per_device_train_batch_size: 4,
          launch.num_processes: 2, launch.main_process_port: {free_port()}}}}}
""")
                args = ["run", str(pipeline), "--smoke"]
            result, span = run_cli(root, *args, fake_generation=job == "grpo")
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
            run_dir = root / "runs" / ("pipe/train" if job == "sft" and n == 2 else f"{job}{n}")
            out[job, n] = {"dir": run_dir, "span": span, "metrics": read_jsonl(run_dir / "metrics.jsonl"),
                           "status": json.loads((run_dir / "status.json").read_text()), "output": result.stdout}
    result, _ = run_cli(root, "grpo", str(papers / "dapo.yaml"), "--smoke", "name=failing",
                        f"rewards=[{{fn: {root / 'failing.py'}:fails_on_rank_1}}]", "reward_errors.policy=fail",
                        *two_processes())
    out["failure"] = {"result": result, "dir": root / "runs" / "failing"}
    return out


COMPARED = {
    "sft": ("loss", "grad_norm", "mean_token_accuracy", "num_tokens"),
    "dpo": ("loss", "grad_norm", "beta_dpo/beta", "beta_dpo/margin_ema_mean", "beta_dpo/margin_ema_std",
            "rewards/margins", "logps/chosen"),
    "grpo": ("loss", "grad_norm", "reward", "rl/advantages/mean", "rl/advantages/std", "rl/advantages/min",
             "rl/advantages/max", "rl/sampler/gen_batches", "rl/sampler/dynamic_sampling/kept_groups",
             "rewards/fails_on_odd_lengths/errors"),  # each process counts its own: the sum is logged
}


@pytest.mark.slow
@pytest.mark.xdist_group("launch")
@pytest.mark.parametrize("job", list(COMPARED))
def test_two_processes_give_the_first_steps_of_one(launched, job):
    one, two = launched[job, 1], launched[job, 2]
    first_one, first_two = one["metrics"][0], two["metrics"][0]
    assert first_one["step"] == first_two["step"] == 1
    for key in COMPARED[job]:
        assert first_two[key] == pytest.approx(first_one[key], rel=1e-5, abs=1e-7), key
    if job == "grpo":  # the refill ran, the groups it kept have a spread of rewards, and some scoring failed
        assert first_one["rl/sampler/gen_batches"] >= 2 and first_one["rl/advantages/std"] > 0
        assert first_one["rewards/fails_on_odd_lengths/errors"] > 0
    if job == "dpo":
        assert first_one["rewards/margins"] != 0 and first_one["grad_norm"] > 0


@pytest.mark.slow
@pytest.mark.xdist_group("launch")
@pytest.mark.parametrize("job", list(COMPARED))
def test_the_run_directory_has_one_writer(launched, job):
    one, two = launched[job, 1], launched[job, 2]
    steps = [m["step"] for m in two["metrics"] if "loss" in m]
    assert steps == [m["step"] for m in one["metrics"] if "loss" in m] == [1, 2]  # one line per step
    assert len(two["metrics"]) == len(one["metrics"])
    status = two["status"]
    assert status["status"] == "done" and status["processes"] == 2 and one["status"]["processes"] == 1
    assert status["distributed_type"] == "MULTI_CPU" and one["status"]["distributed_type"] == "NO"
    # the true wall time: from the command's start (a pipeline stage's: the stage's) to the end of the run, after the
    # model was written, not one worker's share of it
    started = two["status"]["started"]
    ended = started + two["status"]["wall_time_s"]
    begin, end = two["span"]
    model_written = (two["dir"] / "model" / "model.safetensors").stat().st_mtime
    assert begin <= started and model_written <= ended + 0.02 <= end, (job, two["status"], two["span"], model_written)
    assert json.loads((two["dir"] / "env.json").read_text())["processes"] == 2
    assert (two["dir"] / "model" / "model.safetensors").is_file()
    assert two["output"].count("done:") == 1  # the calling process says it once


@pytest.mark.slow
@pytest.mark.xdist_group("launch")
def test_an_error_on_one_rank_stops_the_launch_with_that_ranks_message(launched):
    result, run_dir = launched["failure"]["result"], launched["failure"]["dir"]
    assert result.returncode == 2
    assert "error: rank 1 of 2: reward 'fails_on_rank_1' raised ValueError: rank 1 cannot score" in \
        " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed" and "rank 1 of 2" in status["error"]


# --- vLLM -----------------------------------------------------------------------------------------------------------

def vllm_recipe(tmp_path: Path, mode: str = "server") -> Path:
    return write_recipe(tmp_path / "vllm.yaml", f"""defaults: [base/grpo]
model: {{name_or_path: tiny, tiny: {json.dumps(TINY)}}}
data: {{train: {{source: "builtin:arithmetic", task: {{n: 16}}}}}}
trainer: {{use_vllm: true, vllm_mode: {mode}, vllm_server_port: 8011, vllm_tensor_parallel_size: 2,
          vllm_gpu_memory_utilization: 0.5, vllm_max_model_length: 512}}
""")


def test_vllm_serve_dry_run_is_trls_server_command_for_the_recipes_model_and_settings(tmp_path):
    from postrain.models.loading import resolve_model_path

    result = invoke("vllm-serve", str(vllm_recipe(tmp_path)), "--dry-run", "--vllm-args", "--enforce-eager")
    assert result.exit_code == 0, result.output
    words = result.output.split()
    assert words[:4] == ["VLLM_SERVER_DEV_MODE=1", "vllm", "serve", resolve_model_path("tiny", TINY)]
    pairs = {words[i]: words[i + 1] for i in range(len(words) - 1) if words[i].startswith("--")}
    assert (pairs["--port"], pairs["--tensor-parallel-size"], pairs["--gpu-memory-utilization"],
            pairs["--max-model-len"]) == ("8011", "2", "0.5", "512")
    assert pairs["--logprobs-mode"] == "processed_logprobs"  # TRL's: the log-probs its correction reads
    assert words[-1] == "--enforce-eager"


def test_vllm_serve_refuses_a_recipe_that_does_not_generate_with_a_server(tmp_path):
    result = invoke("vllm-serve", str(vllm_recipe(tmp_path, mode="colocate")), "--dry-run")
    assert result.exit_code == 2
    assert "set trainer.use_vllm=true and trainer.vllm_mode=server" in " ".join(result.output.split())


@pytest.mark.skipif(__import__("importlib.util").util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_a_recipe_that_generates_with_vllm_says_what_to_install_before_anything_is_written(tmp_path):
    recipe = vllm_recipe(tmp_path, mode="colocate")
    for args in (["grpo", str(recipe), f"output_dir={tmp_path / 'run'}"], ["grpo", str(recipe), "--dry-run"],
                 ["vllm-serve", str(vllm_recipe(tmp_path))]):
        result = invoke(*args)
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert "not installed: pip install 'postrain[vllm]'" in " ".join(result.output.split())
    assert not (tmp_path / "run").exists()


SIGTERM_ON_RANK_1 = '''import os, signal
from pathlib import Path


def stop_on_rank_1(completions, **kwargs):
    """Rank 1 alone sends its training process SIGTERM while scoring its second batch (once: a marker file)."""
    marker = Path(os.environ["MARKER"])
    calls = Path(os.environ["MARKER"] + f".rank{os.environ['RANK']}")
    count = int(calls.read_text()) + 1 if calls.exists() else 1
    calls.write_text(str(count))
    if os.environ["RANK"] == "1" and count == 2 and not marker.exists():
        marker.write_text("sent")
        # a reward runs in its own worker process (postrain.rewards.worker): the training process is its parent
        os.kill(os.getppid(), signal.SIGTERM)
    return [0.0 for _ in completions]
'''


@pytest.mark.slow
@pytest.mark.xdist_group("launch")
def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step_with_a_checkpoint(tmp_path):
    """The processes agree at each step's end: rank 1's signal stops rank 0 too, after the same step, and the main
    process saves the checkpoint and marks the run interrupted; the calling process says so and exits 143."""
    (tmp_path / "stop.py").write_text(SIGTERM_ON_RANK_1)
    os.environ["MARKER"] = str(tmp_path / "sent")
    try:
        result, _ = run_cli(tmp_path, "grpo", str(REPO / "recipes" / "papers" / "dapo.yaml"), "--smoke", "name=stopped",
                            f"rewards=[{{fn: {tmp_path / 'stop.py'}:stop_on_rank_1}}]", "trainer.max_steps=4",
                            *two_processes(), fake_generation=True)
    finally:
        del os.environ["MARKER"]
    assert result.returncode == 143, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "stopped"
    status = json.loads((run_dir / "status.json").read_text())
    assert (status["status"], status["signal"]) == ("interrupted", "SIGTERM"), status
    step = status["step"]
    assert 1 <= step < 4 and status["checkpoint"] == f"checkpoint-{step}"
    checkpoint = run_dir / "checkpoints" / f"checkpoint-{step}"
    from postrain.jobs.rundir import checkpoint_problem

    assert checkpoint_problem(checkpoint) is None
    assert {p.name for p in checkpoint.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl") if "loss" in m] == list(range(1, step + 1))
    assert f"stopped: interrupted by SIGTERM at step {step}" in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr
