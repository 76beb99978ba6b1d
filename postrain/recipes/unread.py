"""Recipe keys that are set but never read, given the rest of the recipe: reported as warnings when it loads.

A key the schema accepts can still be ignored by the run: `task:` on a source that is a file, `tiny:` on a model
that is not the tiny one, `trainer.save_steps` while nothing is saved, a sampling temperature under greedy
decoding. Such a key usually means the recipe does not do what its author thinks. Each rule below names a key
pattern and the condition under which nothing reads it, from the code that reads it. Only keys the recipe file
itself or the command line set are reported (not the base recipes of `defaults:`, which serve many recipes, nor
built-in defaults or the --smoke layer).

A key the job consumes wholesale (the `trainer:` and `peft:` sections go to TRL's and peft's configs, `merge:` to
mergekit) is read by definition; within them, the rules cover the options TRL's Trainer reads only under another
option. The rules are the conditional reads known to postrain, not a trace of what the run touched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

# Layers whose keys are not the user's: the schema's defaults and the --smoke layers.
NOT_USER = ("built-in defaults", "--smoke", "--smoke (data)")
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def _get(cfg: dict, path: str) -> Any:
    node: Any = cfg
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _sources(cfg: dict) -> list[tuple[str, dict]]:
    """Every data source of a recipe with its key path."""
    found = []
    for split in ("train", "eval"):
        spec = (cfg.get("data") or {}).get(split)
        if isinstance(spec, dict):
            found.append((f"data.{split}", spec))
            if isinstance(spec.get("mix"), dict):
                found.append((f"data.{split}.mix", spec["mix"]))
    for name, spec in (cfg.get("sets") or {}).items():
        if isinstance(spec, dict):
            found.append((f"sets.{name}", spec))
    for name, spec in ((cfg.get("eval_during_training") or {}).get("sets") or {}).items():
        if isinstance(spec, dict):
            found.append((f"eval_during_training.sets.{name}", spec))
    return found


def _models(cfg: dict) -> list[tuple[str, dict]]:
    found = [(key, cfg[key]) for key in ("model", "ref_model") if isinstance(cfg.get(key), dict)]
    found += [(f"logp_models.{name}", spec) for name, spec in (cfg.get("logp_models") or {}).items()
              if isinstance(spec, dict)]
    return found


def _generation_blocks(cfg: dict) -> list[tuple[str, dict]]:
    found = [(key, _get(cfg, key)) for key in ("generation", "eval_during_training.generation")]
    found += [(f"sets.{name}.generation", (spec or {}).get("generation")) for name, spec in
              (cfg.get("sets") or {}).items()]
    return [(key, block) for key, block in found if isinstance(block, dict)]


def _is_local_file(source: Any) -> bool:
    return isinstance(source, str) and (Path(source).suffix in FILE_SUFFIXES or Path(source).expanduser().exists())


Finding = tuple[str, str]  # (key path, why nothing reads it)


def _source_rules(cfg: dict) -> list[Finding]:
    out = []
    for path, spec in _sources(cfg):
        source = spec.get("source")
        builtin = isinstance(source, str) and source.startswith("builtin:")
        if "task" in spec and spec["task"] and source is not None and not builtin:
            out.append((f"{path}.task", f"{path}.source is {source!r}; task parameters are read by built-in tasks "
                                        f"only (postrain.data.tasks)"))
        if spec.get("config") is not None and (builtin or _is_local_file(source)):
            out.append((f"{path}.config", "a dataset config is read for hub datasets only"))
        if spec.get("split", "train") != "train" and _is_local_file(source) and Path(str(source)).suffix != ".json":
            # (`split: train`, the default, is harmless; another split suggests rows the file does not hold apart)
            out.append((f"{path}.split", f"{Path(str(source)).suffix} files have one split, all of whose rows "
                                         f"are read (a .json file may map split -> rows)"))
    return out


def _model_rules(cfg: dict) -> list[Finding]:
    out = []
    for path, spec in _models(cfg):
        name = spec.get("name_or_path")
        if "tiny" in spec and name is not None and name != "tiny":
            out.append((f"{path}.tiny", f"{path}.name_or_path is {name!r}; tiny: sizes the embedded tiny model "
                                        f"only"))
        if spec.get("revision") is not None and (name == "tiny" or
                                                 (isinstance(name, str) and Path(name).expanduser().exists())):
            out.append((f"{path}.revision", f"{path}.name_or_path is local; a revision is read for hub models "
                                            f"only"))
    return out


def _reward_rules(cfg: dict) -> list[Finding]:
    out = []
    for path in ("reward_errors", "eval_during_training.reward_errors"):
        section = _get(cfg, path)
        if isinstance(section, dict) and section.get("policy", "fail") == "fail":
            for key in ("score", "completion_timeout"):
                if key in section:
                    out.append((f"{path}.{key}", f"{path}.policy is fail: failed completions stop the run, none is "
                                                 f"scored or retried one at a time (postrain.rewards.build)"))
    return out


def _trainer_rules(cfg: dict) -> list[Finding]:
    """transformers' Trainer reads these only under another option (TrainingArguments and Trainer.train)."""
    trainer = cfg.get("trainer") if isinstance(cfg.get("trainer"), dict) else {}
    out = []

    def strategy(key: str, default: str = "steps") -> str:
        value = trainer.get(key, default)
        return str(value).lower()

    if "save_steps" in trainer and strategy("save_strategy") != "steps":
        out.append(("trainer.save_steps", f"trainer.save_strategy is {trainer.get('save_strategy')!r}: save_steps "
                                          f"is read under save_strategy: steps only"))
    if "save_total_limit" in trainer and strategy("save_strategy") == "no":
        out.append(("trainer.save_total_limit", "trainer.save_strategy is 'no': no checkpoint is saved"))
    if "eval_steps" in trainer and strategy("eval_strategy", "no") != "steps":
        out.append(("trainer.eval_steps", f"trainer.eval_strategy is {trainer.get('eval_strategy', 'no')!r}: "
                                          f"eval_steps is read under eval_strategy: steps only"))
    if "logging_steps" in trainer and strategy("logging_strategy") != "steps":
        out.append(("trainer.logging_steps", f"trainer.logging_strategy is {trainer.get('logging_strategy')!r}: "
                                             f"logging_steps is read under logging_strategy: steps only"))
    max_steps = trainer.get("max_steps")
    if "num_train_epochs" in trainer and isinstance(max_steps, int) and max_steps > 0:
        out.append(("trainer.num_train_epochs", f"trainer.max_steps is {max_steps}: it sets the length of training "
                                                f"and num_train_epochs is not read"))
    return out


