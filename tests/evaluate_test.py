"""`reftjax.evaluate.evaluate` on a tiny model: what its config reaches, and that decode stretches change nothing."""
import dataclasses

import pytest

from reftjax.config import ExperimentConfig
from reftjax.evaluate import EvalConfig


def _tiny_model_and_data(tiny_hf_dir, shared_data, monkeypatch):
    """The tiny model and 4 / 4 / 2 GSM8K problems (train / validation / test)."""
    from reftjax.hf import load_model
    from reftjax.train import prepare_data

    monkeypatch.setenv("REFTJAX_GSM8K_DIR", str(shared_data / "gsm8k"))
    cfg = ExperimentConfig()
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, n_train=4, n_val=4, n_test=2))
    model = load_model(tiny_hf_dir)
    return model, prepare_data(cfg, model.tokenizer)


def test_decode_segments_reach_the_rollouts_and_change_no_figure(tiny_hf_dir, shared_data, monkeypatch):
    import reftjax.evaluate as ev
    from reftjax.graders import build_grader
    from reftjax.hf import load_model
    from reftjax.train import prepare_data

    monkeypatch.setenv("REFTJAX_GSM8K_DIR", str(shared_data / "gsm8k"))
    cfg = ExperimentConfig()
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, n_train=4, n_val=4, n_test=6))
    model = load_model(tiny_hf_dir)
    data = prepare_data(cfg, model.tokenizer)
    grader = build_grader(cfg.grader_dict)
    seen, real = [], ev.rollout

    def recording(*args, cfg, **kw):
        seen.append((cfg.greedy, cfg.decode_segments))
        stops.append((cfg.eos_ids, cfg.stop_sequences))
        return real(*args, cfg=cfg, **kw)

    stops = []

    monkeypatch.setattr(ev, "rollout", recording)
    results = {}
    for k in (1, 3):
        ecfg = EvalConfig(batch_size=4, max_new_tokens=12, voting_k=2, decode_segments=k)
        results[k] = ev.evaluate(model.params, model.config, model.tokenizer, data.test_ds, data.test_items, grader,
                                 ecfg, eos_ids=tuple(model.config.eos_token_ids), pad_id=model.tokenizer.pad_token_id)
    # no eos_ids given: the model's (every row ran to max_new_tokens before); stop sequences reach both rollouts
    stops.clear()
    ev.evaluate(model.params, model.config, model.tokenizer, data.test_ds, data.test_items, grader,
                EvalConfig(batch_size=4, max_new_tokens=12, voting_k=2), pad_id=model.tokenizer.pad_token_id,
                stop_sequences=[[198, 198]])
    assert set(stops) == {(tuple(model.config.eos_token_ids), ((198, 198),))} and len(stops) == 4
    seen[:] = seen[:8]
    # 6 prompts in batches of 4: two greedy and two voting rollouts per evaluation, each with the configured k
    assert seen == [(True, 1), (False, 1)] * 2 + [(True, 3), (False, 3)] * 2
    assert results[1]["n"] == 6 and results[1]["mean_length"] > 0 and "voting_accuracy" in results[1]
    figures = lambda res: {k: v for k, v in res.items() if k != "seconds"}  # noqa: E731 (a duration)
    assert figures(results[3]) == figures(results[1])  # same greedy texts, same voting samples, same figures
    # every example's greedy answer is kept (the first 8 were), in order, with its item and the vote's outcome
    samples = results[1]["samples"]
    assert [r["item_id"] for r in samples] == [it["item_id"] for it in data.test_items]  # (was "item": RL says item_id)
    assert [r["score"] for r in samples] and all(isinstance(r["voting_correct"], bool) for r in samples)
    assert sum(r["voting_correct"] for r in samples) / 6 == results[1]["voting_accuracy"]
    assert sum(r["score"] >= 1 for r in samples) / 6 == results[1]["accuracy"]


@pytest.mark.parametrize("k", [0, 13])
def test_bad_decode_segments_are_rejected(k):
    with pytest.raises(ValueError, match="eval.decode_segments"):
        EvalConfig(max_new_tokens=12, decode_segments=k)


