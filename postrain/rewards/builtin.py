"""The built-in rewards: exact_match, math_verify, format, length (code_exec: postrain.rewards.code_exec).

Each is a RewardFunction class registered under its recipe name with ``@REWARDS.register``; the keyword-only
parameters of its constructor are the recipe's ``args``, typed by their annotations. Built-ins do not raise on odd
completions (they score them 0.0); they raise only on misuse, such as a missing answer column.
"""

from __future__ import annotations

import functools
import re
import threading
from decimal import Decimal
from typing import Any

from postrain.rewards.registry import (
    REWARDS,
    RewardFunction,
    RewardSpecError,
    completion_text,
    missing_column_message,
)

# -- answer extraction (exact_match) ----------------------------------------------------------------------------

# A number, with optional thousands commas ("1,000"), decimals and a sign; a minus right after a word character
# or ")" is a subtraction, not a sign.
_NUMBER_IN_TEXT = re.compile(r"(?:(?<![\w)])-)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")
_WHOLE_NUMBER = re.compile(r"[+-]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+)")
_ANSWER_MARKER = re.compile(r"\banswer\s*(?::|is\b)", re.IGNORECASE)
_BOXED = "\\boxed{"


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (braces balanced), or None if there is none or it is unclosed."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth = 0
    content_start = start + len(_BOXED)
    for index in range(content_start, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            if depth == 0:
                return text[content_start:index]
            depth -= 1
    return None


def after_answer_marker(text: str) -> str | None:
    """The rest of the line after the last "Answer:" / "answer is", without surrounding ``$``, ``*`` and a
    trailing full stop; None when there is no marker or nothing follows it."""
    markers = list(_ANSWER_MARKER.finditer(text))
    if not markers:
        return None
    rest = text[markers[-1].end() :].lstrip(" \t\n:")
    line = rest.split("\n", 1)[0].strip()
    line = line.strip("*").strip().rstrip(".").strip()
    if len(line) >= 2 and line.startswith("$") and line.endswith("$"):
        line = line.strip("$").strip()
    return line or None


def last_number(text: str) -> str | None:
    """The last number in the text, as written ("1,000", "-3.5"), or None."""
    numbers = _NUMBER_IN_TEXT.findall(text)
    return numbers[-1] if numbers else None


def as_number(text: str) -> Decimal | None:
    """The value of a string that is exactly a number (thousands commas allowed), else None."""
    text = text.strip()
    if not _WHOLE_NUMBER.fullmatch(text):
        return None
    return Decimal(text.replace(",", ""))


class RegexExtractor:
    """The last match of a regex: its group if it has one, else the whole match (a class, to stay picklable)."""

    def __init__(self, pattern: str):
        try:
            self.regex = re.compile(pattern)
        except re.error as error:
            raise RewardSpecError(f"extract regex {pattern!r} does not compile: {error}") from None
        if self.regex.groups > 1:
            raise RewardSpecError(f"extract regex {pattern!r} must have at most one group, it has {self.regex.groups}")

    def __call__(self, text: str) -> str | None:
        matches = list(self.regex.finditer(text))
        return matches[-1].group(self.regex.groups) if matches else None


def _auto_extract(text: str) -> str | None:
    for extract in (last_boxed, after_answer_marker, last_number):
        answer = extract(text)
        if answer is not None and answer.strip():
            return answer
    return text


def _is_numeric_reference(reference: Any) -> bool:
    """Whether a reference (or every one of a list of accepted references) is a single number."""
    if isinstance(reference, (list, tuple)):
        return bool(reference) and all(_is_numeric_reference(one) for one in reference)
    return reference is not None and as_number(str(reference)) is not None


def _whole_text(text: str) -> str:
    return text


_EXTRACTORS = {"auto": _auto_extract, "boxed": last_boxed, "last_number": last_number, "full": _whole_text}


def _reference_column(columns: dict[str, Any], column: str, reward_name: str, count: int) -> list:
    if column not in columns:
        available = sorted(key for key, value in columns.items() if isinstance(value, (list, tuple)))
        raise ValueError(missing_column_message(reward_name, column, available))
    references = columns[column]
    if len(references) != count:
        raise ValueError(f"column {column!r} has {len(references)} values for {count} completions")
    return list(references)


@REWARDS.register("exact_match")
class ExactMatch(RewardFunction):
    """Scores 1.0 when the answer extracted from the completion equals the reference answer, else 0.0.

    ``extract`` picks how the answer is found in the completion:

    - ``"auto"``: the content of the last ``\\boxed{...}``; else the rest of the line after the last "Answer:" /
      "answer is"; else, when the reference is a single number, the last number; else the whole text. So a
      reference that is not a number ("3 4 9") is never compared with the completion's last number.
    - ``"boxed"``, ``"last_number"``: only that strategy. ``"full"``: the whole text.
    - ``"re:<regex>"``: the last match of the regex (its group, if it has one).

    The reference comes from the ``answer_column`` dataset column (a list of references: any of them matches; None
    never matches). Answer and reference are compared with surrounding whitespace stripped (``strip``) and
    case-folded unless ``case_sensitive``; when both are numbers they compare by value ("85" == "85.0",
    "1,000" == "1000"). An unparsable completion scores 0.0.
    """

    def __init__(
        self, *, answer_column: str = "answer", extract: str = "auto", strip: bool = True, case_sensitive: bool = False
    ):
        super().__init__()
        if not isinstance(extract, str):
            raise RewardSpecError(f"extract must be a string, got {extract!r}")
        if extract.startswith("re:"):
            self._extract = RegexExtractor(extract[3:])
        elif extract in _EXTRACTORS:
            self._extract = _EXTRACTORS[extract]
        else:
            raise RewardSpecError(
                f"unknown extract {extract!r}; use one of {', '.join(_EXTRACTORS)} or 're:<regex with one group>'"
            )
        self.answer_column = answer_column
        self.columns = (answer_column,)
        self.extract = extract
        self.strip = strip
        self.case_sensitive = case_sensitive

    def parse(self, text: str) -> str | None:
        """The answer extracted from ``text``, or None when there is none (or it is empty)."""
        answer = self._extract(text)
        if answer is None:
            return None
        if self.strip:
            answer = answer.strip()
        return answer if answer.strip() else None

    def matches(self, answer: str, reference: Any) -> bool:
        if reference is None:
            return False
        if isinstance(reference, (list, tuple)):
            return any(self.matches(answer, one) for one in reference)
        reference = str(reference)
        if self.strip:
            reference = reference.strip()
        answer_number, reference_number = as_number(answer), as_number(reference)
        if answer_number is not None and reference_number is not None:
            return answer_number == reference_number
        if not self.case_sensitive:
            return answer.casefold() == reference.casefold()
        return answer == reference

    def equivalent(self, first: str, second: str) -> bool:
        """Whether two completions give the same answer (eval's majority vote groups by this): both parse, and
        the answers match as an answer matches a reference (numbers by value, case-folded unless
        ``case_sensitive``)."""
        a, b = self.parse(first), self.parse(second)
        return a is not None and b is not None and self.matches(a, b)

    def answer_for(self, text: str, reference: Any) -> str | None:
        """The answer to compare with ``reference``. Under ``auto`` a reference that is not a single number
        ("3 4 9", "Paris") is compared with the boxed answer, the text after an answer marker, or the whole
        completion: never with the completion's last number, which would score a right answer 0."""
        if self.extract != "auto" or _is_numeric_reference(reference):
            return self.parse(text)
        for extract in (last_boxed, after_answer_marker):
            answer = extract(text)
            if answer is not None and answer.strip():
                return answer.strip() if self.strip else answer
        return (text.strip() if self.strip else text) or None

    def __call__(self, completions: list, **columns: Any) -> list[float]:
        references = _reference_column(columns, self.answer_column, self.name, len(completions))
        scores = []
        for completion, reference in zip(completions, references):
            answer = self.answer_for(completion_text(completion), reference)
            scores.append(1.0 if answer is not None and self.matches(answer, reference) else 0.0)
        return scores


# -- math_verify --------------------------------------------------------------------------------------------------

_MATH_VERIFY_TIMEOUT_SECONDS = 5


def _math_verify_timeout() -> int | None:
    """math_verify times out with SIGALRM, which only works in the main thread: no timeout elsewhere."""
    return _MATH_VERIFY_TIMEOUT_SECONDS if threading.current_thread() is threading.main_thread() else None


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> tuple:
    """Parse a gold answer; a bare one ("0.5", "x^2+1", "\\frac{1}{2}") is read as LaTeX math ``$...$``."""
    # optional: math_verify
    from math_verify import parse

    timeout = _math_verify_timeout()
    parsed = []
    if "$" not in gold and "\\boxed" not in gold:
        parsed = parse(f"${gold}$", parsing_timeout=timeout)
    if not parsed:
        parsed = parse(gold, parsing_timeout=timeout)
    return tuple(parsed)


_EXTRACTION_TARGETS = ("latex", "expr")


def _extraction_config(targets: tuple[str, ...], require_anchor: bool) -> list | None:
    """math_verify's extraction config for the given targets; None (math_verify's own default: LaTeX and plain
    expressions, no anchor required) for the default arguments, so that default behaviour is math_verify's."""
    if targets == ("latex", "expr") and not require_anchor:
        return None
    # optional: math_verify
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    configs = {"latex": LatexExtractionConfig, "expr": ExprExtractionConfig}
    return [configs[target](try_extract_without_anchor=not require_anchor) for target in targets]


# Parsed completions, shared by scoring, `parse` and `equivalent` (eval's vote parses each sample's text again).
@functools.lru_cache(maxsize=16384)
def _parse_answer(text: str, targets: tuple[str, ...], require_anchor: bool) -> tuple:
    # optional: math_verify
    from math_verify import parse

    config = _extraction_config(targets, require_anchor)
    extra = {} if config is None else {"extraction_config": config}
    return tuple(parse(text, parsing_timeout=_math_verify_timeout(), **extra))


# A vote compares each sample with every bucket's first answer, and the same pairs of values recur across samples
# and prompts; comparing values of different kinds (an interval and a number) costs sympy tens of milliseconds.
@functools.lru_cache(maxsize=65536)
def _verify_parsed(gold: tuple, target: tuple) -> bool:
    # optional: math_verify
    from math_verify import verify

    return verify(list(gold), list(target), timeout_seconds=_math_verify_timeout())


@REWARDS.register("math_verify",
                  source="huggingface/Math-Verify (the math_verify package), as TRL's accuracy_reward uses it")
class MathVerify(RewardFunction):
    """Scores 1.0 when the completion's final answer is mathematically equivalent to the gold answer, else 0.0.

    Uses the ``math_verify`` package: the completion's answer is parsed (a ``\\boxed{}``, "final answer is ...",
    LaTeX or a plain expression) and compared with the gold answer from the ``answer_column`` column, so
    ``\\boxed{\\frac{1}{2}}`` matches gold "0.5" or "1/2". A gold answer without ``$`` or ``\\boxed`` is read as
    LaTeX math. A completion (or gold) with no parseable answer scores 0.0. Parsing and comparison time out
    after 5 s in the main thread, which is where it runs: in its worker process (postrain.rewards.worker); called
    from another thread (where math_verify's SIGALRM timeout cannot work) there is no such timeout.

    Extraction from the completion (math_verify's extraction configs):

    - ``extract``: what to look for, ``latex`` (``$...$``, ``\\boxed{}``, ``\\[...\\]``) and/or ``expr`` (plain
      expressions such as ``1/2``); default both.
    - ``require_anchor``: only answers marked as final (``\\boxed{}``, "final answer is ...", "answer is ...")
      count; by default math_verify falls back to the last expression in the text.

    ``equivalent(first, second)``, whether two completions give the same answer, is what eval's majority vote
    groups by: "1/2", "0.5" and "\\frac{1}{2}" are one answer; intervals and sets compare as such.
    """

    def __init__(
        self,
        *,
        answer_column: str = "answer",
        extract: list[str] | str = ("latex", "expr"),
        require_anchor: bool = False,
    ):
        super().__init__()
        # optional: math_verify
        import math_verify  # noqa: F401  (fail at build time, not at the first batch, if it is missing)

        targets = (extract,) if isinstance(extract, str) else tuple(extract)
        unknown = [target for target in targets if target not in _EXTRACTION_TARGETS]
        if unknown or not targets:
            raise RewardSpecError(
                f"unknown extract {unknown[0] if unknown else '[]'!r}; use a list of {', '.join(_EXTRACTION_TARGETS)}"
            )
        if not isinstance(require_anchor, bool):
            raise RewardSpecError(f"require_anchor must be true or false, got {require_anchor!r}")
        self.answer_column = answer_column
        self.columns = (answer_column,)
        self.extract = targets
        self.require_anchor = require_anchor

    def _parse_completion(self, text: str) -> list:
        return list(_parse_answer(text, self.extract, self.require_anchor))

    def equivalent(self, first: str, second: str) -> bool:
        """Whether two completions (or bare answers) give the same final answer: both parse, and math_verify
        verifies the second against the first as the gold answer."""
        a = _parse_answer(first, self.extract, self.require_anchor)
        b = _parse_answer(second, self.extract, self.require_anchor)
        if not (a and b):
            return False
        try:
            return _verify_parsed(a, b)
        except TypeError:  # an unhashable answer (a mutable sympy Matrix) cannot be a cache key
            return _verify_parsed.__wrapped__(a, b)

    def parse(self, text: str) -> str | None:
        """The first value math_verify parses from ``text``, as a string; None when it finds no answer."""
        parsed = self._parse_completion(text)
        return str(parsed[0]) if parsed else None

    def __call__(self, completions: list, **columns: Any) -> list[float]:
        # optional: math_verify
        from math_verify import verify

        references = _reference_column(columns, self.answer_column, self.name, len(completions))
        scores = []
        for completion, reference in zip(completions, references):
            gold = _parse_gold(str(reference)) if reference is not None else ()
            answer = self._parse_completion(completion_text(completion))
            equivalent = bool(gold and answer) and verify(
                list(gold), answer, timeout_seconds=_math_verify_timeout()
            )
            scores.append(1.0 if equivalent else 0.0)
        return scores


# -- format -------------------------------------------------------------------------------------------------------

_FORMAT_MODES = ("search", "fullmatch")


@REWARDS.register("format")
class Format(RewardFunction):
    """Scores ``score`` when the completion matches the regex ``pattern``, else 0.0.

    ``mode="search"`` matches anywhere in the completion, ``mode="fullmatch"`` must match all of it. The regex is
    compiled with DOTALL: ``.`` also matches newlines (use ``[^\\n]`` to stay on one line).
    """

    def __init__(self, *, pattern: str, score: float = 1.0, mode: str = "search"):
        super().__init__()
        if mode not in _FORMAT_MODES:
            raise RewardSpecError(f"unknown mode {mode!r}; use one of {', '.join(_FORMAT_MODES)}")
        try:
            self._regex = re.compile(pattern, re.DOTALL)
        except re.error as error:
            raise RewardSpecError(f"pattern {pattern!r} does not compile: {error}") from None
        self.pattern = pattern
        self.score = float(score)
        self.mode = mode

    def __call__(self, completions: list, **columns: Any) -> list[float]:
        match = self._regex.search if self.mode == "search" else self._regex.fullmatch
        return [self.score if match(completion_text(c)) else 0.0 for c in completions]


# -- length -------------------------------------------------------------------------------------------------------


@REWARDS.register("length")
class Length(RewardFunction):
    """A length-shaping penalty (<= 0) on the completion's length in characters.

    With ``max_length``: ``-scale * max(0, len - max_length) / max_length`` (0.0 up to max_length).
    With ``target``: ``-scale * |len - target| / target``. Give exactly one of the two. Only ``unit="chars"`` is
    supported: counting tokens would need the policy's tokenizer.
    """

    def __init__(
        self, *, target: int | None = None, max_length: int | None = None, scale: float = 1.0, unit: str = "chars"
    ):
        super().__init__()
        if (target is None) == (max_length is None):
            raise RewardSpecError("give exactly one of target or max_length")
        limit = target if target is not None else max_length
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0:
            which = "target" if target is not None else "max_length"
            raise RewardSpecError(f"{which} must be a positive number, got {limit!r}")
        if unit != "chars":
            raise RewardSpecError(f"unknown unit {unit!r}; only 'chars' is supported (tokens need the tokenizer)")
        self.target = target
        self.max_length = max_length
        self.scale = float(scale)
        self.unit = unit

    def penalty(self, length: int) -> float:
        if self.max_length is not None:
            excess = max(0, length - self.max_length)
            return -self.scale * excess / self.max_length if excess else 0.0
        distance = abs(length - self.target)
        return -self.scale * distance / self.target if distance else 0.0

    def __call__(self, completions: list, **columns: Any) -> list[float]:
        return [self.penalty(len(completion_text(c))) for c in completions]
