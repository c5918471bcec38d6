"""Evaluation: greedy top-1 accuracy, majority voting@k and rerank@k, graded on the host.

Batches are padded to a fixed size and prompts to the loader's buckets, so an
evaluation compiles `rollout` once per (bucket, mode) and never per batch.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import time
from typing import Sequence

import jax
import numpy as np

from reftjax.data import Loader, LoaderConfig, TokenizedDataset
from reftjax.graders.base import every_one_faulted, has_answer, is_fault, sub_score_means
from reftjax.rerank import any_correct, rerank_correct, verifier_scores
from reftjax.rollout import SamplingConfig, decode_completions, rollout
from reftjax.sharding import object_from_process_0, to_host

log = logging.getLogger("reftjax")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Attributes:
      batch_size: prompts per rollout call (fixed: padded).
      max_new_tokens: completion length bucket.
      voting_k: samples per prompt for majority voting (0: off); ReFT uses 100 at temperature 1.
      voting_temperature: sampling temperature for voting (> 0).
      voting_rows: the most completion rows one voting rollout samples (its KV cache holds that many): a batch's
        prompts are split into rollouts of `voting_prompts` prompts x voting_k samples; 0: the whole batch at once.
      rerank_chunk_rows: rows per verifier forward when scoring the voting samples for rerank@k
        (`reftjax.rerank.verifier_scores`; bounds memory at large k; 0: all rows of a batch at once).
      decode_segments: `SamplingConfig.decode_segments` of the greedy and voting rollouts: decode in
        this many stretches, each attending over only the KV cache it needs (same tokens; each
        stretch compiles its own loop body, so 1, one loop, by default).
      voting_tol: numeric answers within this of an earlier one vote with it (`majority_correct`). 0 (default):
        equal values only, the ReFT authors' vote (`Counter` over floatify'd answers, `sampling.py`), so voting@k
        is the paper's metric; 0.01 groups 3.33 / 3.333 as the grader's tolerance would.
    """

    batch_size: int = 8
    max_new_tokens: int = 256
    voting_k: int = 0
    voting_temperature: float = 1.0
    voting_rows: int = 0
    rerank_chunk_rows: int = 64
    decode_segments: int = 1
    voting_tol: float = 0.0

    def __post_init__(self):
        if self.voting_k and not self.voting_temperature > 0:  # (failed at the first voting evaluation, maybe
            # after the warm-up, and the corrected rerun was refused)
            raise ValueError(f"eval.voting_temperature must be > 0 with voting_k > 0, got {self.voting_temperature}")
        if not 0 <= self.voting_tol < 1:
            raise ValueError(f"eval.voting_tol must be in [0, 1), got {self.voting_tol}")
        if self.voting_rows < 0 or self.voting_k < 0:
            raise ValueError(f"eval.voting_rows and eval.voting_k must be >= 0, got {self.voting_rows}, "
                             f"{self.voting_k}")
        if self.voting_k and 0 < self.voting_rows < self.voting_k:  # one prompt's samples are one rollout
            raise ValueError(f"eval.voting_rows={self.voting_rows} is below eval.voting_k={self.voting_k}: a voting "
                             f"rollout samples at least one prompt's k rows (0: the whole batch)")
        if self.batch_size < 1 or self.max_new_tokens < 1 or self.rerank_chunk_rows < 0:
            raise ValueError(f"eval: need batch_size >= 1, max_new_tokens >= 1 and rerank_chunk_rows >= 0; got "
                             f"{self.batch_size}, {self.max_new_tokens}, {self.rerank_chunk_rows}")
        if not 1 <= self.decode_segments <= self.max_new_tokens:
            raise ValueError(f"eval.decode_segments must be in [1, max_new_tokens = {self.max_new_tokens}], "
                             f"got {self.decode_segments}")


def voting_prompts(batch_size: int, k: int, max_rows: int) -> int:
    """Prompts per voting rollout: the largest divisor of `batch_size` whose `x k` sample rows fit in `max_rows`
    (at least 1; `max_rows` 0: the whole batch). One rollout of 64 prompts x 100 samples held a KV cache of 6,400
    rows (~2 TiB for a 7B model at 700 slots)."""
    if not max_rows or batch_size * k <= max_rows:
        return batch_size
    return max([d for d in range(1, batch_size + 1) if batch_size % d == 0 and d * k <= max_rows] or [1])


