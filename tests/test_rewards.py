"""Tests of postrain.rewards: the built-ins against hand-worked values, build_rewards, and the error policy."""

import importlib
import pickle
import sys
import textwrap

import pytest

from postrain.rewards import REWARDS, RewardFunction, RewardSpecError, build_rewards

# What TRL passes besides the completions and the dataset columns; built-ins must ignore it.
TRL_EXTRAS = dict(trainer_state=None, log_extra=lambda *a, **k: None, log_metric=lambda *a, **k: None)


def build_one(name, **args):
    rewards, _ = build_rewards([{"name": name, "args": args}])
    return rewards[0]


def assistant(text):
    return [{"role": "assistant", "content": text}]


def test_registry_has_the_builtins_with_descriptions():
    assert {"exact_match", "math_verify", "format", "length"} <= set(REWARDS.entries)
    for variant in REWARDS:
        assert variant.description


# -- exact_match --------------------------------------------------------------------------------------------------


def test_exact_match_plain_strings_auto_extraction():
    reward = build_one("exact_match")
    completions = [
        "so the answer is 42.",  # after "answer is": "42"
        "I think 41",  # last number 41 != 42
        "first \\boxed{7}, then 8",  # the boxed content wins over the last number
        "Answer: Paris\nthat's all",  # rest of the line, case-folded
        "no digits here",  # whole text
        "",  # nothing to extract
    ]
    answers = ["42", "42", "7", "paris", "No digits here", "x"]
    assert reward(completions, answer=answers, prompts=["p"] * 6, completion_ids=[[1]] * 6, **TRL_EXTRAS) == [
        1.0, 0.0, 1.0, 1.0, 1.0, 0.0,
    ]


def test_exact_match_auto_with_list_like_and_numeric_answers():
    """A reference that is not one number is matched against the whole answer, never the last number in it."""
    reward = build_one("exact_match")
    completions = [
        "3 4 9",  # a sorted list: the whole completion
        "  3 4 9\n",  # surrounding whitespace stripped
        "Answer: 3 4 9",  # after the marker
        "\\boxed{3 4 9}",  # boxed
        "3 9 4",  # wrong order
        "9",  # the last number of the right answer is not the answer
        "The sum is 83",  # numeric reference: the last number
        "83.0",  # numbers compare by value
        "The sum is 38",
    ]
    answers = ["3 4 9"] * 6 + ["83"] * 3
    assert reward(completions, answer=answers) == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0]


def test_exact_match_conversational_uses_last_message():
    reward = build_one("exact_match")
    completions = [
        [{"role": "assistant", "content": "the answer is 3"}, {"role": "assistant", "content": "no wait, 12"}],
        assistant("\\boxed{12}"),
        assistant("13"),
    ]
    assert reward(completions, answer=["12", "12", "12"]) == [1.0, 1.0, 0.0]


@pytest.mark.parametrize(
    "extract, text, expected",
    [
        ("auto", "so \\boxed{\\frac{1}{2}} done", "\\frac{1}{2}"),  # nested braces
        ("auto", "The final answer is $42$.", "42"),
        ("auto", "answer: **-3**", "-3"),
        ("auto", "costs 1,234.5 dollars for 3 things", "3"),
        ("auto", "   only words   ", "only words"),
        ("boxed", "a \\boxed{1} b \\boxed{2}", "2"),
        ("boxed", "no box here", None),
        ("boxed", "unclosed \\boxed{12", None),
        ("last_number", "from 10 to 1,000", "1,000"),
        ("last_number", "x-5 is -2", "-2"),
        ("last_number", "no numbers", None),
        ("full", "  Paris \n", "Paris"),
        ("full", "   ", None),
        ("re:#### (\\d+)", "work ... #### 72", "72"),
        ("re:#### (\\d+)", "no marker 72", None),
    ],
)
def test_exact_match_parse(extract, text, expected):
    assert build_one("exact_match", extract=extract).parse(text) == expected


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        ("Answer: 85.0", "85", 1.0),
        ("Answer: 1,000", "1000", 1.0),
        ("Answer: 85.01", "85", 0.0),
        ("Answer: -0.50", "-.5", 1.0),
    ],
)
def test_exact_match_compares_numbers_by_value(completion, answer, expected):
    assert build_one("exact_match")([completion], answer=[answer]) == [expected]


