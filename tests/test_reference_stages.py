"""Reference handling as stages: sDPO's data chunks, Curry-DPO's curriculum pairs, the reference a pipeline stage
trains against (Pre-DPO, sDPO), and TR-DPO's reference sync (TRL's sync_ref_model), on the tiny model.

The reference checks read what the trainer used (the log-probs handed to the loss, the reference's weights after
training) and compare them with an independent computation: a plain forward of the model on disk, or the TR-DPO
update θ_ref ← α θ + (1 − α) θ_ref written out here from the policy's weights at each step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from postrain.data.sources import chunk_rows, load_source
from postrain.data.transforms.pairing import curriculum_pairs
from postrain.errors import DataError, RecipeError
from postrain.jobs import load_recipe
from tests.conftest import REPO, postrain, write_recipe



# --- sDPO: chunks of the data ------------------------------------------------------------------------------------

def test_chunks_are_the_slices_in_order_and_partition_the_rows():
    source = {"source": "builtin:arithmetic", "task": {"n": 10, "digits": 1}}
    everything = list(load_source(source, "dpo")["prompt"])
    chunks = [list(load_source({**source, "chunk": {"index": t, "of": 3}}, "dpo")["prompt"]) for t in range(3)]
    # 10 rows in 3 chunks: positions 0-2, 3-5, 6-9, each in the source's order
    assert chunks == [everything[0:3], everything[3:6], everything[6:10]]
    assert sum(chunks, []) == everything
    for n_rows in (0, 1, 7, 64):
        for of in (1, 2, 3, 5):
            parts = [list(chunk_rows(n_rows, t, of)) for t in range(of)]
            assert sum(parts, []) == list(range(n_rows))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_chunk_is_checked_when_the_recipe_loads(tmp_path):
    recipe = REPO / "recipes" / "papers" / "stages" / "sdpo_step.yaml"
    with pytest.raises(RecipeError, match=r"data\.train\.chunk\.index: must be an integer in 0\.\.1"):
        load_recipe(recipe, ["data.train.chunk={index: 2, of: 2}"], "dpo")
    with pytest.raises(RecipeError, match=r"data\.train\.chunk\.of: must be an integer >= 1"):
        load_recipe(recipe, ["data.train.chunk={index: 0, of: 0}"], "dpo")
    ok = load_recipe(recipe, ["data.train.chunk={index: 1, of: 2}"], "dpo")
    assert ok.cfg["data"]["train"]["chunk"] == {"index": 1, "of": 2}
    with pytest.raises(DataError, match="chunk 0 of 4 .* is empty"):
        load_source({"source": "builtin:arithmetic", "task": {"n": 3}, "chunk": {"index": 0, "of": 4}}, "dpo")


# --- Curry-DPO: curriculum pairs ---------------------------------------------------------------------------------

def test_curriculum_pairs_by_hand():
    rows = [
        # ranked b(5) > d(4) > a(3) > c(2): gaps to the best are c 3, a 2, d 1 -> stages (b,c), (b,a), (b,d)
        {"prompt": "p1", "completions": ["a", "b", "c", "d"], "scores": [3, 5, 2, 4], "id": 1},
        # a tie with the best is no pair: only (x, z); the first of the tied best is chosen
        {"prompt": "p2", "completions": ["x", "y", "z"], "scores": [5, 5, 1], "id": 2},
        # equal gaps keep the list's order: (r, s) before (r, t)
        {"prompt": "p3", "completions": ["s", "r", "t"], "scores": [1, 9, 1], "id": 3},
    ]
    chosen_rejected = [[(r["prompt"], r["chosen"], r["rejected"])
                        for r in curriculum_pairs(rows, "t", curriculum_stage=stage)]
                       for stage in range(4)]
    assert chosen_rejected == [
        [("p1", "b", "c"), ("p2", "x", "z"), ("p3", "r", "s")],
        [("p1", "b", "a"), ("p3", "r", "t")],
        [("p1", "b", "d")],
        [],
    ]
    first = curriculum_pairs(rows, "t", curriculum_stage=0)[0]
    assert (first["score_chosen"], first["score_rejected"], first["id"]) == (5.0, 2.0, 1)
    assert "completions" not in first and "scores" not in first


def test_curriculum_pairs_from_a_file_and_their_load_time_checks(tmp_path):
    data = tmp_path / "k4.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "1+1=", "completions": ["2", "3", "11", "4"], "scores": [5, 3, 1, 4]},
        {"prompt": "2+2=", "completions": ["5", "4"], "scores": [2, 5]},
    ]))
    spec = {"source": str(data), "transform": "curriculum_pairs"}
    easy = load_source({**spec, "curriculum_stage": 0}, "dpo")
    assert list(zip(easy["prompt"], easy["chosen"], easy["rejected"])) == [("1+1=", "2", "11"), ("2+2=", "4", "5")]
    hard = load_source({**spec, "curriculum_stage": 2}, "dpo")
    assert list(zip(hard["chosen"], hard["rejected"])) == [("2", "4")]
    with pytest.raises(DataError, match="stage 3 has no pair"):
        load_source({**spec, "curriculum_stage": 3}, "dpo")

    stage_recipe = REPO / "recipes" / "papers" / "stages" / "curry_dpo_stage.yaml"
    with pytest.raises(RecipeError, match=r"data\.train\.curriculum_stage: transform 'curriculum_pairs' needs"):
        load_recipe(stage_recipe, ["data.train.curriculum_stage=null"], "dpo")
    with pytest.raises(RecipeError, match=r"data\.train\.curriculum_stage: set only with transform"):
        load_recipe(stage_recipe, ["data.train.transform=null"], "dpo")
    # the paper pipeline's iterations read the easiest, then the next, then the hardest pair of each prompt
    pipeline = load_recipe(REPO / "recipes" / "papers" / "curry_dpo.yaml", [], "pipeline")
    stages = pipeline.cfg["stages"]
    assert [s["overrides"]["data.train.curriculum_stage"] for s in stages.values()] == [0, 1, 2]


# --- which reference a stage trains against -----------------------------------------------------------------------

def recording_trainers(monkeypatch) -> list:
    """Make `postrain dpo` build trainers that keep the first batch they train on and the log-probs handed to the
    loss (policy and reference), in the returned list (one trainer per job)."""
    import postrain.trainers.preference_trainers as dpo_module

    made: list = []
    original = dpo_module.trainer_class_for

    def recording_class_for(terms):
        base = original(terms)

        class Recording(base):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.first_batch, self.first_data = None, None
                made.append(self)

            def _compute_loss(self, model, inputs, return_outputs):
                if self.first_batch is None:
                    self.first_batch = {k: v.detach().clone() for k, v in inputs.items() if torch.is_tensor(v)}
                return super()._compute_loss(model, inputs, return_outputs)

            def _registry_loss(self, mode, data, *args, **kwargs):
                if self.first_data is None:
                    self.first_data = {k: v.detach().clone() for k, v in data.items() if torch.is_tensor(v)}
                return super()._registry_loss(mode, data, *args, **kwargs)

        return Recording

    monkeypatch.setattr(dpo_module, "trainer_class_for", recording_class_for)
    return made


def plain_logps(model_path: Path | str, batch: dict) -> torch.Tensor:
    """Summed completion log-probs of a DPO batch under a model loaded from disk: a plain forward and log-softmax."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).eval()
    ids, mask = batch["input_ids"], batch["completion_mask"][:, 1:]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    token_logps = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (token_logps * mask).sum(dim=1)


