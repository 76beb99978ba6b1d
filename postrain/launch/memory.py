"""The memory a launch will need per device: the training state (weights, gradients, optimizer state) under the
chosen sharding, from the model's size read from its config (no weights are loaded: the model is built on the
meta device and its parameters counted).

Bytes per parameter, as each engine keeps them (Rajbhandari et al. 2020, "ZeRO", arXiv 1910.02054, sec. 3 and 5):
  torch (ddp, fsdp2)            weights w, gradients w, AdamW's two moments 2w, where w is the bytes of the dtype
                                the weights are loaded in (autocast computes in bf16 but keeps that dtype)
  DeepSpeed in bf16 / fp16      weights 2, gradients 2, optimizer state 12: an fp32 master copy and two fp32
                                moments (the paper's K = 12)
  DeepSpeed in fp32             weights 4, gradients 4, optimizer state 8
Gradients and optimizer state count trainable parameters only (LoRA: the adapters). Sharding divides by the number
of processes: `zero2` the gradients and optimizer state, `zero3` and `fsdp2` all three; the `_offload` variants
keep the optimizer state (and the weights) in CPU memory instead. A frozen reference model holds weights only, sharded
as the policy's under zero3 / fsdp2 and a full copy per device otherwise; with LoRA the reference is the base model
with adapters disabled and costs nothing more. Activations, the KV cache of generation, a colocated vLLM engine,
temporary buffers and the CUDA context come on top: the figures are a floor, not a forecast.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from postrain.errors import PostrainError
from postrain.models.packaged import MARKER, converted_dir, gguf_file, is_packaged
from postrain.models.tiny import TinyModelSpec, build_tokenizer, is_tiny, tiny_config
from postrain.recipes.sections import rl_parts
from postrain.rl.section import reference_beta

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
DEEPSPEED = ("zero2", "zero3", "zero3_offload")
SHARDS_WEIGHTS = ("zero3", "zero3_offload", "fsdp2", "fsdp2_offload")
SHARDS_GRADIENTS = ("zero2", *SHARDS_WEIGHTS)
OFFLOADS_OPTIMIZER = ("zero3_offload", "fsdp2_offload")
OFFLOADS_WEIGHTS = ("zero3_offload", "fsdp2_offload")


@dataclass(frozen=True)
class TrainingMemory:
    """Bytes per device (GPU) and per process in CPU memory (what is offloaded there)."""

    weights: float
    gradients: float
    optimizer: float
    reference: float
    cpu_offloaded: float

    @property
    def device_total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.reference


def training_memory(parameters: int, trainable: int, *, strategy: str, processes: int, weight_bytes: int,
                    mixed_precision: bool, reference_parameters: int = 0, moment_bytes: int | None = None
                    ) -> TrainingMemory:
    """Per-device bytes of a training state under `strategy` (ddp, fsdp2, fsdp2_offload, zero2, zero3,
    zero3_offload) over `processes` processes. `moment_bytes`: bytes of one optimizer moment where the optimizer
    keeps them in another precision than the weights (8-bit AdamW: 1); None: as the engine does."""
    if strategy in DEEPSPEED:
        w = g = 2 if mixed_precision else 4
        opt = (4 + 2 * (moment_bytes or 4)) if mixed_precision else 2 * (moment_bytes or 4)
    else:
        w = g = weight_bytes
        opt = 2 * (moment_bytes or weight_bytes)
    n = max(1, processes)
    weights = parameters * w / (n if strategy in SHARDS_WEIGHTS else 1)
    gradients = trainable * g / (n if strategy in SHARDS_GRADIENTS else 1)
    optimizer = trainable * opt / (n if strategy in SHARDS_GRADIENTS else 1)
    reference = reference_parameters * w / (n if strategy in SHARDS_WEIGHTS else 1)
    cpu = 0.0
    if strategy in OFFLOADS_OPTIMIZER:
        cpu += optimizer
        optimizer = 0.0
    if strategy in OFFLOADS_WEIGHTS:
        cpu += weights + gradients + reference
        weights = gradients = reference = 0.0
    return TrainingMemory(weights, gradients, optimizer, reference, cpu)


def count_parameters(config, peft: dict[str, Any] | None = None) -> tuple[int, int]:
    """(all parameters, trainable parameters) of the causal LM a transformers config describes, built on the meta
    device (no memory, no weights read); trainable counts LoRA's adapters when `peft` is given."""
    # slow: torch and transformers, only when a recipe's memory is estimated
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        total = sum(p.numel() for p in model.parameters())  # tied embeddings are one parameter
        if not peft:
            return total, total
        # optional: peft
        from peft import LoraConfig, get_peft_model

        lora = get_peft_model(model, LoraConfig(**{"task_type": "CAUSAL_LM", **peft}))
        trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    return total + trainable, trainable