def test_exact_match_options():
    assert build_one("exact_match", case_sensitive=True)(["Answer: Paris"], answer=["paris"]) == [0.0]
    assert build_one("exact_match", answer_column="gold")(["Answer: 3"], gold=["3"]) == [1.0]
    assert build_one("exact_match", extract="boxed")(["the answer is 4"], answer=["4"]) == [0.0]
    # a list of references: any matches; None never matches
    assert build_one("exact_match")(["Answer: 4", "Answer: 4"], answer=[["3", "4"], None]) == [1.0, 0.0]


def test_exact_match_bad_extract_is_a_spec_error():
    with pytest.raises(RewardSpecError, match="unknown extract 'boxd'"):
        build_one("exact_match", extract="boxd")
    with pytest.raises(RewardSpecError, match="does not compile"):
        build_one("exact_match", extract="re:(unclosed")


# -- math_verify --------------------------------------------------------------------------------------------------


def test_math_verify_equivalent_forms_and_wrong_answer():
    reward = build_one("math_verify")
    completions = [
        "so \\boxed{\\frac{1}{2}}",
        "so \\boxed{\\frac{1}{2}}",
        "The final answer is $\\frac{1}{3}$",
        "I have no idea",
        assistant("The answer is \\boxed{x^2+1}"),
    ]
    answers = ["0.5", "1/2", "0.5", "0.5", "1 + x^2"]
    assert reward(completions, answer=answers, completion_ids=[[0]] * 5, **TRL_EXTRAS) == [1.0, 1.0, 0.0, 0.0, 1.0]


def test_math_verify_parse():
    reward = build_one("math_verify")
    assert reward.parse("so \\boxed{\\frac{1}{2}}") == "1/2"
    assert reward.parse("I have no idea") is None


# -- format -------------------------------------------------------------------------------------------------------


def test_format_search_and_fullmatch():
    search = build_one("format", pattern=r"^<think>.*</think>")
    assert search(["<think>a\nb</think> 5", "5 <think>a</think>"], **TRL_EXTRAS) == [1.0, 0.0]
    fullmatch = build_one("format", pattern=r"<answer>\d+</answer>", mode="fullmatch", score=0.5)
    assert fullmatch(["<answer>5</answer>", "x <answer>5</answer>", assistant("<answer>7</answer>")]) == [
        0.5, 0.0, 0.5,
    ]


def test_format_bad_mode_and_pattern():
    with pytest.raises(RewardSpecError, match="unknown mode 'match'"):
        build_one("format", pattern="x", mode="match")
    with pytest.raises(RewardSpecError, match="does not compile"):
        build_one("format", pattern="(")


# -- length -------------------------------------------------------------------------------------------------------


def test_length_max_length():
    reward = build_one("length", max_length=10)
    assert reward(["a" * 5, "a" * 10, "a" * 15, assistant("a" * 30)], **TRL_EXTRAS) == [0.0, 0.0, -0.5, -2.0]
    assert build_one("length", max_length=10, scale=2.0)(["a" * 30]) == [-4.0]


def test_length_target():
    reward = build_one("length", target=10)
    assert reward(["a" * 5, "a" * 10, "a" * 20]) == [-0.5, 0.0, -1.0]


@pytest.mark.parametrize("args", [{}, {"target": 10, "max_length": 10}])
def test_length_needs_exactly_one_of_target_and_max_length(args):
    with pytest.raises(RewardSpecError, match="exactly one of target or max_length"):
        build_one("length", **args)


def test_length_only_counts_chars():
    with pytest.raises(RewardSpecError, match="only 'chars'"):
        build_one("length", max_length=10, unit="tokens")


# -- build_rewards ------------------------------------------------------------------------------------------------