def smoke_paper_pipeline(name: str, tmp_path: Path, learning_rate: float = 0.05) -> Path:
    """The paper pipeline recipes/papers/<name>.yaml as it ships, with a learning rate large enough that two smoke
    steps move the model measurably (the papers' 1e-6 would not), written under tmp_path."""
    raw = yaml.safe_load((REPO / "recipes" / "papers" / f"{name}.yaml").read_text())
    for stage in raw["stages"].values():
        stage["recipe"] = str(REPO / "recipes" / "papers" / stage["recipe"])
        stage["overrides"] = {**(stage.get("overrides") or {}), "trainer.learning_rate": learning_rate}
    return write_recipe(tmp_path / f"{name}.yaml", yaml.safe_dump(raw, sort_keys=False))


def logps_of(data: dict, prefix: str = "") -> torch.Tensor:
    return torch.cat([data[f"{prefix}chosen_logps"], data[f"{prefix}rejected_logps"]])


def test_pre_dpo_trains_from_the_sft_model_against_the_guide(tmp_path, monkeypatch):
    made = recording_trainers(monkeypatch)
    out = tmp_path / "run"
    postrain("run", str(smoke_paper_pipeline("pre_dpo", tmp_path)), "--smoke", f"output_dir={out}")
    guide, policy = out / "guide", out / "pre_dpo"
    # the resolved recipe and the lineage: the reference is the guide, the policy starts where the guide did
    stage2 = yaml.safe_load((policy / "recipe.yaml").read_text())
    stage1 = yaml.safe_load((guide / "recipe.yaml").read_text())
    assert stage2["ref_model"]["name_or_path"] == str(guide)
    assert stage2["model"] == stage1["model"] and stage2["model"]["name_or_path"] == "tiny"
    lineage = {s["stage"]: s for s in json.loads((out / "lineage.json").read_text())}
    assert lineage["pre_dpo"]["upstream"] == ["guide"] and str(guide) in lineage["pre_dpo"]["inputs"]

    trainer = next(t for t in made if Path(t.args.output_dir).parent == policy)
    used_ref, used_policy = logps_of(trainer.first_data, "ref_"), logps_of(trainer.first_data)
    batch = trainer.first_batch
    assert torch.allclose(used_ref, plain_logps(guide / "model", batch), atol=1e-4)
    # the policy's first forward is the SFT (tiny) model's, which the guide's two steps have moved away from
    from postrain.models.loading import resolve_model_path

    sft = resolve_model_path("tiny", stage2["model"]["tiny"])
    assert torch.allclose(used_policy, plain_logps(sft, batch), atol=1e-4)
    assert (used_ref - used_policy).abs().max() > 1e-2