def test_voting_settings_take_their_bounds():
    """voting_rows may be exactly one prompt's k samples (below it is refused); voting_tol is in [0, 1)."""
    assert EvalConfig(voting_k=4, voting_rows=4).voting_rows == 4
    assert EvalConfig(voting_k=4, voting_rows=0).voting_rows == 0  # (the whole batch at once)
    with pytest.raises(ValueError, match="eval.voting_rows=3 is below eval.voting_k=4"):
        EvalConfig(voting_k=4, voting_rows=3)
    assert EvalConfig(voting_tol=0.0).voting_tol == 0.0 and EvalConfig(voting_tol=0.99).voting_tol == 0.99
    for tol in (1.0, -0.01):
        with pytest.raises(ValueError, match="eval.voting_tol must be in"):
            EvalConfig(voting_tol=tol)


def test_voting_and_rerank_settings_take_their_bounds_on_the_host():
    """The bounds of the other settings, without a compiled program (a voting_temperature of 0 was refused only at
    the end of a compiling test; each a mutant that passed the host tests: mutation review, session 55)."""
    from reftjax.evaluate import voting_prompts

    with pytest.raises(ValueError, match="voting_temperature must be > 0 with voting_k > 0, got 0.0"):
        EvalConfig(voting_k=4, voting_temperature=0.0)
    assert EvalConfig(voting_k=0, voting_temperature=0.0).voting_k == 0  # (no voting: not used)
    with pytest.raises(ValueError, match="eval.voting_rows and eval.voting_k must be >= 0, got 0, -1"):
        EvalConfig(voting_k=-1)
    assert EvalConfig(rerank_chunk_rows=0).rerank_chunk_rows == 0  # (all rows of a batch at once)
    with pytest.raises(ValueError, match="rerank_chunk_rows >= 0"):
        EvalConfig(rerank_chunk_rows=-1)
    assert EvalConfig(max_new_tokens=12, decode_segments=12).decode_segments == 12  # one token a stretch
    # prompts per voting rollout: the largest divisor of the batch whose k samples each fit in voting_rows
    assert [voting_prompts(64, 100, 400), voting_prompts(64, 16, 512), voting_prompts(64, 100, 0),
            voting_prompts(6, 4, 8), voting_prompts(7, 4, 8), voting_prompts(4, 2, 100)] == [4, 32, 64, 2, 1, 4]
    # exactly voting_rows fits; 5 prompts of a batch of 6 would leave a remainder (3 x 4 = 12 <= 20 < 5 x 4)
    assert [voting_prompts(64, 100, 6400), voting_prompts(6, 4, 12), voting_prompts(6, 4, 20)] == [64, 3, 3]


def _host_stand_ins(monkeypatch, n, scores=None):
    """evaluate's loader, rollouts, decoding and verifier replaced by host stand-ins (no program is compiled): prompt
    i's token is i (-1: a padded row), its greedy completion "g<i>" (length 4 + i; a padded row's 100), its s-th
    voting sample "v<i>.<s>" (verifier score scores[(i, s)]). Returns the rollouts' (greedy, config, prompts, key)
    and the verifier calls' chunk_rows."""
    import types

    import numpy as np

    import reftjax.evaluate as ev

    calls, chunks = [], []

    class Loader:
        def __init__(self, ds, cfg, mesh=None):
            self.size = cfg.batch_size

        def __iter__(self):
            for b0 in range(0, n, self.size):
                idx = np.array([i if i < n else -1 for i in range(b0, b0 + self.size)], np.int32)
                yield {"valid": idx >= 0, "example_idx": idx, "prompt_tokens": idx[:, None],
                       "prompt_mask": np.ones((self.size, 1), bool)}

    def rollout(params, tokens, mask, rng, *, model_cfg, cfg):
        rows = [(int(i), s) for i in np.asarray(tokens)[:, 0] for s in range(1 if cfg.greedy else cfg.n)]
        calls.append((cfg.greedy, cfg, [i for i, s in rows if s == 0], _key(rng)))
        return types.SimpleNamespace(rows=rows, greedy=cfg.greedy, lengths_B=np.array([4 + i if i >= 0 else 100
                                                                                       for i, _ in rows]),
                                     prompt_tokens_BxP=None, prompt_mask_BxP=None, tokens_BxN=rows, mask_BxN=None)

    def decode(tokenizer, out, stop_sequences=()):
        return [f"g{i}" if out.greedy else f"v{i}.{s}" for i, s in out.rows]

    def verifier_scores(verifier, prompts, prompt_mask, tokens, mask, *, model_cfg, chunk_rows):
        chunks.append(chunk_rows)
        return np.array([scores[row] for row in tokens])

    for name, value in (("Loader", Loader), ("rollout", rollout), ("decode_completions", decode),
                        ("verifier_scores", verifier_scores)):
        monkeypatch.setattr(ev, name, value)
    return calls, chunks


