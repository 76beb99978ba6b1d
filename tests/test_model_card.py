"""The model card (postrain.reports.model_card): README.md in every model folder a run writes.

End to end on the tiny model: a two-stage pipeline (SFT, then GRPO with `method: dr_grpo` and evaluation during
training) and a merge. Without training: the paper section of paper recipes (loaded through the smoke loader),
the front matter's base_model / license / datasets along a lineage, and who writes the card.
Expected values come from the run's own files and from the registries, not from copies of them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from huggingface_hub import ModelCard

from postrain.reports.model_card import build_card, finish_model, method_papers
from postrain.reports.report import num
from tests.conftest import REPO, TINY, postrain, write_recipe

TINY_MODEL = "model: {name_or_path: tiny, dtype: float32, tiny: %s}" % json.dumps(TINY)
TRAINER = "max_steps: 2, per_device_train_batch_size: 4, logging_steps: 1, report_to: none"


def card_of(run_dir: Path) -> tuple[dict, str]:
    text = (Path(run_dir) / "model" / "README.md").read_text()
    return ModelCard(text).data.to_dict(), text  # huggingface_hub's own reading of the front matter


def recipe_block(card: str) -> str:
    match = re.search(r"\n(`{3,})yaml\n(.*?)\n\1\n", card, re.S)
    assert match, "the card holds the recipe in a yaml code block"
    return match.group(2)


def paper_rows(card: str) -> list[str]:
    section = card.split("## Method", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| ") and "arxiv.org" in line]


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cards")
    write_recipe(tmp / "sft.yaml", f"""
defaults: [base/sft]
description: Arithmetic SFT on the tiny model.
{TINY_MODEL}
data: {{train: {{source: "builtin:arithmetic", task: {{n: 16, digits: 1}}}}}}
trainer: {{{TRAINER}, max_length: 32}}
""")
    write_recipe(tmp / "grpo.yaml", f"""
defaults: [base/grpo]
{TINY_MODEL}
data: {{train: {{source: "builtin:arithmetic", task: {{n: 16, digits: 1}}}}}}
rewards: [{{name: exact_match}}]
method: dr_grpo
trainer: {{{TRAINER}, num_generations: 4, max_completion_length: 4, use_vllm: false, activation_checkpointing: false}}
eval_during_training:
  every_steps: 1
  sets: {{heldout: {{source: "builtin:arithmetic", split: test, task: {{n: 4, digits: 1}}}}}}
  generation: {{max_new_tokens: 4, batch_size: 4}}
""")
    pipe = write_recipe(tmp / "pipe.yaml", f"""
command: pipeline
name: cards
output_dir: {tmp / 'pipe'}
stages:
  sft: {{command: sft, recipe: sft.yaml}}
  rl: {{command: grpo, recipe: grpo.yaml, overrides: {{model.name_or_path: "${{stages.sft.output}}"}}}}
