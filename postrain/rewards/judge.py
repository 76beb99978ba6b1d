"""`llm_judge`: a language model scores each response with an LLM-as-a-judge prompt (Self-Rewarding Language Models,
arXiv 2401.10020, Figure 2: an additive 5-point rubric, the judgment ending "Score: <total points>").

The judge is any model postrain loads (`tiny`, a run directory, a local folder, a hub id); in a self-rewarding
pipeline it is the model being trained, M_t, the same stage output the responses were sampled from. It is loaded
once, on the first batch (so building the reward, e.g. for --dry-run, loads nothing), and generates greedily. The
score is the number after the last "Score:" of the judgment. A judgment without one, or with a score outside
[0, max_score], gives no score (None), not 0: eval records it as null in the sample's `rewards`, `pairing.score:
rewards.llm_judge` leaves such samples out of the pairs, and the fraction is reported as the reward metric
`llm_judge/unparsable`. (The weighted `score` column of eval's samples.jsonl counts None as 0, as TRL's GRPO sums
rewards; read `rewards.llm_judge` where an unscored sample must not count as a bad one.)
"""

from __future__ import annotations

import re
from typing import Any

from postrain.models.generation import generate
from postrain.models import loading as model_loading  # load_model through it: tests replace it there
from postrain.rewards.registry import REWARDS, RewardFunction, RewardSpecError, completion_text

# Yuan et al. 2024 (arXiv 2401.10020), Figure 2, verbatim but for the placeholders {prompt} and {response}.
SELF_REWARDING_PROMPT = """Review the user's question and the corresponding response using the additive 5-point \
scoring system described below. Points are accumulated based on the satisfaction of each criterion:
- Add 1 point if the response is relevant and provides some information related to the user's inquiry, even if it \
is incomplete or contains some irrelevant content.
- Add another point if the response addresses a substantial portion of the user's question, but does not \
completely resolve the query or provide a direct answer.
- Award a third point if the response answers the basic elements of the user's question in a useful way, \
regardless of whether it seems to have been written by an AI Assistant or if it has elements typically found in \
blogs or search results.
- Grant a fourth point if the response is clearly written from an AI Assistant's perspective, addressing the \
user's question directly and comprehensively, and is well-organized and helpful, even if there is slight room for \
improvement in clarity, conciseness or focus.
- Bestow a fifth point for a response that is impeccably tailored to the user's question by an AI Assistant, \
without extraneous information, reflecting expert knowledge, and demonstrating a high-quality, engaging, and \
insightful answer.

User: {prompt}

<response>{response}</response>

After examining the user's instruction and the response:
- Briefly justify your total score, up to 100 words.
- Conclude with the score using the format: "Score: <total points>"

Remember to assess from the AI Assistant perspective, utilizing web search knowledge as necessary. To evaluate the \
response in alignment with this additive scoring model, we'll systematically attribute points based on the \
outlined criteria."""

# "Score: 4", "score: 3.5", "**Score:** 5", "Score = 2"; the number after the last such marker counts.
_SCORE = re.compile(r"score\s*\**\s*[:=]\s*\**\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)


def parse_judge_score(judgment: str, max_score: float = 5.0) -> float | None:
    """The score a judgment ends with ("Score: N", the last one if it gives several), or None when it has none or
    N is outside [0, max_score] (an additive rubric cannot give it, so the judgment is not trusted)."""
    found = _SCORE.findall(judgment or "")
    if not found:
        return None
    score = float(found[-1])
    return score if 0.0 <= score <= max_score else None


@REWARDS.register("llm_judge", paper="Self-Rewarding Language Models", arxiv="2401.10020",
                  source="Self-Rewarding Language Models, arXiv 2401.10020, Figure 2")
class LLMJudge(RewardFunction):
    """Score = the judge model's "Score: N" for the (prompt, response), None when it gives none in [0, max_score].

    `model`: the judge, a model reference (`tiny`, a run directory, a path, a hub id) or a mapping of `model:` keys
    (name_or_path, dtype, tiny, ...). `prompt`: the judge's instructions, with the placeholders {prompt} (the user's
    last turn) and {response} (literal braces doubled); default the Self-Rewarding paper's. `max_score`: the top
    of the rubric. `chat`: wrap the judge prompt as a user turn (the judge's chat template applies). Greedy
    decoding, `max_new_tokens` per judgment, `batch_size` judgments at a time. It runs in the training process, not
    in a worker (a worker would load a second copy of the judge), so no wall-clock limit applies to it.
    """

    runs_in_worker = False

    def __init__(self, *, model: str | dict, prompt: str = SELF_REWARDING_PROMPT, max_score: float = 5.0,
                 max_new_tokens: int = 256, batch_size: int = 8, chat: bool = True):
        super().__init__()
        if isinstance(model, str):
            model = {"name_or_path": model}
        if not isinstance(model, dict) or not isinstance(model.get("name_or_path"), str) or not model["name_or_path"]:
            raise RewardSpecError(f"llm_judge: model must be a model reference or a mapping with name_or_path, "
                                  f"got {model!r}")
        try:
            prompt.format(prompt="", response="")
        except (KeyError, IndexError, ValueError) as error:
            raise RewardSpecError(f"llm_judge: prompt may use only the placeholders {{prompt}} and {{response}} "
                                  f"(double other braces): {error!r}") from None
        if "{response}" not in prompt:
            raise RewardSpecError("llm_judge: prompt must contain {response}, where the judged response goes")
        if not max_score > 0 or max_new_tokens < 1 or batch_size < 1:
            raise RewardSpecError(f"llm_judge: max_score must be > 0 and max_new_tokens, batch_size >= 1; got "
                                  f"{max_score}, {max_new_tokens}, {batch_size}")
        self.model_spec = {"dtype": "auto", **model}
        self.prompt, self.max_score, self.chat = prompt, float(max_score), chat
        self.generation = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "num_samples": 1,
                           "do_sample": False}
        self._judge = None  # (model, tokenizer), loaded on the first call

    def __getstate__(self) -> dict:  # a pickled reward (TRL's rollout worker) loads its own judge
        return {**self.__dict__, "_judge": None}

    def judge(self):
        if self._judge is None:

            model, tokenizer, _ = model_loading.load_model(self.model_spec)
            self._judge = (model, tokenizer)
        return self._judge

    def judge_inputs(self, prompts: list, completions: list) -> list:
        texts = [self.prompt.format(prompt=completion_text(p), response=completion_text(c))
                 for p, c in zip(prompts, completions)]
        return [[{"role": "user", "content": t}] for t in texts] if self.chat else texts

    def __call__(self, completions: list, prompts: list | None = None, log_extra=None, log_metric=None,
                 **columns: Any) -> list[float | None]:
        if prompts is None:
            raise ValueError("llm_judge needs the prompts (passed as `prompts` by eval and GRPO)")
        model, tokenizer = self.judge()
        judgments = [samples[0] for samples in generate(model, tokenizer, self.judge_inputs(prompts, completions),
                                                         self.generation)]
        scores = [parse_judge_score(j, self.max_score) for j in judgments]
        if log_extra is not None:
            log_extra(f"{self.name}_judgment", judgments)
        if log_metric is not None and scores:
            log_metric(f"{self.name}/unparsable", sum(s is None for s in scores) / len(scores))
        return scores
