"""Answer graders of ReFT (Luong et al., 2024), matching the authors' code.

Source: github.com/lqtrung1998/mwp_ReFT
  * `train_rl_reft.py`: `answer_trigger = '\\nTherefore, the answer is: '`; the SFT target is
    `answer_cot.strip() + answer_trigger + answer_value.strip()`;
    N-CoT extraction `floatify(text.split(answer_trigger)[-1].strip())` (no comma removal on the
    prediction); gold `float(answer_value.replace(',', '').strip())`; numeric correctness
    `abs(pred - gold) <= 1e-2`; MathQA `x.lower().replace('"','').replace("'",'').strip()` and
    string equality; reward 1 if correct, 0.1 if something was extracted, else 0.
  * `src/python_engine.py`: `process_code` keeps the program up to its first blank line (lines
    starting with `def solution` are always kept), replaces `sys.exit` by `print`, prepends
    `import math` / `import sympy`; `run` does `exec(code, g, l)` with separate dicts and
    evaluates `solution()`; the result goes through `floatify` (MathQA: `str` + normalisation).
  * `src/utils.py`: `floatify(s)` = `float(s)` or None.

Beyond the authors (selectable, off by default): the GSM8K-native `#### N` rule (commas, `$`,
`%` and a trailing `.0`/`.` normalised) and a last-number fallback when the primary rule
finds nothing.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Sequence

from reftjax.graders.base import Grade, Item, PerItemGrader, _check_lengths, faulted, field
from reftjax.graders.sandbox import SandboxConfig, SandboxJob, SandboxPool, SandboxResult

ANSWER_TRIGGER = "\nTherefore, the answer is: "
PROGRAM_HEADER = "def solution():\n    \"\"\"{question}\"\"\""
NUMERIC_TOLERANCE = 1e-2
# a number: a minus sign only where it cannot be a subtraction (not after a word character, `)`, `]` or
# `.`), an optional `$`, thousands commas, decimals, or a fraction `a/b`
_MINUS = r"(?:(?<![\w)\].])-)?"
_NUMBER = re.compile(_MINUS + r"(?:\$\s?)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+|/\d+(?!\d|\.\d))?"
                     "|" + _MINUS + r"\.\d+")


def reft_target(answer_cot: str, answer_value: str) -> str:
    """The N-CoT SFT target, exactly as `train_rl_reft.py` builds it."""
    return answer_cot.strip() + ANSWER_TRIGGER + answer_value.strip()


def floatify(value) -> float | None:
    """`float(value)` or None (the authors' `src/utils.py:floatify`)."""
    try:
        return float(value)
    except Exception:  # noqa: BLE001 - any failure means "not a number"
        return None


def normalize_mathqa(text: str) -> str:
    """The authors' MathQA normalisation (lower case, quotes removed, stripped)."""
    return str(text).lower().replace('"', "").replace("'", "").strip()


def normalize_number(text: str) -> str:
    """GSM8K-style normalisation: drop commas, `$`, `%`, spaces, a trailing `.` and `.0`s; `a/b` -> its value."""
    out = text.strip().replace(",", "").replace("$", "").replace("%", "").replace(" ", "")
    out = out.rstrip(".")
    fraction = re.fullmatch(r"(-?\d+)/(\d+)", out)
    if fraction and int(fraction.group(2)):
        out = repr(int(fraction.group(1)) / int(fraction.group(2)))
    if re.fullmatch(r"-?\d+\.0+", out):
        out = out.split(".")[0]
    return out


def extract_reft(text: str) -> str:
    """Text after the last answer trigger, stripped (whole text if there is no trigger)."""
    return text.split(ANSWER_TRIGGER)[-1].strip()


def extract_gsm8k(text: str) -> str | None:
    """The number after the last `####`, normalised; None if there is none."""
    if "####" not in text:
        return None
    tail = text.rsplit("####", 1)[1].strip().split("\n")[0]
    match = _NUMBER.search(tail)
    return normalize_number(match.group(0)) if match else None


def extract_last_number(text: str) -> str | None:
    """The last number in the text, normalised; None if there is none."""
    matches = _NUMBER.findall(text)
    return normalize_number(matches[-1]) if matches else None


def gold_answer(item: Item, answer_field: str) -> str:
    """The reference answer: `item[answer_field]`, or its `#### N` part for raw GSM8K."""
    value = str(field(item, answer_field))
    if "####" in value:
        value = value.rsplit("####", 1)[1]
    return value.strip()


def process_code(program: str) -> str:
    """The authors' `python_engine.process_code` (without `truncate_first_return`)."""
    program = program.replace("sys.exit", "print")
    kept = ["import math", "import sympy"]
    for line in program.split("\n"):
        if line.startswith("def solution"):
            kept.append(line)
            continue
        if line.strip() == "":
            break
        kept.append(line)
    return "\n".join(kept)


def build_program(item: Item, completion: str, question_field: str = "question") -> str:
    """The full program for a P-CoT completion: `def solution():\\n    \"\"\"{question}\"\"\"` + the completion,
    verbatim.

    The RL and evaluation prompts end with that header and no newline (`data.prompts`), and the ReFT authors run
    the decoded prompt's tail + completion as it stands (`train_rl_reft.py`), so a completion that does not open with
    a newline is graded as theirs is: `"    return x"` on the header's line is a syntax error (0), `" \\n    return x"`
    runs (until session 29 a newline was put in between, which scored both the other way, review). A text that is
    itself a whole program (it starts with `def solution`, e.g. a gold `answer_cot` given to the grader CLI) runs as
    it is; after the header the authors would score it 0, the one difference kept.
    """
    if completion.startswith("def solution"):
        return completion.strip()
    header = PROGRAM_HEADER.format(question=str(field(item, question_field)).strip())
    return (header + completion).strip()


@dataclasses.dataclass(frozen=True)
class ReftGrader(PerItemGrader):
    """ReFT's rule-based reward for N-CoT (`cot="nl"`) or P-CoT (`cot="python"`) completions.

    Attributes:
      cot: "nl" (answer after the trigger) or "python" (run the program, call `solution()`).
      answer_field: item field with the gold answer (`answer_value`; `answer` for raw GSM8K).
      answer_type: "numeric" (|pred - gold| <= 1e-2) or "mathqa" (normalised string equality).
      extract: N-CoT rule: "reft" (authors), or "gsm8k" (`#### N`).
      fallback: "none", or "last_number" (used when the rule extracts nothing).
      partial_reward: reward for an extracted but wrong answer (0.1 in ReFT); below 1, since a score
        of 1 is what counts as correct in evaluation.
      question_field: item field with the question (P-CoT program header).
      pool: the sandbox for P-CoT (a shared default pool when None).

    One deliberate difference from the authors: a P-CoT program that fails scores 0 for MathQA as for
    numbers (their `str(None)` makes a crash an extracted-but-wrong answer worth 0.1 on MathQA).
    """

    cot: str = "nl"
    answer_field: str = "answer_value"
    answer_type: str = "numeric"
    extract: str = "reft"
    fallback: str = "none"
    partial_reward: float = 0.1
    question_field: str = "question"
    pool: SandboxPool | None = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self):
        checks = {"cot": (self.cot, ("nl", "python")), "extract": (self.extract, ("reft", "gsm8k")),
                  "answer_type": (self.answer_type, ("numeric", "mathqa")),
                  "fallback": (self.fallback, ("none", "last_number"))}
        for name, (value, allowed) in checks.items():
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        for name in ("answer_field", "question_field"):  # (a number failed as an AttributeError at the first item)
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {getattr(self, name)!r}")
        if not isinstance(self.partial_reward, (int, float)) or isinstance(self.partial_reward, bool) or \
                not 0.0 <= self.partial_reward < 1.0:  # ("0.1" failed as a TypeError comparing it)
            raise ValueError(f"partial_reward must be a number in [0, 1) (a score of 1 counts as correct), "
                             f"got {self.partial_reward!r}")

    @property
    def uses_sandbox(self) -> bool:
        return self.cot == "python"

    @property
    def answer_in_text(self) -> bool:
        """An N-CoT answer is read out of the completion's text (the guards may measure the reasoning around it);
        a P-CoT answer is what the program returns."""
        return self.cot == "nl"

    def validate(self, item: Item) -> None:
        gold = gold_answer(item, self.answer_field)
        if self.answer_type == "numeric" and floatify(gold.replace(",", "")) is None:
            raise ValueError(f"gold answer {gold!r} in field {self.answer_field!r} is not a number")
        if self.cot == "python":
            field(item, self.question_field)

    def _score(self, item: Item, pred: str | float | None, error: str | None = None) -> Grade:
        """Compares an extraction with the gold answer (authors' `compare_answer_fn_mapper`)."""
        gold = gold_answer(item, self.answer_field)
        if self.answer_type == "mathqa":
            if pred is None:
                return Grade(0.0, error=error or "no answer")
            option = normalize_mathqa(pred)
            ok = option == normalize_mathqa(gold)
            # the authors' reward (0.1 for anything extracted), but only a single option letter is an answer
            # that votes (their `sampling.py` sets the prediction to None otherwise)
            return Grade(1.0 if ok else self.partial_reward, extracted=option,
                         error=None if ok or len(option) == 1 else f"not an option letter: {option[:80]!r}")
        value = floatify(pred) if pred is not None else None
        if value is None:
            return Grade(0.0, extracted=None if pred is None else str(pred),
                         error=error or f"not a number: {str(pred)[:80]!r}")
        ok = abs(value - float(gold.replace(",", ""))) <= NUMERIC_TOLERANCE
        return Grade(1.0 if ok else self.partial_reward, extracted=str(pred))

    def grade(self, item: Item, text: str) -> Grade:
        """N-CoT grading of one completion (P-CoT goes through `grade_batch`)."""
        if self.cot == "python":
            return self.grade_batch([item], [text])[0]
        pred = extract_reft(text) if self.extract == "reft" else extract_gsm8k(text)
        if self.answer_type == "numeric" and self.fallback == "last_number" and floatify(pred) is None:
            pred = extract_last_number(text)
        return self._score(item, pred)

    def grade_batch(self, items: Sequence[Item], texts: Sequence[str]) -> list[Grade]:
        if self.cot == "nl":
            return super().grade_batch(items, texts)
        _check_lengths(items, texts)
        jobs = [SandboxJob(process_code(build_program(item, text, self.question_field)),
                           entry="solution", split_locals=True) for item, text in zip(items, texts)]
        results = (self.pool or default_pool()).run(jobs)
        return [self._score_program(item, r) for item, r in zip(items, results)]

    def _score_program(self, item: Item, result: SandboxResult) -> Grade:
        if not result.ok:  # the model's program failed (error, timeout, crash), or the sandbox itself did
            error = f"{result.status}: {result.error}"
            return faulted(error) if result.status == "sandbox_failure" else Grade(0.0, error=error)
        if self.answer_type == "mathqa":
            if result.value_json is None and result.value_str == "None":  # returned None: no answer
                return Grade(self.partial_reward, extracted="none", error="the program returned None")
            return self._score(item, result.value_str)
        grade = self._score(item, result.value_float, error=f"result {result.value_str!r} is not a number")
        # a number is recorded by its value, so equal results vote together (5/2 from sympy and 2.5)
        return grade if grade.error is None else dataclasses.replace(grade, extracted=result.value_str)


_POOLS: dict[SandboxConfig, SandboxPool] = {}


def default_pool(config: SandboxConfig = SandboxConfig()) -> SandboxPool:
    """The process-wide `SandboxPool` of these limits (default: `SandboxConfig()`), created on first use and
    closed at exit."""
    if config not in _POOLS:
        import atexit

        _POOLS[config] = SandboxPool(config)
        atexit.register(_POOLS[config].close)
    return _POOLS[config]
