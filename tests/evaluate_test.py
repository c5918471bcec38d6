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
    from reftjax.evaluate import voting_prompts
    from reftjax.graders import build_grader
    from reftjax.hf import load_model
    from reftjax.train import prepare_data

    assert [voting_prompts(64, 100, 400), voting_prompts(64, 16, 512), voting_prompts(64, 100, 0),
            voting_prompts(6, 4, 8), voting_prompts(7, 4, 8), voting_prompts(4, 2, 100)] == [4, 32, 64, 2, 1, 4]
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