def majority_correct(grades, weights=None, tol: float = 0.0) -> bool:
    """Voted answer = the extracted answer with the most votes (ties: first seen); correct if it graded 1.

    Each sample votes 1, or `weights[i]` (verifier-weighted voting: a verifier's P(correct) summed per
    answer, Li et al. 2023 / Uesato et al. 2022). Samples without an answer (`graders.has_answer`) and NaN answers
    do not vote. Numeric answers vote by value ("42" and "42.0", "inf" and "Infinity" are one answer), as in the ReFT
    authors' vote; with `tol` > 0 (`EvalConfig.voting_tol`) a value within `tol` of a group's first value (the
    groups in the order seen) votes with that group, else it starts one (grading counts a value within 1e-2 of the
    gold as right, so `3.33` and `3.3333` can be one answer; at 0.01, 1.000, 1.008 and 1.016 are two groups). The
    winning group's answer is its own most-voted value (ties: first seen), and that value's grade decides: one
    right 42.009 does not make three wrong 42.017s a right vote.
    """
    votes = collections.Counter()
    members: dict = {}  # group key -> {exact answer: [votes, correct]}, in the order seen
    numeric = []  # the numeric keys so far, in the order seen
    for i, g in enumerate(grades):
        if not has_answer(g):
            continue
        key = exact = str(g.extracted).strip()
        try:
            value = float(key)
        except ValueError:
            value = None
        if value is not None and np.isnan(value):  # (the authors' Counter keeps each NaN apart: it never wins)
            continue
        if value is not None:  # "inf" and "Infinity" are one answer too
            exact = value
            key = next((k for k in numeric if k == value or abs(k - value) <= tol), value)
            if key == value and key not in numeric:
                numeric.append(key)
        weight = 1.0 if weights is None else float(weights[i])
        votes[key] += weight
        entry = members.setdefault(key, {}).setdefault(exact, [0.0, False])
        entry[0] += weight
        entry[1] = entry[1] or g.score >= 1.0 - 1e-6
    if not votes:
        return False
    group = members[votes.most_common(1)[0][0]]
    return max(group.values(), key=lambda entry: entry[0])[1]  # max keeps the first of equal votes


def _grades_mathqa(grader) -> bool:
    """Whether a MathQA ReFT grader grades the answers (a multi grader says its sub-graders' `answer_type`)."""
    return getattr(grader, "answer_type", None) == "mathqa"