def test_build_rewards_weights_and_aliases():
    rewards, weights = build_rewards(
        [
            {"name": "exact_match", "weight": 2},
            {"name": "format", "args": {"pattern": "x"}, "alias": "has_x"},
            {"name": "length", "args": {"max_length": 5}, "weight": -0.5, "fn": None, "alias": None},
        ]
    )
    assert [r.name for r in rewards] == ["exact_match", "has_x", "length"]
    assert [r.__name__ for r in rewards] == ["exact_match", "has_x", "length"]
    assert weights == [2.0, 1.0, -0.5]
    assert all(isinstance(r, RewardFunction) for r in rewards)
    assert hasattr(rewards[0], "parse") and not hasattr(rewards[1], "parse")


def test_a_mistyped_arg_is_refused_naming_the_reward_and_the_arg():
    """The args' types come from the signature of the reward's __init__ (REWARDS.check_params)."""
    for spec, message in [
        ({"name": "exact_match", "args": {"answer_column": 3}},
         r"^parameter 'answer_column' of reward 'exact_match' \(rewards\[0\]\) must be str, got int 3$"),
        ({"name": "code_exec", "args": {"memory_mb": "lots"}}, r"'memory_mb' of reward 'code_exec'.*must be int"),
        ({"name": "math_verify", "args": {"extract": 3}}, r"'extract' of reward 'math_verify'.*list of str \| str"),
        ({"name": "format", "args": {"pattern": "x", "score": "high"}}, r"'score' of reward 'format'.*must be float"),
        ({"name": "llm_judge", "args": {"model": "tiny", "chat": "yes"}}, r"'chat' of reward 'llm_judge'.*bool"),
    ]:
        with pytest.raises(RewardSpecError, match=message):
            build_rewards([spec])


def test_every_builtin_reward_default_fits_its_own_types():
    from postrain.value_types import check_value

    for variant in REWARDS:
        assert variant.data == {}, variant.name  # every parameter is an arg: keyword-only
        types = variant.param_types
        for name, default in variant.params.items():
            if default is not None:
                value = list(default) if isinstance(default, tuple) else default  # a recipe writes a list
                check_value(value, types[name], variant.ranges.get(name), f"reward {variant.name} {name}")


README_REWARD_MODULE = "postrain_readme_reward"


def test_a_reward_added_with_one_decorator_is_used_by_a_recipe(tmp_path, monkeypatch):
    """The README's "Adding a reward" example, as written there, in a module of its own: registered by importing
    it, then used from a recipe's rewards entry through build_rewards (the jobs' path), nothing else edited."""
    from tests.conftest import readme_example

    monkeypatch.setattr(REWARDS, "entries", dict(REWARDS.entries))  # the registration is undone after the test
    (tmp_path / f"{README_REWARD_MODULE}.py").write_text(readme_example("### Adding a reward"))
    monkeypatch.syspath_prepend(str(tmp_path))  # the worker process gets this sys.path: it unpickles the class
    importlib.import_module(README_REWARD_MODULE)
    try:
        assert "brevity" in REWARDS
        recipe_rewards = [{"name": "brevity", "args": {"max_chars": 3}, "weight": 0.5}, {"name": "exact_match"}]
        (brevity, _), weights = build_rewards(recipe_rewards)
        assert brevity.name == "brevity" and weights == [0.5, 1.0]
        assert brevity(["abc", "abcd", assistant("ab")], answer=["x"] * 3, **TRL_EXTRAS) == [1.0, 0.0, 1.0]
        brevity.close()
        for args, message in [({"max_char": 3}, "unknown arg 'max_char'.*did you mean 'max_chars'"),
                              ({"max_chars": "short"}, r"'max_chars' of reward 'brevity' \(rewards\[0\]\) must be int"),
                              ({"max_chars": 0}, r"'max_chars' of reward 'brevity' .* must be > 0, got 0")]:
            with pytest.raises(RewardSpecError, match=message):
                build_rewards([{"name": "brevity", "args": args}])
    finally:
        sys.modules.pop(README_REWARD_MODULE, None)