def _key(rng):
    """A JAX key's data, hashable."""
    import jax
    import numpy as np

    return tuple(int(x) for x in np.ravel(jax.random.key_data(rng)))


class _Scripted:
    """Grades each text by its scripted answer against the item's gold: 1.0 equal (numbers: within 1e-2), else 0.1
    (the ReFT rewards); None: no answer; "fault": the grader's. Sub-score `a`: 1 for greedy answers, 0 for samples."""

    def __init__(self, answers, **attrs):
        self.answers = answers
        self.__dict__.update(attrs)

    def validate(self, item):
        pass

    def grade_batch(self, items, texts):
        from reftjax.graders.base import Grade, faulted

        def one(item, text):
            a = self.answers.get(text)
            if a == "fault":
                return faulted("judge: refused")
            try:
                right = abs(float(a) - float(item["gold"])) <= 1e-2
            except (TypeError, ValueError):
                right = a == item["gold"]
            return Grade(1.0 if right else 0.0 if a is None else 0.1, extracted=a,
                         details={"scores": {"a": float(text.startswith("g"))}})

        return [one(item, text) for item, text in zip(items, texts)]


def test_evaluate_grades_each_prompts_own_samples_and_counts_only_real_rows(monkeypatch):
    """evaluate() on host stand-ins, figures worked out by hand: 3 prompts in batches of 2 (the second padded), each
    voting prompt in a rollout of its own (voting_rows = k), voting_tol reaching the vote, the padded row in no
    figure, the voting samples' faults and sub-scores apart (each a mutant that passed the host tests, or every
    test: mutation review, session 55)."""
    import jax

    import reftjax.evaluate as ev

    calls, _ = _host_stand_ins(monkeypatch, 3)
    items = [{"item_id": "q0", "gold": "3.33"}, {"item_id": "q1", "gold": "7"}, {"item_id": "q2", "gold": "1"}]
    grader = _Scripted({"g0": "3.33", "g1": "8", "g2": "1",
                        "v0.0": "5", "v0.1": "3.33", "v0.2": "3.333",  # one answer within voting_tol: 2 votes to 1
                        "v1.0": "7", "v1.1": "7", "v1.2": "8", "v2.0": "2", "v2.1": "2", "v2.2": "fault"})
    done = []
    progress = type("Progress", (), {"update": lambda self, k: done.append(k)})()
    cfg = EvalConfig(batch_size=2, max_new_tokens=8, voting_k=3, voting_temperature=0.5, voting_rows=3,
                     decode_segments=2, voting_tol=0.01)
    res = ev.evaluate(None, type("M", (), {"eos_token_ids": (2,)})(), None, None, items, grader, cfg,
                      rng=jax.random.key(5), progress=progress, stop_sequences=[[7]])
    assert (res["n"], res["accuracy"], res["mean_score"], res["mean_length"]) == (3, 2 / 3, 2.1 / 3, 5.0)
    assert [s["voting_correct"] for s in res["samples"]] == [True, True, False] and res["voting_accuracy"] == 2 / 3
    assert [(s["item_id"], s["completion"], s["extracted"]) for s in res["samples"]] == [
        ("q0", "g0", "3.33"), ("q1", "g1", "8"), ("q2", "g2", "1")]
    assert (res["grader_errors"], res["voting_samples"], res["voting_grader_errors"]) == (0, 9, 1)
    assert "grader_failure" not in res and "voting_grader_failure" not in res
    assert res["score_a"] == 1.0 and [s["scores"] for s in res["samples"]] == [{"a": 1.0}] * 3  # the greedy answers'
    assert done == [2, 1]  # real rows only
    # a greedy rollout per batch, then one voting rollout per prompt (the padded one too); the model's EOS, the stop
    # sequences and the decode stretches reach both kinds
    assert [(greedy, prompts) for greedy, _, prompts, _ in calls] == [
        (True, [0, 1]), (False, [0]), (False, [1]), (True, [2, -1]), (False, [2]), (False, [-1])]
    assert {(c.eos_ids, c.stop_sequences, c.decode_segments, c.max_new_tokens) for _, c, _, _ in calls} == {
        ((2,), ((7,),), 2, 8)}
    assert {(c.n, c.temperature) for greedy, c, _, _ in calls if not greedy} == {(3, 0.5)}
    keys = [key for greedy, _, _, key in calls if not greedy]
    assert len(set(keys)) == 4  # each voting rollout its own key: no two prompts draw the same samples
    assert {key for greedy, _, _, key in calls if greedy} == {_key(jax.random.key(5))}  # (greedy: no key used)
    res = ev.evaluate(None, type("M", (), {"eos_token_ids": (2,)})(), None, None, items, grader,
                      dataclasses.replace(cfg, voting_tol=0.0), rng=jax.random.key(5))
    assert res["voting_accuracy"] == 1 / 3  # by value alone: 5, 3.33 and 3.333 tie, the first seen (5) wins