def evaluate(params, model_cfg, tokenizer, ds: TokenizedDataset, items: Sequence[dict], grader,
             cfg: EvalConfig, *, mesh=None, rng=None, eos_ids=(), pad_id=0, progress=None, verifier=None,
             stop_sequences=()) -> dict:
    """Accuracy of `params` on every example of `ds` (graded against `items[example_idx]`).

    Returns {"accuracy", "voting_accuracy" (if k > 0), "n", "mean_score", "mean_length", "samples"}: `samples`
    holds every example's greedy answer (item id, completion, score, extracted answer, grading error; with
    voting also whether the majority vote was right), in the dataset's order.
    With `verifier` (`reftjax.rerank` parameters) and k > 0 it also scores the k voting samples and
    adds "rerank_accuracy" (the verifier's pick among the samples with an answer),
    "weighted_voting_accuracy" (votes weighted by the verifier's P(correct)) and
    "upper_bound_accuracy" (some sample is correct: pass@k), over the same samples as voting.
    """
    if items:  # a grader that cannot read these items would score every row 0 and report 0% accuracy
        grader.validate(items[0])
    # the model's EOS unless given (none decoded every row to max_new_tokens, the text after the EOS glued on); a run
    # passes its RL stopping rule (rl.sampling eos_ids / stop_sequences), so selection and test see the same rule
    eos_ids = tuple(eos_ids) or tuple(model_cfg.eos_token_ids)
    loader = Loader(ds, LoaderConfig(batch_size=cfg.batch_size, kind="prompt", shuffle=False, drop_last=False,
                                     num_epochs=1), mesh=mesh)
    greedy = SamplingConfig(max_new_tokens=cfg.max_new_tokens, greedy=True, eos_ids=eos_ids, pad_id=pad_id,
                            decode_segments=cfg.decode_segments, stop_sequences=stop_sequences)
    vote = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.voting_temperature, n=cfg.voting_k,
                          eos_ids=eos_ids, pad_id=pad_id, decode_segments=cfg.decode_segments,
                          stop_sequences=stop_sequences) if cfg.voting_k else None
    rng = rng if rng is not None else jax.random.key(1234)
    if verifier is not None and vote is None:
        raise ValueError("rerank@k needs voting samples: set EvalConfig.voting_k > 0")
    mathqa = _grades_mathqa(grader)  # rerank@k picks option letters only (the authors')
    correct, scores_g, voted, reranked, weighted, bound, lengths, samples = [], [], [], [], [], [], [], []
    greedy_grades, voting_grades = [], []
    t0 = time.perf_counter()
    for i, batch in enumerate(loader):
        valid, idx = to_host((batch["valid"], batch["example_idx"]))  # whole batch on every process
        out = rollout(params, batch["prompt_tokens"], batch["prompt_mask"], rng, model_cfg=model_cfg, cfg=greedy)
        texts = decode_completions(tokenizer, out, stop_sequences=stop_sequences)
        rows = [j for j in range(len(valid)) if valid[j]]
        # graded in process 0 alone, its grades on every process (a judge got every process's requests)
        grades = object_from_process_0(lambda: grader.grade_batch([items[idx[j]] for j in rows],
                                                                  [texts[j] for j in rows]))
        correct += [g.score >= 1.0 - 1e-6 for g in grades]
        scores_g += [float(g.score) for g in grades]
        greedy_grades += grades
        lengths += to_host(out.lengths_B)[rows].tolist()
        batch_samples = [{"item_id": items[idx[j]].get("item_id"), "completion": texts[j], "score": float(g.score),
                          "extracted": g.extracted, "error": g.error,
                          **({"scores": dict(g.details["scores"])} if "scores" in g.details else {})}
                         for j, g in zip(rows, grades)]
        samples += batch_samples
        if vote is not None:
            k, b = cfg.voting_k, len(valid)
            sub = voting_prompts(b, k, cfg.voting_rows)  # prompts per vote rollout: its KV cache holds sub x k rows
            key = jax.random.fold_in(rng, i)
            texts_v, parts = [], []
            for j0 in range(0, b, sub):
                out_v = rollout(params, batch["prompt_tokens"][j0:j0 + sub], batch["prompt_mask"][j0:j0 + sub],
                                key if sub == b else jax.random.fold_in(key, j0), model_cfg=model_cfg, cfg=vote)
                texts_v += decode_completions(tokenizer, out_v, stop_sequences=stop_sequences)
                if verifier is not None:
                    parts.append(to_host(verifier_scores(verifier, out_v.prompt_tokens_BxP, out_v.prompt_mask_BxP,
                                                         out_v.tokens_BxN, out_v.mask_BxN, model_cfg=model_cfg,
                                                         chunk_rows=cfg.rerank_chunk_rows)))
            scores = np.concatenate(parts) if parts else None
            # the batch's voting samples in one call (a judge's concurrency spans them), in process 0 alone
            batch_v = object_from_process_0(lambda: grader.grade_batch(
                [items[idx[j]] for j in rows for _ in range(k)], [t for j in rows for t in texts_v[j * k:(j + 1) * k]]))
            voting_grades += batch_v
            for r, (j, sample) in enumerate(zip(rows, batch_samples)):
                g = batch_v[r * k:(r + 1) * k]
                voted.append(bool(majority_correct(g, tol=cfg.voting_tol)))
                sample["voting_correct"] = voted[-1]
                if scores is not None:
                    reranked.append(rerank_correct(scores[j * k:(j + 1) * k], g, letters_only=mathqa))
                    weighted.append(majority_correct(g, scores[j * k:(j + 1) * k], tol=cfg.voting_tol))
                    bound.append(any_correct(g))
        if progress is not None:
            progress.update(len(rows))
    # every process holds process 0's grades (`object_from_process_0`): every figure, and so every decision on them,
    # agrees (a grader need not give the same result twice: P-CoT programs calling `random`, or timing out)
    res = {"accuracy": float(np.mean(correct)) if correct else 0.0, "n": len(correct),
           "mean_score": float(np.mean(scores_g)) if scores_g else 0.0,  # graders with partial credit select on it
           "mean_length": float(np.mean(lengths)) if lengths else 0.0, "samples": samples,
           "seconds": time.perf_counter() - t0}  # (this process's; validation rows carried no duration)
    # the rows the grader could not grade (its faults, not answers it found wrong or missing), as RL logs them; the
    # voting samples' apart (they were not counted: a judge down after the greedy answers scored voting@k 0 unsaid)
    faults = [sum(map(is_fault, gs)) for gs in (greedy_grades, voting_grades)]
    res["grader_errors"] = faults[0]
    broken = every_one_faulted(greedy_grades)
    if broken is not None:
        log.warning("evaluation: the grader failed on all %d answers (the first: %s): the accuracy is "
                    "0 whatever the model wrote; try the grader on this data with `python -m reftjax.graders run`",
                    len(greedy_grades), broken)
        res["grader_failure"] = broken  # (the training loop stops on it: `train.check_evaluation`)
    means = sub_score_means(greedy_grades)  # a multi grader's, as the RL metrics log them
    res.update(means)
    # a grader that records only a score (a `python` grader) would make voting@k a vote on right/wrong: not reported
    answers = getattr(grader, "votes_on_answer", True)
    if vote is not None:
        res["voting_accuracy"] = (float(np.mean(voted)) if voted else 0.0) if answers else None
        res["voting_samples"], res["voting_grader_errors"] = len(voting_grades), faults[1]
        # every voting sample a fault, where a figure is drawn from them: voting@k (and rerank@k) would be 0 whatever
        # the model wrote; the training loop stops on it
        first = every_one_faulted(voting_grades)
        if (answers or verifier is not None) and first is not None:
            log.warning("evaluation: the grader failed on all %d voting samples (the first: %s): voting@k is 0 "
                        "whatever the model wrote", len(voting_grades), first)
            res["voting_grader_failure"] = first
    if verifier is not None:
        res["rerank_accuracy"] = float(np.mean(reranked)) if reranked else 0.0
        res["weighted_voting_accuracy"] = (float(np.mean(weighted)) if weighted else 0.0) if answers else None
        res["upper_bound_accuracy"] = float(np.mean(bound)) if bound else 0.0
    return res
