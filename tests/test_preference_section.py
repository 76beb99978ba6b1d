"""The `loss:` section parsed once (postrain.preference.section): `postrain dpo` hands the parsed terms to the
trainer, which parses only a raw section given to it directly; the trainer-state settings are facts on the entries."""

from __future__ import annotations

import pytest

from postrain.errors import RecipeError
from tests.conftest import REPO, postrain, read_jsonl
from tests.test_dpo_trainer import make_trainer


def test_postrain_dpo_hands_the_parsed_terms_to_the_trainer(tmp_path, monkeypatch):
    import postrain.trainers.dpo as dpo_module
    from postrain.preference.section import LossTerm

    def refuse(*args, **kwargs):
        raise AssertionError("the trainer parsed the `loss:` section again")

    received = []
    original_init = dpo_module.PostrainDPOTrainer.__init__

    def recording_init(self, *args, losses=None, **kwargs):
        received.append(losses)
        original_init(self, *args, losses=losses, **kwargs)

    monkeypatch.setattr(dpo_module, "parse_losses", refuse)
    monkeypatch.setattr(dpo_module.PostrainDPOTrainer, "__init__", recording_init)
    out = tmp_path / "run"
    postrain("dpo", str(REPO / "recipes" / "papers" / "simpo.yaml"), "--smoke", f"output_dir={out}")
    assert len(received) == 1 and [type(t) for t in received[0]] == [LossTerm]
    assert received[0][0].name == "simpo"
    assert any("loss/simpo" in row for row in read_jsonl(out / "metrics.jsonl"))


def test_a_raw_section_given_to_the_trainer_is_parsed_and_checked_as_a_recipe_is():
    """Direct Python use: the trainer parses the section itself, with the checks a recipe's load makes (here the
    model spec of TGDPO's token reward model, checked where the recipe schema is)."""
    with pytest.raises(RecipeError, match=r"unknown key 'loss\[0\].token_reward_model.dtpye'"):
        make_trainer([{"name": "tgdpo", "token_reward_model": {"name_or_path": "tiny", "dtpye": "float32"}}])
    with pytest.raises(RecipeError, match=r"loss\[0\].token_reward_model must be a model"):
        make_trainer([{"name": "tgdpo", "token_reward_model": "runs/dpo"}])


def test_every_entry_reading_trainer_state_declares_its_settings_and_each_setting_is_checked():
    from postrain.preference import PREFERENCE
    from postrain.preference.section import STATE_DATA, STATE_SETTING_CHECKS, state_settings

    stateful = {v.name for v in PREFERENCE if STATE_DATA & {k for k, required in v.data.items() if required}}
    declared = {v.name for v in PREFERENCE if state_settings(v.name)}
    assert stateful and stateful == declared
    for name in declared:
        assert set(state_settings(name)) <= set(STATE_SETTING_CHECKS), name


@pytest.mark.parametrize("entry, message", [
    ({"name": "beta_dpo", "rho": 1.0}, r"loss\[0\].rho must be a number in \[0, 1\)"),
    ({"name": "beta_dpo", "momentum": True}, r"loss\[0\].momentum must be a number in \[0, 1\)"),
    ({"name": "group_robust_po"}, r"loss\[0\]: 'group_robust_po' needs `group_column:`"),
    ({"name": "group_robust_po", "group_column": "g", "step_size": -1}, r"loss\[0\].step_size must be a number >= 0"),
    ({"name": "group_robust_po", "group_column": "g", "group_fractions": 1},
     r"loss\[0\].group_fractions must be true or false"),
])
def test_state_settings_are_refused_naming_the_key(entry, message):
    from postrain.preference.section import parse_losses

    with pytest.raises(RecipeError, match=message):
        parse_losses([entry], {"per_device_train_batch_size": 8})


def test_state_settings_are_split_off_the_hyperparameters_with_their_defaults():
    from postrain.preference.section import parse_losses

    beta, group = parse_losses([{"name": "beta_dpo", "alpha": 0.5, "rho": 0}, {"name": "group_robust_po",
                                "group_column": "g", "beta": 0.1}], {"per_device_train_batch_size": 8})
    assert beta.params == {"alpha": 0.5} and beta.state == {"momentum": 0.9, "rho": 0.0}
    assert group.params == {"beta": 0.1}
    assert group.state == {"group_column": "g", "step_size": 0.01, "group_fractions": True}