""")
    postrain("run", str(pipe))
    return tmp / "pipe"


def test_sft_card_front_matter_lineage_metrics_and_the_recipe_that_reproduces_it(pipeline_run, tmp_path):
    run = pipeline_run / "sft"
    meta, card = card_of(run)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["tags"] == ["postrain", "trl", "sft"]
    assert "base_model" not in meta and "license" not in meta and "datasets" not in meta  # tiny, builtin data
    assert "Arithmetic SFT on the tiny model." in card
    assert "Trained from `tiny`: the embedded tiny model" in card
    assert f"stage `sft` of the pipeline `cards` (`{pipeline_run.resolve()}`), reading the outputs of no earlier stage" in card

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "loss" in r][-1]
    assert f"| `loss` | {num(float(last['loss']))} | {last['step']} |" in card
    summary = rows[-1]
    assert f"Trained to step {summary['step']} " in card and f"mean training loss {num(summary['train_loss'])}." in card

    env = json.loads((run / "env.json").read_text())
    assert recipe_block(card) == (run / "recipe.yaml").read_text().rstrip()
    assert f"hash `{env['recipe_hash']}`" in card and "postrain sft recipe.yaml" in card
    assert f"trl {env['packages']['trl']}" in card and f"postrain {env['packages']['postrain']}" in card
    from postrain.jobs import load_recipe

    saved = write_recipe(tmp_path / "recipe.yaml", recipe_block(card))
    assert load_recipe(saved).hash == env["recipe_hash"]  # the recipe in the card is the run's recipe


def test_grpo_method_card_names_the_method_its_papers_its_input_stage_and_the_evaluation(pipeline_run):
    from postrain.registry import FAMILIES
    from postrain.rl.methods import METHODS

    run = pipeline_run / "rl"
    meta, card = card_of(run)
    assert meta["tags"][:4] == ["postrain", "trl", "grpo", "dr_grpo"]
    assert f"Trained from `{pipeline_run / 'sft'}`: a postrain run directory (`postrain sft`, trained from `tiny`)" in card
    assert "stage `rl` of the pipeline `cards`" in card and "reading the outputs of `sft`" in card

    rows = paper_rows(card)
    method = METHODS.entries["dr_grpo"]
    assert any(method.arxiv in r and "method `dr_grpo`" in r and method.paper in r for r in rows), rows
    recipe = yaml.safe_load(recipe_block(card).split("\n", 1)[1])
    for part, family in (("advantage", "advantage"), ("policy_loss", "policy_loss"), ("aggregation", "aggregation")):
        name = recipe["rl"][part]["name"]
        entry = FAMILIES[family].entries[name]
        assert any(entry.arxiv in r and f"{part} `{name}`" in r for r in rows), (part, rows)

    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    points = [(r["step"], r["eval/heldout/accuracy"]) for r in logged if "eval/heldout/accuracy" in r]
    assert len(points) >= 2  # at the start and after the steps
    (s0, v0), (s1, v1) = points[0], points[-1]
    assert f"| `eval/heldout/accuracy` | {num(v0)} | {s0} | {num(v1)} | {s1} |" in card
    assert "evaluated during training: heldout" in card


def test_a_merge_writes_a_card_with_its_inputs_and_method(tmp_path):
    out = tmp_path / "merged"
    postrain("merge", str(REPO / "recipes" / "base" / "merge.yaml"), "--smoke", f"output_dir={out}")
    meta, card = card_of(out)
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    method = recipe["merge"]["merge_method"]
    assert meta["tags"] == ["postrain", "mergekit", "merge", method] and meta["library_name"] == "transformers"
    assert "base_model" not in meta  # tiny models
    for model in recipe["merge"]["models"]:
        assert f"`{model['model']}`" in card.split("## Method", 1)[0]
    assert f"merge {method}" in card and "evaluate the model with `postrain eval`" in card
    assert recipe_block(card) == (out / "recipe.yaml").read_text().rstrip()


# --- without training -----------------------------------------------------------------------------------------------

def smoke_cfg(name: str) -> dict:
    from postrain.jobs import load_smoke_recipe

    return load_smoke_recipe(REPO / "recipes" / name).cfg


def test_a_paper_recipe_card_lists_the_recipe_paper_and_every_registry_part_paper():
    from postrain.registry import FAMILIES
    from postrain.rl.methods import METHODS

    cfg = smoke_cfg("papers/dapo.yaml")
    card = build_card(cfg)
    rows = paper_rows(card)
    own = cfg["paper"]
    assert any(own["arxiv"] in r and own["title"] in r and "the paper this recipe reproduces" in r for r in rows)
    method = METHODS.entries[cfg["method"]["name"]]
    assert any(method.arxiv in r and f"method `{method.name}`" in r for r in rows)
    families = {"advantage": "advantage", "policy_loss": "policy_loss", "aggregation": "aggregation",
                "shaping": "shaping", "samplers": "sampler", "regularizers": "regularizer"}
    named = 0
    for part, family in families.items():
        values = cfg["rl"].get(part) or []
        for value in values if isinstance(values, list) else [values]:
            entry = FAMILIES[family].entries[value["name"]]
            assert any(entry.arxiv in r and f"`{entry.name}`" in r for r in rows), (part, entry.name, rows)
            named += 1
    assert named >= 5  # advantage, policy loss, aggregation, shaping, sampler
    assert len(rows) == len({r.split("](https://arxiv.org/abs/")[1].split(")")[0] for r in rows})  # one row a paper


def test_dpo_cards_cite_the_loss_entries_or_the_paper_of_trl_loss_type():
    from postrain.preference.registry import PREFERENCE

    simpo = smoke_cfg("papers/simpo.yaml")
    papers = method_papers(simpo)
    for entry in simpo["loss"]:
        variant = PREFERENCE.entries[entry["name"]]
        assert any(p["arxiv"] == variant.arxiv and f"loss `{variant.name}`" in p["used_for"] for p in papers)
    plain = smoke_cfg("base/dpo.yaml")  # no loss: entries: TRL's loss_type
    loss_types = plain["trainer"]["loss_type"]
    computing = [v for v in PREFERENCE if v.trl == f"loss_type={loss_types[0]}"]
    assert computing and any(p["arxiv"] == computing[0].arxiv and f"TRL loss_type `{loss_types[0]}`" in p["used_for"]
                             for p in method_papers(plain))
    assert "sigmoid" in build_card(plain).split("tags:", 1)[1].split("---", 1)[0]


def test_front_matter_base_model_license_and_datasets_follow_the_lineage(tmp_path):
    from postrain.models.packaged import PACKAGED_MODELS
    from postrain.reports.model_card import model_card

    def run_dir(name: str, cfg: dict, card: bool = True) -> Path:
        path = tmp_path / name
        (path / "model").mkdir(parents=True)
        (path / "model" / "config.json").write_text("{}")
        (path / "recipe.yaml").write_text("# postrain resolved recipe, hash x\n" + yaml.safe_dump(cfg))
        if card:
            (path / "model" / "README.md").write_text(model_card(path))
        return path

    def sft(model: str, **extra) -> dict:
        return {"command": "sft", "name": "m", "model": {"name_or_path": model}, **extra}

    def meta(cfg: dict) -> dict:
        return ModelCard(build_card(cfg)).data.to_dict()

    hub_base = "SomeOrg/some-base"
    (packaged_name, packaged), = PACKAGED_MODELS.items()
    assert meta(sft(hub_base))["base_model"] == hub_base and "license" not in meta(sft(hub_base))
    assert meta(sft(packaged_name))["base_model"] == packaged.origin
    assert meta(sft(packaged_name))["license"] == packaged.license

    from_hub = run_dir("from_hub", sft(hub_base))
    from_packaged = run_dir("from_packaged", sft(packaged_name))
    before_cards = run_dir("before_cards", sft(hub_base), card=False)  # a run from before model cards
    assert meta(sft(str(from_hub)))["base_model"] == hub_base and "license" not in meta(sft(str(from_hub)))
    assert meta(sft(str(from_packaged)))["license"] == packaged.license  # through the earlier card
    assert meta(sft(str(before_cards)))["base_model"] == hub_base  # through its recipe
    assert "base_model" not in meta(sft("tiny")) and "license" not in meta(sft("tiny"))

    merge = {"command": "merge", "name": "m", "merge": {"merge_method": "linear", "models": [
        {"model": str(from_hub), "parameters": {"weight": 0.5}}, {"model": str(from_packaged), "parameters": {"weight": 0.5}}]}}
    merged = meta(merge)
    assert merged["base_model"] == [hub_base, packaged.origin] and merged["base_model_relation"] == "merge"
    assert "license" not in merged  # one of its models' license is not known

    local = tmp_path / "pairs.jsonl"
    local.write_text("")
    data = {"train": {"source": "SomeOrg/some-data"}, "eval": {"source": str(local)}}
    assert meta(sft(hub_base, data=data))["datasets"] == ["SomeOrg/some-data"]
    assert "datasets" not in meta(sft(hub_base, data={"train": {"source": "builtin:arithmetic"}}))


def test_a_recipe_holding_backticks_keeps_its_code_block_whole():
    cfg = {"command": "sft", "name": "m", "model": {"name_or_path": "tiny"},
           "data": {"train": {"source": "builtin:arithmetic", "prompt_template": "```\n{prompt}\n```"}}}
    card = build_card(cfg)
    assert yaml.safe_load(recipe_block(card)) == cfg


def test_only_the_process_that_saves_writes_the_card(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({"command": "sft", "name": "m", "model": {"name_or_path": "tiny"}}))
    assert finish_model(SimpleNamespace(args=SimpleNamespace(should_save=False)), tmp_path) is None
    assert not (tmp_path / "model" / "README.md").exists()
    written = finish_model(SimpleNamespace(args=SimpleNamespace(should_save=True)), tmp_path)
    assert written == tmp_path / "model" / "README.md" and written.read_text().startswith("---\n")


def test_every_shipped_model_recipe_gets_a_card_naming_its_papers():
    """The card is written at the end of every sft / dpo / grpo / merge run: building it must not fail on any recipe
    shape (methods, rl: parts, loss: entries, merges, paper sections), and every paper the recipe cites is in it."""
    from postrain.recipes.catalog import list_recipes

    recipes = [r for r in list_recipes(REPO / "recipes") if r["command"] in ("sft", "dpo", "grpo", "merge")]
    assert len(recipes) > 50
    for row in recipes:
        cfg = smoke_cfg(row["path"].removeprefix("recipes/"))
        card = build_card(cfg)
        meta = ModelCard(card).data.to_dict()
        assert meta["tags"][:3] == ["postrain", "mergekit" if cfg["command"] == "merge" else "trl", cfg["command"]]
        if row["arxiv"]:
            assert f"https://arxiv.org/abs/{row['arxiv']}" in card, row["path"]
        assert yaml.safe_load(recipe_block(card)) == cfg, row["path"]