def test_build_rewards_duplicate_logging_name():
    with pytest.raises(RewardSpecError, match="'format' is already used by rewards\\[0\\]"):
        build_rewards([{"name": "format", "args": {"pattern": "a"}}, {"name": "format", "args": {"pattern": "b"}}])


def test_user_function_from_file(tmp_path):
    (tmp_path / "r.py").write_text(
        textwrap.dedent(
            """
            def brevity(completions, **kwargs):
                return [1.0 if len(c) < 5 else 0.0 for c in completions]
            """
        )
    )
    rewards, weights = build_rewards([{"fn": f"{tmp_path / 'r.py'}:brevity", "weight": 0.1}])
    assert rewards[0].name == "brevity"
    assert weights == [0.1]
    assert rewards[0](["abc", "abcdefg"], completion_ids=[[1], [2]], **TRL_EXTRAS) == [1.0, 0.0]
    assert not hasattr(rewards[0], "parse")
    # a relative path resolves against base_dir
    relative, _ = build_rewards([{"fn": "r.py:brevity", "alias": "short"}], base_dir=tmp_path)
    assert relative[0].name == "short"
    assert relative[0](["abc"]) == [1.0]


def test_user_function_from_module(tmp_path, monkeypatch):
    (tmp_path / "postrain_test_reward_module.py").write_text(
        "def mentions_answer(completions, answer, **kwargs):\n"
        "    return [float(a in c) for c, a in zip(completions, answer)]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    rewards, _ = build_rewards([{"fn": "postrain_test_reward_module:mentions_answer"}])
    assert rewards[0].name == "mentions_answer"
    assert rewards[0](["it is 4", "it is 5"], answer=["4", "4"], **TRL_EXTRAS) == [1.0, 0.0]


def test_misspelt_name_suggests_the_builtin():
    with pytest.raises(RewardSpecError) as error:
        build_rewards([{"name": "exact_mach"}])
    assert str(error.value).startswith(
        "unknown reward 'exact_mach' (rewards[0]); did you mean 'exact_match'? "
        "available: code_exec, exact_match, format, length, llm_judge, math_verify"
    )
    with pytest.raises(RewardSpecError, match=r"^unknown reward 'zzz' \(rewards\[1\]\); available: code_exec"):
        build_rewards([{"name": "format", "args": {"pattern": "x"}}, {"name": "zzz"}])


@pytest.mark.parametrize(
    "spec, expected",
    [
        (
            {"name": "format", "args": {"patern": "x"}},
            "unknown arg 'patern'.*did you mean 'pattern'.*valid args: pattern, score, mode",
        ),
        ({"name": "format"}, "needs arg 'pattern'"),
        ({}, "rewards\\[0\\]: give exactly one of 'name'.*got neither"),
        ({"name": "format", "fn": "m:f"}, "got both"),
        ({"name": "length", "wieght": 2}, "unknown key 'wieght'; did you mean 'weight'"),
        ({"name": "length", "args": {"max_length": 3}, "weight": "high"}, "weight must be a number"),
        ({"fn": "no_such_module_xyz:f"}, "module 'no_such_module_xyz' not found"),
        ({"fn": "no_colon_here"}, "must be 'package.module:function'"),
        ({"fn": "missing_dir/r.py:f"}, "file .*missing_dir/r.py' not found"),
        ({"fn": "json:lods"}, "'json' has no attribute 'lods'.*did you mean 'loads'"),
        ({"fn": "json:loads", "args": {"x": 1}}, "args are for built-in rewards only"),
    ],
)
def test_spec_errors_name_the_bad_part(spec, expected):
    with pytest.raises(RewardSpecError, match=expected):
        build_rewards([spec])


def test_spec_error_is_a_value_error():
    assert issubclass(RewardSpecError, ValueError)


def test_user_function_signature_checks(tmp_path):
    (tmp_path / "bad.py").write_text(
        "def no_kwargs(completions):\n    return [0.0]\n"
        "async def later(completions, **kwargs):\n    return [0.0]\n"
        "raise_on_import = False\n"
    )
    with pytest.raises(RewardSpecError, match="must accept \\*\\*kwargs"):
        build_rewards([{"fn": f"{tmp_path / 'bad.py'}:no_kwargs"}])
    with pytest.raises(RewardSpecError, match="is async"):
        build_rewards([{"fn": f"{tmp_path / 'bad.py'}:later"}])
    (tmp_path / "broken.py").write_text("import no_such_dependency_xyz\n")
    with pytest.raises(RewardSpecError, match="importing file .*ModuleNotFoundError"):
        build_rewards([{"fn": f"{tmp_path / 'broken.py'}:f"}])


# -- error policy -------------------------------------------------------------------------------------------------


@pytest.fixture
def fragile_fn(tmp_path):
    """A batch reward that raises on any completion containing "boom" and checks its columns stay aligned."""
    (tmp_path / "fragile.py").write_text(
        textwrap.dedent(
            """
            def fragile(completions, answer, trainer_state, **kwargs):
                assert len(answer) == len(completions) == len(kwargs["completion_ids"])
                assert trainer_state == "state"
                if any("boom" in c for c in completions):
                    raise ZeroDivisionError("boom in batch")
                return [float(c == a) for c, a in zip(completions, answer)]
            """
        )
    )
    return f"{tmp_path / 'fragile.py'}:fragile"


def call_fragile(reward):
    return reward(
        ["4", "boom", "5"], answer=["4", "4", "4"], completion_ids=[[1], [2], [3]], trainer_state="state"
    )


def test_on_error_fail_raises_naming_the_reward(fragile_fn):
    (reward,), _ = build_rewards([{"fn": fragile_fn, "alias": "fragile_reward"}], on_error="fail")
    assert reward(["4"], answer=["4"], completion_ids=[[1]], trainer_state="state") == [1.0]
    with pytest.raises(RuntimeError, match="reward 'fragile_reward' raised ZeroDivisionError: boom in batch"):
        call_fragile(reward)


def test_on_error_score_scores_only_the_bad_completion(fragile_fn):
    (reward,), _ = build_rewards([{"fn": fragile_fn}], on_error="score", error_score=-1.0)
    assert call_fragile(reward) == [1.0, -1.0, 0.0]
    assert reward.calls == 1 and reward.errors == 1
    assert reward.pop_error_count() == 1
    assert reward.pop_error_count() == 0
    assert reward(["4"], answer=["4"], completion_ids=[[1]], trainer_state="state") == [1.0]
    assert reward.pop_error_count() == 0
    assert reward.calls == 2 and reward.errors == 1


def test_wrong_number_of_scores_is_an_error(tmp_path):
    (tmp_path / "short.py").write_text("def one(completions, **kwargs):\n    return [1.0]\n")
    (reward,), _ = build_rewards([{"fn": f"{tmp_path / 'short.py'}:one"}])
    with pytest.raises(RuntimeError, match="returned 1 scores for 2 completions"):
        reward(["a", "b"])


def test_builtin_missing_answer_column_fails_clearly():
    (reward,), _ = build_rewards([{"name": "exact_match"}])
    with pytest.raises(RuntimeError, match="needs the dataset column 'answer'.*columns present: gold"):
        reward(["4"], gold=["4"], **TRL_EXTRAS)


def test_rewards_pickle_and_user_functions_are_reimported(fragile_fn, monkeypatch, tmp_path):
    specs = [
        {"name": "exact_match", "args": {"extract": "re:#### (\\d+)"}},
        {"name": "math_verify"},
        {"fn": fragile_fn, "alias": "fragile"},
    ]
    rewards, _ = build_rewards(specs, on_error="score")
    monkeypatch.chdir(tmp_path)  # pickles carry absolute paths
    copies = pickle.loads(pickle.dumps(rewards))
    assert copies[0](["#### 7"], answer=["7"]) == [1.0]
    assert copies[0].parse("#### 7") == "7"
    assert copies[1].parse("\\boxed{3}") == "3"
    assert call_fragile(copies[2]) == [1.0, 0.0, 0.0]
    assert copies[2].pop_error_count() == 1