def model_config(spec: dict[str, Any]):
    """The transformers config of a ModelSpec without loading weights or converting anything, or a string saying
    why it cannot be read here (a hub model not in the local Hugging Face cache)."""

    # slow: transformers, only when a recipe's memory is estimated
    from transformers import AutoConfig

    ref = spec["name_or_path"]
    if is_tiny(ref):
        return tiny_config(build_tokenizer(), {**TinyModelSpec().__dict__, **(spec.get("tiny") or {})})
    try:
        if is_packaged(ref):
            out = converted_dir(ref)
            if (out / MARKER).is_file():
                return AutoConfig.from_pretrained(out)
            source = gguf_file(ref)
            return AutoConfig.from_pretrained(source.parent, gguf_file=source.name)
        path = Path(ref).expanduser()
        if (path / "model" / "config.json").is_file():
            path = path / "model"
        if path.exists():
            return AutoConfig.from_pretrained(path, trust_remote_code=spec.get("trust_remote_code", False))
        return AutoConfig.from_pretrained(ref, revision=spec.get("revision"), local_files_only=True,
                                          trust_remote_code=spec.get("trust_remote_code", False))
    except (OSError, ValueError, PostrainError) as e:
        if not Path(ref).expanduser().exists() and not is_packaged(ref):
            return ("its config.json is not in the local Hugging Face cache (`huggingface-cli download "
                    f"{ref} config.json` fetches it)")
        return f"its config could not be read ({str(e).strip()[:200]})"


def weight_dtype(spec: dict[str, Any], config) -> str:
    """The dtype the weights are loaded in: the recipe's `model.dtype`, or with `auto` the checkpoint's own."""
    if spec.get("dtype", "auto") != "auto":
        return spec["dtype"]
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(dtype).replace("torch.", "") if dtype is not None else "float32"
    return name if name in DTYPE_BYTES else "float32"


def human(nbytes: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if nbytes >= size:
            return f"{nbytes / size:.3g} {unit}"
    return f"{nbytes:.0f} B"


def memory_plan(cfg: dict[str, Any], command: str, strategy: str, processes: int, mixed_precision: bool
                ) -> dict[str, str]:
    """`--dry-run`'s lines on the model's size and the training state per device (see the module docstring);
    `mixed_precision`: whether the trainer computes in bf16 / fp16 (its config's bf16 / fp16, as built here)."""
    spec = cfg["model"]
    config = model_config(spec)
    if isinstance(config, str):
        return {"memory per device": f"unknown: the model {spec['name_or_path']!r}: {config}"}
    peft = cfg.get("peft") or None
    parameters, trainable = count_parameters(config, peft)
    dtype = weight_dtype(spec, config)
    trainer = cfg.get("trainer") or {}
    reference = 0
    if not peft and _holds_reference(cfg, command):
        reference = parameters
    optim = str(trainer.get("optim") or "adamw_torch")
    moment = 1 if "8bit" in optim else None
    memory = training_memory(parameters, trainable, strategy=strategy, processes=processes,
                             weight_bytes=DTYPE_BYTES[dtype], mixed_precision=mixed_precision, reference_parameters=reference,
                             moment_bytes=moment)
    lines = {"model parameters": f"{parameters / 1e6:,.1f}M ({'trainable ' + f'{trainable / 1e6:,.2f}M (LoRA)' if peft else 'all trainable'}), "
                                 f"weights in {dtype}"}
    parts = [f"weights {human(memory.weights)}", f"gradients {human(memory.gradients)}",
             f"optimizer state {human(memory.optimizer)}"]
    if reference:
        parts.append(f"reference model {human(memory.reference)}")
    precision = "bf16/fp16 mixed precision" if mixed_precision else "no mixed precision (trainer.bf16 off here)"
    where = f"{strategy} over {processes} process{'es' if processes > 1 else ''}, {precision}"
    lines["memory per device (training state)"] = (f"{' + '.join(parts)} = {human(memory.device_total)} ({where}; "
                                                   f"{'AdamW 8-bit' if moment else 'AdamW'}; activations, generation "
                                                   f"and framework buffers come on top)")
    if memory.cpu_offloaded:
        lines["CPU memory per process (offloaded)"] = human(memory.cpu_offloaded)
    return lines


def _holds_reference(cfg: dict[str, Any], command: str) -> bool:
    """Whether the job keeps a frozen reference model beside the policy: DPO (unless its reference log-probs are
    precomputed or no loss reads them), GRPO when a KL term reads the reference."""
    trainer = cfg.get("trainer") or {}
    if command == "dpo":
        return not trainer.get("precompute_ref_log_probs")
    if command == "grpo":
        if cfg.get("rl") is not None:
            return reference_beta(rl_parts(cfg)) is not None  # the parts parsed when the recipe loaded
        return bool(trainer.get("beta"))
    return False