def test_rerank_figures_on_host_stand_ins(monkeypatch):
    """rerank@k with a MathQA grader picks option letters only; a grader recording only a score gets no voting@k
    and no verifier-weighted voting (a vote on right / wrong), but rerank@k and its faults still count; the
    verifier needs voting samples (mutation review, session 55)."""
    import jax

    import reftjax.evaluate as ev

    scores = {(0, 0): 0.9, (0, 1): 0.6, (0, 2): 0.1, (1, 0): 0.2, (1, 1): 0.2, (1, 2): 0.3}
    _, chunks = _host_stand_ins(monkeypatch, 2, scores)
    items = [{"item_id": "q0", "gold": "b"}, {"item_id": "q1", "gold": "c"}]
    answers = {"g0": "a", "g1": "c", "v0.0": "5", "v0.1": "b", "v0.2": "a", "v1.0": "c", "v1.1": "c", "v1.2": "d"}
    cfg = EvalConfig(batch_size=2, max_new_tokens=8, voting_k=3, rerank_chunk_rows=5)
    model = type("M", (), {"eos_token_ids": (2,)})()

    def run(grader, cfg=cfg):
        return ev.evaluate(None, model, None, None, items, grader, cfg, rng=jax.random.key(0), verifier="v")

    res = run(_Scripted(answers, answer_type="mathqa"))
    # prompt 0: the verifier favours "5", not a letter: its pick is "b" (right); all three tie, "5" first, and "5"
    # outweighs "b": voting and weighted voting wrong. Prompt 1: "c" x2 wins both votes, the pick "d" is wrong
    assert (res["accuracy"], res["voting_accuracy"], res["rerank_accuracy"], res["weighted_voting_accuracy"],
            res["upper_bound_accuracy"]) == (0.5, 0.5, 0.5, 0.5, 1.0)
    assert chunks == [5]
    assert run(_Scripted(answers))["rerank_accuracy"] == 0.0  # any answer may be picked: "5" (wrong) and "d"
    res = run(_Scripted(answers, votes_on_answer=False))
    assert (res["voting_accuracy"], res["weighted_voting_accuracy"], res["rerank_accuracy"]) == (None, None, 0.0)
    faulty = _Scripted({**answers, **{f"v{i}.{s}": "fault" for i in range(2) for s in range(3)}}, votes_on_answer=False)
    res = run(faulty)
    assert res["voting_grader_failure"] == "judge: refused" and res["voting_grader_errors"] == 6
    with pytest.raises(ValueError, match="rerank@k needs voting samples: set EvalConfig.voting_k > 0"):
        run(_Scripted(answers), dataclasses.replace(cfg, voting_k=0))


