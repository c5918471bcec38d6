"""Optional reward-hacking guards: format and length checks applied after grading.

Each check flags a completion; a flagged completion's reward is set to 0 (`action="zero"`) or
multiplied by `discount` (`action="discount"`). Counters (`{"too_long": n, ...}`) come back per
batch so the training loop can report them (`HostRewardFn.last.counters`, `.totals`).

Checks:
  * `too_long`: the completion used at least `max_tokens` tokens, a final EOS or stop sequence
    not counted (it hit the length limit, so it was probably truncated, or it is padding its
    reasoning; one that stopped exactly at the cap is not flagged).
  * `no_reasoning`: fewer than `min_reasoning_chars` non-space characters (``#`` not counted) before
    the first answer marker, or, with no marker and a grader that reads its answer out of the text
    (`ReftGrader` N-CoT: `answer_in_text`), in the text without that answer (a bare ``42``: the
    reft extraction reads a text without its trigger whole). Other graders' texts without a marker
    are not checked (string_check and text_similarity record the whole text as their answer).
  * `repeated_answer`: an answer marker occurs more than `max_answer_markers` times (stating
    several answers hoping one matches, or looping).

A marker made only of ``#`` (GSM8K's ``#### 42``) counts only where a number follows it, so
Markdown headings (``#### Step 1``) are not answers; a longer run (``##### 42``) counts only as
the last marker of the text, the one the `gsm8k` extraction reads (``##### 1. Setup`` headings
before it are not answers).
  * `repeated_lines`: more than `max_repeated_line_fraction` of the non-empty lines are
    duplicates of an earlier line (degenerate repetition).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Sequence

from reftjax.graders.base import Grade, has_answer

GUARD_NAMES = ("too_long", "no_reasoning", "repeated_answer", "repeated_lines")


@dataclasses.dataclass(frozen=True)
class GuardConfig:
    """Which guards run and what they do (None disables a check).

    Attributes:
      enabled: False turns every check off (`ExperimentConfig.rl.guards` defaults to off: the ReFT
        paper uses none; `--set rl.guards.enabled=true` applies these defaults to RL rewards).
      max_tokens: flag completions with at least this many tokens (None in a run: the rollout's
        `rl.sampling.max_new_tokens`, i.e. completions cut by the cap; None elsewhere: off).
      min_reasoning_chars: flag completions with fewer non-space characters before the marker.
      max_answer_markers: flag completions with more answer markers than this.
      max_repeated_line_fraction: flag completions with a larger share of duplicate lines.
      markers: strings that introduce the final answer.
      action: "zero" or "discount".
      discount: multiplier for flagged rewards when `action="discount"`.
    """

    enabled: bool = True
    max_tokens: int | None = None
    min_reasoning_chars: int | None = 20
    max_answer_markers: int | None = 1
    max_repeated_line_fraction: float | None = 0.5
    markers: tuple[str, ...] = ("Therefore, the answer is:", "####")
    action: str = "zero"
    discount: float = 0.5

    def __post_init__(self):
        if isinstance(self.markers, str):  # one string is one marker (tuple() would split it into characters)
            object.__setattr__(self, "markers", (self.markers,))
        object.__setattr__(self, "markers", tuple(self.markers))
        if not all(isinstance(m, str) and m for m in self.markers):
            raise ValueError(f"markers must be non-empty strings, got {self.markers!r}")
        if self.action not in ("zero", "discount"):
            raise ValueError(f"action must be 'zero' or 'discount', got {self.action!r}")
        if not 0.0 <= self.discount <= 1.0:
            raise ValueError(f"discount must be in [0, 1], got {self.discount}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not self.markers:
            raise ValueError("markers must not be empty")

    @classmethod
    def from_dict(cls, cfg: dict) -> "GuardConfig":
        unknown = set(cfg) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown guard options {sorted(unknown)}")
        return cls(**cfg)


def _marker_positions(text: str, marker: str) -> list[int]:
    """Where `marker` introduces an answer: every occurrence, except that a marker made only of '#'
    must be followed by a number (``#### 42``; also on the next line, or in bold, code or after a currency sign:
    ``####\n42``, ``#### **42**``, which the `gsm8k` extraction reads as answers too), not by words (a Markdown
    heading)."""
    pattern = re.escape(marker)
    if set(marker) != {"#"}:
        return [m.start() for m in re.finditer(pattern, text)]
    number = r"\s*[*_`$\\(\[]*[-+$]?[.]?\d"
    found = [m.start() for m in re.finditer(rf"(?<!#){pattern}(?!#)(?={number})", text)]
    last = text.rfind(marker)  # what the gsm8k extraction reads, also inside a longer run (`##### 42`)
    if last >= 0 and re.match(number, text[last + len(marker):]):
        start = len(text[:last].rstrip("#"))
        if start not in found:
            found.append(start)
    return found


def check(cfg: GuardConfig, text: str, n_tokens: int, answer: str | None = None) -> list[str]:
    """Names of the guards that flag this completion (none when `cfg.enabled` is False).

    `answer`: the answer a grader read out of this text (`Grade.extracted`), or None; with no marker in the
    text, the reasoning is the text without its last occurrence (no marker and no answer: not checked)."""
    flags = []
    if not cfg.enabled:
        return flags
    if cfg.max_tokens is not None and n_tokens >= cfg.max_tokens:
        flags.append("too_long")
    positions = [p for m in cfg.markers for p in _marker_positions(text, m)]
    answer = answer.strip() if answer else ""
    if cfg.min_reasoning_chars is not None and (positions or answer):
        if positions:
            reasoning = text[: min(positions)]
        else:
            at = text.rfind(answer)
            reasoning = text if at < 0 else text[:at] + text[at + len(answer):]
        if len("".join(reasoning.replace("#", "").split())) < cfg.min_reasoning_chars:
            flags.append("no_reasoning")
    if cfg.max_answer_markers is not None and len(positions) > cfg.max_answer_markers:
        flags.append("repeated_answer")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if cfg.max_repeated_line_fraction is not None and len(lines) >= 4:
        duplicates = len(lines) - len(set(lines))
        if duplicates / len(lines) > cfg.max_repeated_line_fraction:
            flags.append("repeated_lines")
    return flags


def apply_guards(cfg: GuardConfig, texts: Sequence[str], n_tokens: Sequence[int],
                 grades: Sequence[Grade], answer_in_text: bool = False) -> tuple[list[Grade], dict[str, int]]:
    """Applies the guards; returns the adjusted grades and per-guard counts for this batch.

    `answer_in_text`: the grader read each answer out of the text (its `answer_in_text`; see `check`)."""
    counts = dict.fromkeys(GUARD_NAMES, 0)
    out = []
    for text, n, grade in zip(texts, n_tokens, grades):
        answer = str(grade.extracted) if answer_in_text and has_answer(grade) else None
        flags = check(cfg, text, int(n), answer)
        for name in flags:
            counts[name] += 1
        if flags:
            factor = 0.0 if cfg.action == "zero" else cfg.discount
            details = {**grade.details, "guards": flags, "score_before_guards": grade.score}
            grade = dataclasses.replace(grade, score=grade.score * factor, details=details)
        out.append(grade)
    return out, counts
