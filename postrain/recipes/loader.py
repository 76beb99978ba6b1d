"""Load a recipe: layer, override, interpolate, validate.

Precedence, lowest first:
  1. the command's built-in defaults (postrain.recipes.schema),
  2. the recipes named in the recipe's `defaults:` list, in order, each resolved recursively the same way
     (a path relative to the recipe's own folder, else to the `recipes/` folder; `.yaml` may be left off),
  3. the recipe itself,
  4. command-line overrides (`key=value`, OmegaConf dotlist syntax).
Then `${...}` interpolations resolve, and the result is checked against the command's schema.
Every leaf key remembers which layer set it, so an error can name the file it came from.

This is the recipe vocabulary only: `read_recipe` does not run the commands' own checks (loss types, the `rl:`
parts, the library configs, liveness, ...). Those are each job's (postrain.jobs.loading.load_recipe: read, then
the job's `check`), which is what the command line, pipelines and `postrain recipes --check` call.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from postrain.errors import RecipeError
from postrain.recipes.schema import RECIPE_SCHEMAS, LaunchSpec, RewardErrorPolicy
from postrain.recipes.sections import ParsedSections, sections_of
from postrain.recipes.validate import ConfigClass, OtherKeys, no_other_keys, validate_recipe

BUILTIN = "built-in defaults"


class YamlLoader(yaml.SafeLoader):
    """SafeLoader that reads `1e-6` as a float, as YAML 1.2 and users do (YAML 1.1 wants `1.0e-6`), and refuses a
    key given twice in one mapping (PyYAML keeps the last one silently: a second `trainer:` would drop the first)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges, it is no key
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: SafeLoader's own error says so
                    break
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"found duplicate key {key!r} (first at line {first.line + 1})", key_node.start_mark)
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)
COMMAND_LINE = "command line"


def recipes_root() -> Path:
    """The `recipes/` folder: $POSTRAIN_RECIPES, else ./recipes, else the one beside the installed package."""
    env = os.environ.get("POSTRAIN_RECIPES")
    if env:
        return Path(env)
    cwd = Path.cwd() / "recipes"
    if cwd.is_dir():
        return cwd
    return Path(__file__).resolve().parents[2] / "recipes"


@dataclass
class Recipe:
    """A resolved, validated recipe."""

    command: str
    cfg: dict[str, Any]
    path: Path | None = None
    origins: dict[str, str] = field(default_factory=dict)
    # Method steps that cannot act under the recipe's batch layout (postrain.jobs.liveness), reported at load.
    liveness: list = field(default_factory=list)
    # Keys a recipe file or override sets that nothing reads given the rest of it (postrain.recipes.unread).
    warnings: list[str] = field(default_factory=list)
    # Its `loss:` / `rl:` parsed once, for this cfg object only (postrain.recipes.sections): not an argument, so a
    # Recipe made with another cfg (dataclasses.replace included) never carries the parse of an earlier one.
    sections: ParsedSections = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.sections = sections_of(self.cfg)

    @property
    def hash(self) -> str:
        return recipe_hash(self.cfg)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.cfg, sort_keys=False, default_flow_style=False, allow_unicode=True)

    def save(self, run_dir: Path) -> Path:
        """Write the resolved recipe as `recipe.yaml` (with its hash in a header comment) into `run_dir`."""
        out = Path(run_dir) / "recipe.yaml"
        out.write_text(f"# postrain resolved recipe, hash {self.hash}\n" + self.to_yaml())
        return out


# Top-level keys left out of the hash. `hub:` says where a finished model is published, not what is trained, so a
# changed push target neither makes a pipeline rerun a finished stage nor refuses --resume (schema.HubSpec).
# `health:` changes no step that trains normally, and a run a NaN stopped is resumed with another `nonfinite`
# (schema.HealthSpec); `liveness:` says whether an inert method step warns or refuses, which changes nothing a run
# computes. Leaving them out also keeps the hashes of recipes resolved before the keys existed.
NOT_HASHED = ("hub", "health", "liveness")
# `launch:` keys that say where a run's processes meet, not what they compute: every machine of a multi-node run
# has its own machine_rank, and all of them must agree on the run directory's recipe hash.
LAUNCH_LOCATION_KEYS = ("machine_rank", "main_process_ip", "main_process_port", "extra_args")
TIME_LIMIT_KEYS = ("timeout", "completion_timeout")


