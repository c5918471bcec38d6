"""The grader interface: (reference item, completion text) -> `Grade`.

A grader is a small frozen object with a `grade_batch(items, texts) -> list[Grade]` method (one
`Grade` per completion, same order, never raising). Graders that run programs implement
`grade_batch` by sending the whole batch to a `SandboxPool` (parallel over processes); pure-Python
graders are fast enough (microseconds per completion) that a process pool would cost more than it
saves, so `grade_batch` runs them inline unless `parallel_grade` is asked for more workers.
Grading is deterministic: same inputs, same grades.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

Item = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Grade:
    """The score of one completion and why.

    Attributes:
      score: reward in [0, 1].
      extracted: the answer the grader extracted (string form), or None.
      error: why nothing could be extracted / the program failed, or None.
      details: grader-specific extras (sub-scores of a `multi` grader, guard flags; `grader_fault`: True when
        the error is the grader's, not the completion's: see `faulted`).
    """

    score: float
    extracted: str | None = None
    error: str | None = None
    details: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not 0.0 <= self.score <= 1.0:
            raise ValueError(f"score must be in [0, 1], got {self.score}")

    def to_json(self) -> dict:
        out = {"score": self.score, "extracted": self.extracted, "error": self.error}
        if self.details:
            out["details"] = dict(self.details)
        return out


def faulted(error: str) -> Grade:
    """A 0 whose cause is the grader's (its code raised, its input could not be rendered, the sandbox failed), not
    the completion's (no answer in it, a program of the model's that failed): counted as a grader error, which a
    completion without an answer is not."""
    return Grade(0.0, error=error, details={"grader_fault": True})


def is_fault(grade) -> bool:
    return bool(getattr(grade, "details", {}).get("grader_fault"))


class GraderFailure(RuntimeError):
    """The grader failed on every row of an RL iteration, of an evaluation or of a verifier-data batch (its code, its
    sandbox, its judge's endpoint): the run stops before that update, or before the evaluation or the verifier data is
    recorded; rerunning resumes from the last checkpoint and redoes what was not recorded. (`train.GraderFailure`.)"""


def failure_message(where: str, rows: str, first: str | None, stopped: str,
                    rerun: str = "the run resumes from its last checkpoint") -> str:
    """A GraderFailure's one line for `where` ("RL iteration 3"): the grader failed on all `rows` ("8 rows"), the
    first failure `first` (None on a process that did not grade: process 0's log names it), what was `stopped`."""
    which = f" (the first: {first})" if first else " (graded in process 0: its log names the first failure)"
    return (f"{where}: the grader failed on all {rows}{which}; {stopped}. Fix the grader (try it with `python -m "
            f"reftjax.graders run`) or its judge's endpoint (a model grader's base_url may change on resume) and rerun "
            f"the same command: {rerun}")


def every_one_faulted(grades) -> str | None:
    """The first grade's error when the grader failed on every one of `grades` (none empty), else None: a grader
    that cannot grade this data at all (a python grader reading an item field the data lacks), whose zeros would
    otherwise train and report as the model's (bad-input review, session 35)."""
    if grades and all(is_fault(g) for g in grades):
        return grades[0].error or "no message"
    return None


def sub_score_means(grades) -> dict[str, float]:
    """A `multi` grader's mean sub-score per name over `grades`, as `score_<name>` (what the RL and evaluation
    metrics log, so a run shows which part of its formula moves); {} for other graders."""
    parts = [g.details["scores"] for g in grades if "scores" in getattr(g, "details", {})]
    return {f"score_{name}": sum(p[name] for p in parts) / len(parts) for name in (parts[0] if parts else {})}


def has_answer(grade) -> bool:
    """Whether a grade carries an answer that may vote (majority voting) or be picked (reranking): something
    was extracted and grading raised no error. An N-CoT answer that is not a number or a P-CoT program that
    failed or returned None has an `extracted` string for the logs but an `error`: it is no answer, as in the
    ReFT authors' voting, where such answers are None."""
    return grade.extracted is not None and grade.extracted != "" and getattr(grade, "error", None) is None


@runtime_checkable
class Grader(Protocol):
    """What every grader provides."""

    def grade_batch(self, items: Sequence[Item], texts: Sequence[str]) -> list[Grade]:
        """Grades `texts[i]` against `items[i]`; same length and order; never raises."""

    def validate(self, item: Item) -> None:
        """Raises KeyError or ValueError (naming the missing field) if `item` cannot be graded."""


class PerItemGrader:
    """Mixin for graders defined by a pure per-completion `grade(item, text)`."""

    def grade(self, item: Item, text: str) -> Grade:
        raise NotImplementedError

    def grade_batch(self, items: Sequence[Item], texts: Sequence[str]) -> list[Grade]:
        _check_lengths(items, texts)
        return [_safe_grade(self, item, text) for item, text in zip(items, texts)]


def _check_lengths(items: Sequence[Item], texts: Sequence[str]) -> None:
    if len(items) != len(texts):
        raise ValueError(f"{len(items)} items but {len(texts)} completions")


def _safe_grade(grader: PerItemGrader, item: Item, text: str) -> Grade:
    """A bug or odd input in one completion scores 0 with the reason, never crashes a batch."""
    try:
        return grader.grade(item, text)
    except Exception as exc:  # noqa: BLE001 - graders must never raise into the trainer
        if getattr(exc, "not_a_fault", False):  # the completion lacks what the grader reads: unanswered
            return Grade(0.0, error=str(exc.args[0] if exc.args else exc))
        return faulted(f"grader error: {type(exc).__name__}: {exc}")


def _grade_chunk(args) -> list[Grade]:
    grader, items, texts = args
    return grader.grade_batch(items, texts)


def parallel_grade(grader: Grader, items: Sequence[Item], texts: Sequence[str],
                   workers: int = 0, chunk: int = 64) -> list[Grade]:
    """Grades a batch over `workers` processes (0 or 1: inline), keeping order.

    Uses the "forkserver" start method: forking a process that runs JAX's thread pools is unsafe.
    The grader must be picklable (all graders in this package are, except those holding a
    `SandboxPool`, which are already parallel and are graded inline).
    """
    _check_lengths(items, texts)
    if workers <= 1 or len(texts) <= chunk or getattr(grader, "uses_sandbox", False):
        return grader.grade_batch(items, texts)
    ctx = multiprocessing.get_context("forkserver")
    parts = [(grader, list(items[i:i + chunk]), list(texts[i:i + chunk]))
             for i in range(0, len(texts), chunk)]
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        return [g for part in pool.map(_grade_chunk, parts) for g in part]


def field(item: Item, name: str) -> Any:
    """`item[name]` with a clear error; dotted names walk nested dicts."""
    value: Any = item
    for part in name.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise KeyError(f"item has no field {name!r} (fields: {sorted(item)})")
        value = value[part]
    return value