def test_sdpo_step_two_starts_from_and_refers_to_step_one(tmp_path, monkeypatch):
    made = recording_trainers(monkeypatch)
    out = tmp_path / "run"
    postrain("run", str(smoke_paper_pipeline("sdpo", tmp_path)), "--smoke", f"output_dir={out}")
    step1, step2 = out / "step1", out / "step2"
    resolved = yaml.safe_load((step2 / "recipe.yaml").read_text())
    assert resolved["model"]["name_or_path"] == resolved["ref_model"]["name_or_path"] == str(step1)

    first, second = (next(t for t in made if Path(t.args.output_dir).parent == d) for d in (step1, step2))
    batch = second.first_batch
    step1_logps = plain_logps(step1 / "model", batch)
    # at its first step the policy is still step 1's model, and the reference is step 1's model throughout
    assert torch.allclose(logps_of(second.first_data, "ref_"), step1_logps, atol=1e-4)
    assert torch.allclose(logps_of(second.first_data), step1_logps, atol=1e-4)
    # and step 1 trained against its own start (the SFT model), which step 1's model no longer is
    assert (logps_of(first.first_data, "ref_") - plain_logps(step1 / "model", first.first_batch)).abs().max() > 1e-2


# --- TR-DPO: the reference follows the policy ---------------------------------------------------------------------

def recording_weights(monkeypatch) -> list:
    """Make `postrain dpo` build trainers that keep the policy's weights at the start and after every step."""
    import postrain.trainers.preference_trainers as dpo_module
    from transformers import TrainerCallback

    made: list = []
    original = dpo_module.trainer_class_for

    def snapshot(model) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    def recording_class_for(terms):
        class Recording(original(terms)):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.policy_at_step: dict[int, dict] = {}
                self.ref_at_start = snapshot(self.ref_model)
                trainer = self

                class Snapshots(TrainerCallback):
                    def on_train_begin(self, args, state, control, model=None, **kw):
                        trainer.policy_at_step[0] = snapshot(model)

                    def on_step_end(self, args, state, control, model=None, **kw):
                        trainer.policy_at_step[state.global_step] = snapshot(model)

                self.callback_handler.callbacks.insert(0, Snapshots())
                made.append(self)

        return Recording

    monkeypatch.setattr(dpo_module, "trainer_class_for", recording_class_for)
    return made


@pytest.mark.parametrize("alpha,every", [(0.6, 1), (1.0, 2)], ids=["soft-every-step", "hard-every-2-steps"])
def test_tr_dpo_reference_moves_toward_the_policy(tmp_path, monkeypatch, alpha, every):
    made = recording_weights(monkeypatch)
    postrain("dpo", str(REPO / "recipes" / "papers" / "tr_dpo.yaml"), "--smoke", f"output_dir={tmp_path / 'run'}",
             "trainer.max_steps=3", "trainer.learning_rate=0.05", "trainer.warmup_steps=0", f"trainer.ref_model_mixup_alpha={alpha}",
             f"trainer.ref_model_sync_steps={every}")
    (trainer,) = made
    theta = trainer.policy_at_step
    assert sorted(theta) == [0, 1, 2, 3]
    # the reference starts as the starting policy (TRL's implicit copy)
    for name, value in trainer.ref_at_start.items():
        assert torch.equal(value, theta[0][name]), name
    # θ_ref ← α θ_t + (1 − α) θ_ref after every `every`-th step t, from the policy weights recorded at each step
    expected = {n: v.clone() for n, v in theta[0].items()}
    for step in (1, 2, 3):
        if step % every == 0:
            expected = {n: alpha * theta[step][n] + (1 - alpha) * expected[n] for n in expected}
    ref_now = dict(trainer.ref_model.named_parameters())
    moved = 0.0
    for name, value in expected.items():
        assert torch.allclose(ref_now[name].detach(), value, atol=1e-6), name
        moved = max(moved, (value - theta[0][name]).abs().max().item())
    assert moved > 1e-3  # the reference did move away from the starting policy
    # and it is not simply the final policy (soft: a mixture; hard every 2 steps: the policy after step 2)
    assert max((ref_now[n].detach() - theta[3][n]).abs().max().item() for n in expected) > 1e-4