def test_a_grader_that_cannot_read_the_items_fails_before_any_rollout(tiny_hf_dir, monkeypatch):
    # `type: gsm8k` reads `answer` by default; the built-in items carry `answer_value`: it used to grade every row 0
    import reftjax.evaluate as ev
    from reftjax.graders import build_grader

    monkeypatch.setattr(ev, "rollout", lambda *a, **k: pytest.fail("rollout ran"))
    with pytest.raises(KeyError, match="answer"):
        ev.evaluate(None, None, None, None, [{"question": "q", "answer_value": "3"}], build_grader({"type": "gsm8k"}),
                    EvalConfig(batch_size=4, max_new_tokens=8))


def test_voting_is_not_reported_for_a_grader_that_records_only_a_score(tiny_hf_dir, shared_data, monkeypatch,
                                                                        caplog):
    """A python grader's `extracted` is the score its grade() returned: voting@k voted on right/wrong (3 wrong
    samples outvoted 2 correct ones; helper review), so it is not reported (None: "-" in the summary)."""
    from reftjax.evaluate import evaluate
    from reftjax.graders import build_grader

    model, data = _tiny_model_and_data(tiny_hf_dir, shared_data, monkeypatch)
    grader = build_grader({"type": "python", "source": "def grade(sample, item):\n    return 0.25"})
    res = evaluate(model.params, model.config, model.tokenizer, data.test_ds, data.test_items, grader,
                   EvalConfig(batch_size=2, max_new_tokens=4, voting_k=2), eos_ids=tuple(model.config.eos_token_ids),
                   pad_id=model.tokenizer.pad_token_id)
    assert res["n"] == 2 and res["accuracy"] == 0.0 and res["voting_accuracy"] is None
    # partial credit: accuracy (score 1) stays 0, the mean score is what selects its best checkpoint (session 21)
    assert res["mean_score"] == pytest.approx(0.25)
    assert res["seconds"] > 0 and not any(k.startswith("score_") for k in res)  # (a duration; no sub-graders)
    assert res["grader_errors"] == 0
    # a grader that fails on every answer (an item field the data lacks) reported 0% as the model's, without a word
    # (bad-input review, session 35): its faults are counted and said
    broken = build_grader({"type": "python", "source": "def grade(sample, item):\n    return item['reference']"})
    with caplog.at_level("WARNING", logger="reftjax"):
        res = evaluate(model.params, model.config, model.tokenizer, data.test_ds, data.test_items, broken,
                       EvalConfig(batch_size=2, max_new_tokens=4), eos_ids=tuple(model.config.eos_token_ids),
                       pad_id=model.tokenizer.pad_token_id)
    assert res["accuracy"] == 0.0 and res["grader_errors"] == 2
    assert res["grader_failure"] == "error: KeyError: 'reference'"  # (the training loop stops on it; session 43)
    assert any("the grader failed on all 2 answers (the first: error: KeyError: 'reference')" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    # a multi grader's mean sub-scores, as the RL metrics log them (evaluations had none; session 26's list)
    multi = build_grader({"type": "multi", "calculate_output": "0.5 * a + 0.5 * b", "graders": {
        "a": {"type": "python", "source": "def grade(sample, item):\n    return 0.25"},
        "b": {"type": "string_check", "input": "{{sample.output_text}}", "reference": "", "operation": "ne"}}})
    res = evaluate(model.params, model.config, model.tokenizer, data.test_ds, data.test_items, multi,
                   EvalConfig(batch_size=2, max_new_tokens=4), eos_ids=tuple(model.config.eos_token_ids),
                   pad_id=model.tokenizer.pad_token_id)
    assert res["score_a"] == pytest.approx(0.25) and res["score_b"] in (0.0, 0.5, 1.0)
    assert [s["scores"]["a"] for s in res["samples"]] == [0.25, 0.25]  # and each answer's, as RL samples have
    assert res["mean_score"] == pytest.approx(0.5 * 0.25 + 0.5 * res["score_b"])


def test_voting_samples_the_grader_failed_on_are_counted_and_all_of_them_stop_the_run(tiny_hf_dir, shared_data,
                                                                                     monkeypatch, caplog):
    """A grader failing on the voting samples only (a judge that went down after grading the greedy answers) scored
    voting@k 0 whatever the model wrote, uncounted: only the greedy answers' faults were (session 43's Known limits).
    They are counted apart (`voting_grader_errors`, in the summaries too); all of them faulted stops the run like
    all greedy answers faulted, unless no figure is drawn from them (a grader that records only a score)."""
    from reftjax import train as T
    from reftjax.evaluate import evaluate
    from reftjax.graders import build_grader
    from reftjax.graders.base import faulted

    model, data = _tiny_model_and_data(tiny_hf_dir, shared_data, monkeypatch)

    class DownAfter:
        """A judge that goes down after its first `ok` answers (the 2 greedy ones, then the 2 x 3 voting samples)."""

        def __init__(self, inner, ok):
            self.inner, self.ok, self.seen = inner, ok, 0
            self.votes_on_answer = getattr(inner, "votes_on_answer", True)

        def validate(self, item):
            self.inner.validate(item)

        def grade_batch(self, items, texts):
            n = max(0, min(len(texts), self.ok - self.seen))
            self.seen += len(texts)
            return self.inner.grade_batch(items[:n], texts[:n]) + [
                faulted("judge: http://j/v1/chat/completions: URLError: refused") for _ in texts[n:]]

    def run(grader):
        return evaluate(model.params, model.config, model.tokenizer, data.test_ds, data.test_items, grader,
                        EvalConfig(batch_size=2, max_new_tokens=4, voting_k=3),
                        eos_ids=tuple(model.config.eos_token_ids), pad_id=model.tokenizer.pad_token_id)

    reft = build_grader(ExperimentConfig().grader_dict)
    res = run(DownAfter(reft, 99))
    assert (res["grader_errors"], res["voting_samples"], res["voting_grader_errors"]) == (0, 6, 0)
    T.check_evaluation("test_sft", res)
    res = run(DownAfter(reft, 5))  # the second prompt's voting samples faulted: counted, recorded
    assert (res["grader_errors"], res["voting_grader_errors"]) == (0, 3) and "voting_grader_failure" not in res
    T.check_evaluation("test_sft", res)
    with caplog.at_level("WARNING", logger="reftjax"):
        res = run(DownAfter(reft, 2))  # every voting sample faulted
    assert (res["grader_errors"], res["voting_grader_errors"], res["voting_accuracy"]) == (0, 6, 0.0)
    assert any("the grader failed on all 6 voting samples (the first: judge: http://j" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    with pytest.raises(T.GraderFailure, match=r"evaluation test_sft: the grader failed on all 6 voting samples \(the "
                                              r"first: judge: http://j/v1/chat/completions: URLError: refused\); "
                                              r"stopped before recording it, which would have scored voting@k 0"):
        T.check_evaluation("test_sft", res)
    # a grader recording only a score: no voting@k figure, so nothing to stop for (its faults still counted)
    score_only = build_grader({"type": "python", "source": "def grade(sample, item):\n    return 0.25"})
    res = run(DownAfter(score_only, 2))
    assert res["voting_accuracy"] is None and res["voting_grader_errors"] == 6 and "voting_grader_failure" not in res
    T.check_evaluation("test_sft", res)
    # ... unless a verifier draws rerank@k from them (a stand-in's scores: rerank@k is 0 whatever they are)
    import numpy as np

    import reftjax.evaluate as ev

    monkeypatch.setattr(ev, "verifier_scores", lambda verifier, prompts, mask, tokens, *a, **k: np.zeros(len(tokens)))
    res = evaluate(model.params, model.config, model.tokenizer, data.test_ds, data.test_items,
                   DownAfter(score_only, 2), EvalConfig(batch_size=2, max_new_tokens=4, voting_k=3),
                   eos_ids=tuple(model.config.eos_token_ids), pad_id=model.tokenizer.pad_token_id, verifier="verifier")
    assert res["voting_accuracy"] is None and res["rerank_accuracy"] == 0.0 and res["voting_grader_errors"] == 6
    with pytest.raises(T.GraderFailure, match="the grader failed on all 6 voting samples"):
        T.check_evaluation("test_sft", res)


def test_voting_rollouts_are_split_to_bound_their_rows(tiny_hf_dir, shared_data, monkeypatch):
    """One voting rollout sampled batch_size x voting_k rows (the paper preset: 64 x 100, a ~2 TiB KV cache for a
    7B model). eval.voting_rows caps the rows of each; figures are computed over the same samples per prompt."""
    import reftjax.evaluate as ev
    from reftjax.graders import build_grader
    from reftjax.hf import load_model
    from reftjax.train import prepare_data

    monkeypatch.setenv("REFTJAX_GSM8K_DIR", str(shared_data / "gsm8k"))
    cfg = ExperimentConfig()
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, n_train=4, n_val=4, n_test=6))
    model = load_model(tiny_hf_dir)
    data = prepare_data(cfg, model.tokenizer)
    rows, real = [], ev.rollout

    def recording(params, tokens, *args, cfg, **kw):
        if not cfg.greedy:
            rows.append(tokens.shape[0] * cfg.n)
        return real(params, tokens, *args, cfg=cfg, **kw)

    monkeypatch.setattr(ev, "rollout", recording)
    ecfg = EvalConfig(batch_size=4, max_new_tokens=8, voting_k=3, voting_rows=6)
    res = ev.evaluate(model.params, model.config, model.tokenizer, data.test_ds, data.test_items,
                      build_grader(cfg.grader_dict), ecfg, pad_id=model.tokenizer.pad_token_id)
    assert rows == [6, 6, 6, 6]  # 2 batches of 4 prompts, each voted on in 2 rollouts of 2 prompts x 3 samples
    assert res["n"] == 6 and len(res["samples"]) == 6 and "voting_accuracy" in res
    with pytest.raises(ValueError, match="voting_temperature must be > 0"):
        EvalConfig(voting_k=4, voting_temperature=0.0)