def _generation_rules(cfg: dict) -> list[Finding]:
    """Greedy decoding (do_sample false) reads no sampling setting (postrain.jobs.evaluate.generate)."""
    out = []
    top = cfg.get("generation") if isinstance(cfg.get("generation"), dict) else {}
    for path, block in _generation_blocks(cfg):
        sampled = block.get("do_sample", top.get("do_sample") if path.startswith("sets.") else None)
        if sampled is False:
            out += [(f"{path}.{key}", f"{path}.do_sample is false: greedy decoding reads no {key}")
                    for key in ("temperature", "top_p", "top_k") if key in block]
    return out


def _hub_rules(cfg: dict) -> list[Finding]:
    hub = cfg.get("hub")
    if not isinstance(hub, dict) or hub.get("repo_id") is not None:
        return []
    return [(f"hub.{key}", "hub.repo_id is null: nothing is pushed (postrain.jobs.hub)")
            for key in ("private", "revision", "commit_message") if key in hub]


def _launch_rules(cfg: dict) -> list[Finding]:
    launch = cfg.get("launch")
    if not isinstance(launch, dict) or (launch.get("num_machines") or 1) > 1:
        return []
    return [(f"launch.{key}", "launch.num_machines is 1: it is read for multi-node launches only")
            for key in ("main_process_ip", "machine_rank") if key in launch]


def _eval_backend_rules(cfg: dict) -> list[Finding]:
    if cfg.get("command") != "eval":
        return []
    backend = (cfg.get("eval") or {}).get("backend", "postrain")
    if backend == "postrain" and cfg.get("lm_eval") is not None:
        return [("lm_eval", "eval.backend is postrain: the lm_eval section is read by eval.backend: lm_eval only")]
    if backend == "lm_eval":
        return [(key, f"eval.backend is lm_eval: lm-eval scores its tasks with their own metrics; {key} is read by "
                      f"the postrain backend") for key in ("sets", "rewards", "metrics") if cfg.get(key)]
    return []


RULES: list[Callable[[dict], list[Finding]]] = [_source_rules, _model_rules, _reward_rules, _trainer_rules,
                                                _generation_rules, _hub_rules, _launch_rules, _eval_backend_rules]


def unread_keys(command: str, cfg: dict, origins: dict[str, str], own: tuple[str, ...]) -> list[str]:
    """Warnings, one per key that nothing reads given the rest of the recipe, among those set by the layers in
    `own` (the recipe file itself and the command line: not the base recipes its `defaults:` inherit, which
    serve many recipes, nor the built-in defaults or the --smoke layer)."""
    cfg = {**cfg, "command": command}
    warnings, seen = [], set()
    for rule in RULES:
        for path, why in rule(cfg):
            origin = origins.get(path)
            if origin not in own or origin in NOT_USER or path in seen:
                continue
            seen.add(path)
            warnings.append(f"{path} (from {origin}) is set but never read: {why}")
    return warnings