def recipe_hash(cfg: dict) -> str:
    """A short hash of what a recipe computes. `launch:` counts by its process layout (the global batch and the
    sharding); a single-process launch is left out, so recipes written before `launch:` existed keep their hash,
    and so are the reward time limits at their defaults."""
    cfg = {k: v for k, v in cfg.items() if k not in NOT_HASHED}
    launch = cfg.get("launch")
    if isinstance(launch, dict):
        layout = {k: v for k, v in launch.items() if k not in LAUNCH_LOCATION_KEYS}
        default = {k: v for k, v in dataclasses.asdict(LaunchSpec()).items() if k not in LAUNCH_LOCATION_KEYS}
        cfg = {k: v for k, v in cfg.items() if k != "launch"}
        if layout != default:
            cfg["launch"] = layout
    errors = cfg.get("reward_errors")
    if isinstance(errors, dict):
        # The reward time limits (added later) count only when set away from their defaults, so recipes written
        # before them keep their hash (a finished pipeline stage is not rerun, --resume is not refused).
        default = dataclasses.asdict(RewardErrorPolicy())
        cfg["reward_errors"] = {k: v for k, v in errors.items()
                                if k not in TIME_LIMIT_KEYS or v != default[k]}
    text = yaml.safe_dump(cfg, sort_keys=True, default_flow_style=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def builtin_defaults(command: str) -> dict[str, Any]:
    schema = RECIPE_SCHEMAS[command]
    return dataclasses.asdict(schema())


def _read_yaml(path: Path) -> dict[str, Any]:
    """A recipe file's mapping. An empty file, a binary one or a directory is an error naming the file: a recipe
    that says nothing would run the command's built-in defaults."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise RecipeError(f"recipe not found: {path}") from None
    except IsADirectoryError:
        raise RecipeError(f"recipe {path} is a directory, not a YAML file") from None
    except OSError as e:
        raise RecipeError(f"cannot read recipe {path}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path} is not a text (UTF-8) file: byte {e.start} is 0x{raw[e.start]:02x}; a recipe is "
                          f"a YAML file") from None
    if "\x00" in text:
        raise RecipeError(f"{path} is not a text file (it holds NUL bytes); a recipe is a YAML file")
    try:
        data = yaml.load(text, Loader=YamlLoader)
    except yaml.YAMLError as e:
        raise RecipeError(yaml_error_message(path, e)) from None
    if data is None:
        raise RecipeError(f"{path} is empty (or holds only comments): a recipe needs at least `command:` or "
                          f"`defaults:`")
    if not isinstance(data, dict):
        raise RecipeError(f"{path} must hold a mapping at the top level, not {type(data).__name__}")
    return data


def yaml_error_message(path: Path | str, error: yaml.YAMLError) -> str:
    """One line: the file, line and column, and what PyYAML found there."""
    mark = getattr(error, "problem_mark", None)
    where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(path)
    problem = getattr(error, "problem", None)
    if problem is None:
        return f"{where}: not valid YAML: {' '.join(str(error).split())}"
    context = getattr(error, "context", None)
    return f"{where}: not valid YAML: {f'{context}: ' if context else ''}{problem}"


def find_recipe(ref: str, relative_to: Path | None) -> Path:
    """Resolve a recipe reference: as given, relative to `relative_to`, then relative to `recipes/`."""
    for base in ([relative_to] if relative_to else []) + [Path.cwd(), recipes_root()]:
        for name in (ref, ref + ".yaml", ref + ".yml"):
            p = Path(name) if Path(name).is_absolute() else base / name
            if p.is_file():
                return p.resolve()
    raise RecipeError(f"recipe '{ref}' not found (looked in {relative_to or Path.cwd()} and {recipes_root()})")


def _leaf_origins(data: Any, origin: str, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(data, dict):
        if prefix:
            out[prefix] = origin
        for k, v in data.items():
            out.update(_leaf_origins(v, origin, f"{prefix}.{k}" if prefix else str(k)))
    else:
        out[prefix] = origin
    return out


def _layers(path: Path, seen: tuple[Path, ...]) -> list[tuple[dict, str]]:
    """The file's `defaults:` layers (recursively, lowest first) followed by the file itself."""
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise RecipeError(f"recipe defaults form a cycle: {chain}")
    data = _read_yaml(path)
    defaults = data.pop("defaults", []) or []
    if isinstance(defaults, str):
        defaults = [defaults]
    if not isinstance(defaults, list) or not all(isinstance(d, str) for d in defaults):
        raise RecipeError(f"{path}: 'defaults' must be a list of recipe paths")
    layers: list[tuple[dict, str]] = []
    for ref in defaults:
        layers += _layers(find_recipe(ref, path.parent), (*seen, path))
    layers.append((data, str(path)))
    return layers


def _parse_overrides(overrides: list[str]) -> dict:
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise RecipeError(f"override {bad[0]!r} is not of the form key=value (e.g. trainer.learning_rate=1e-6)")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as e:
        raise RecipeError(f"cannot parse overrides {overrides}: {e}") from None


def read_recipe(
    path: str | Path | None,
    overrides: list[str] | dict | None = None,
    command: str | None = None,
    *,
    config_class: ConfigClass,
    other_keys: OtherKeys = no_other_keys,
    smoke_layer: dict | None = None,
    top_layer: dict | None = None,
) -> Recipe:
    """Load, layer, override, interpolate and validate a recipe against its command's schema.

    `command` is the subcommand it runs under: a recipe that declares another command is refused.
    `overrides` is a list of `key=value` strings (command line) or a nested dict (pipeline stages).
    `config_class(command)` is the TRL config class a `trainer:` section is validated against
    (postrain.trainers.config_class); `other_keys(dataclass)` the keys a section takes besides its fields (a data
    source's transform settings: postrain.data.transforms.keys_besides_fields; without it a source takes its fields
    only, and a transform's settings are refused as unknown keys). `smoke_layer` (from `--smoke`) sits between the recipe and the overrides;
    `top_layer` above the overrides (postrain.jobs.loading.load_smoke_recipe).
    """
    layers: list[tuple[dict, str]] = []
    recipe_path = None
    if path is not None:
        recipe_path = Path(path)
        if recipe_path.is_dir():
            raise RecipeError(f"recipe {path} is a directory, not a YAML file")
        if not recipe_path.is_file():
            recipe_path = find_recipe(str(path), None)
        recipe_path = recipe_path.resolve()
        layers = _layers(recipe_path, ())
    declared = None
    for data, _ in layers:
        declared = data.get("command", declared)
    if isinstance(overrides, dict):
        override_layer = overrides
    else:
        override_layer = _parse_overrides(list(overrides or []))
    declared = override_layer.get("command", declared)
    if declared is None:
        if command is None:
            raise RecipeError(f"{recipe_path}: the recipe does not declare its `command:` (one of {', '.join(RECIPE_SCHEMAS)})")
        declared = command
    if declared not in RECIPE_SCHEMAS:
        raise RecipeError(f"{recipe_path}: unknown command {declared!r}; expected one of {', '.join(RECIPE_SCHEMAS)}")
    if command is not None and declared != command:
        raise RecipeError(
            f"{recipe_path} is a `{declared}` recipe; run it with `postrain {declared if declared != 'pipeline' else 'run'} "
            f"{path}`, not `postrain {command}`"
        )

    smoke = [(smoke_layer, "--smoke")] if smoke_layer else []
    top = [(top_layer, "--smoke (data)")] if top_layer else []
    all_layers = [(builtin_defaults(declared), BUILTIN), *layers, *smoke, (override_layer, COMMAND_LINE), *top]
    origins: dict[str, str] = {}
    merged = OmegaConf.create({})
    for data, origin in all_layers:
        origins.update(_leaf_origins(data, origin))
        try:
            merged = OmegaConf.merge(merged, OmegaConf.create(data))
        except (OmegaConfBaseException, TypeError, ValueError) as e:
            hint = ("; a list is replaced whole, e.g. 'rewards=[{name: exact_match, args: {answer_column: gold}}]'"
                    if "incompatible container" in str(e) else "")
            raise RecipeError(f"cannot merge {origin}: {e}{hint}") from None
    if declared == "pipeline":
        _default_stage_outputs(merged)
    try:
        cfg = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or ""
        raise RecipeError(f"cannot resolve interpolation{f' in {key!r}' if key else ''}: {e.msg if hasattr(e, 'msg') else e}") from None
    if declared == "grpo":
        # `method: dapo` becomes its rl: parts, as a layer just below the recipe's own rl: keys
        # slow: torch (through postrain.rl.methods), recipe loading must not import it
        from postrain.rl.methods import apply_method

        apply_method(cfg, origins, _leaf_origins)
    validate_recipe(cfg, RECIPE_SCHEMAS[declared], origins, config_class, other_keys)
    return Recipe(command=declared, cfg=cfg, path=recipe_path, origins=origins)


def _default_stage_outputs(merged) -> None:
    """Give each pipeline stage its run directory, `<output_dir>/<stage>`, so `${stages.<name>.output}` resolves."""
    for name in list(merged.get("stages") or {}):
        stage = merged.stages[name]
        if isinstance(stage, dict) or OmegaConf.is_dict(stage):
            if stage.get("output") is None:
                stage.output = "${output_dir}/" + str(name)