def test_rerank_figures_are_drawn_from_each_prompts_own_samples(tiny_hf_dir, shared_data, monkeypatch):
    """voting@k, rerank@k, verifier-weighted voting and the upper bound (some sample right) over the same voting
    samples, each prompt's k alone: scripted grades and verifier scores give figures worked out by hand."""
    import numpy as np

    import reftjax.evaluate as ev
    from reftjax.graders.base import Grade

    model, data = _tiny_model_and_data(tiny_hf_dir, shared_data, monkeypatch)

    class Scripted:
        """Greedy answers wrong; prompt 0's samples 7, 7 and a right 42, prompt 1's 7, 8 and a right 42 (its verifier
        scores favour the wrong 7: figures read from the other prompt's scores would call it right; the earlier all
        wrong 9 hid that, mutation review, session 48)."""

        def validate(self, item):
            pass

        def grade_batch(self, items, texts):
            if len(texts) == 2:
                return [Grade(0.0, extracted="1")] * 2
            return [Grade(float(a == "42"), extracted=a) for a in ("7", "7", "42", "7", "8", "42")]

    scores = np.array([0.1, 0.1, 0.9, 0.9, 0.1, 0.1])  # the verifier favours 42 for prompt 0, 7 for prompt 1
    monkeypatch.setattr(ev, "verifier_scores", lambda verifier, prompts, mask, tokens, *a, **k: scores[:len(tokens)])
    res = ev.evaluate(model.params, model.config, model.tokenizer, data.test_ds, data.test_items, Scripted(),
                      EvalConfig(batch_size=2, max_new_tokens=4, voting_k=3), pad_id=model.tokenizer.pad_token_id,
                      verifier="verifier")
    assert (res["accuracy"], res["voting_accuracy"], res["rerank_accuracy"], res["weighted_voting_accuracy"],
            res["upper_bound_accuracy"]) == (0.0, 0.0, 0.5, 0.5, 1.0)
    assert [s["voting_correct"] for s in res["samples"]] == [False, False]
