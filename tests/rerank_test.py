"""The verifier (reftjax.rerank): last-token pooling, BCE vs NumPy, learning on 1 and 8 devices, rerank@k selection."""
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reftjax import sharding
from reftjax.models import ModelConfig, forward, init_params
from reftjax.rerank import (RerankConfig, VerifierData, abstract_verifier, any_correct, collect, completion_logits,
                            dedup_rows, init_verifier, make_verifier_step, pick, rerank_correct, token_level_loss,
                            verifier_logits, verifier_loss, verifier_scores)
from reftjax.steps import OptimConfig, init_state, make_optimizer

CFG = ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                  eos_token_ids=(1,))
GOOD = 7  # synthetic task: a solution is "correct" iff its last real token is GOOD


@functools.lru_cache(maxsize=None)
def _host_verifier(seed=0):
    return jax.tree.map(np.asarray, init_verifier(init_params(CFG, jax.random.key(seed)), CFG, jax.random.key(1)))


def test_logit_reads_the_final_hidden_state_of_the_last_real_token():
    v = jax.tree.map(jnp.asarray, _host_verifier())
    rows = [([3, 4, 5], [6, 8, 9, 1]), ([4, 5], [6, 8])]  # (prompt, completion): left- and right-padded below
    p_len, n_len = 5, 6
    pt = np.array([[0] * (p_len - len(p)) + p for p, _ in rows], np.int32)
    ct = np.array([c + [0] * (n_len - len(c)) for _, c in rows], np.int32)
    # (both jit-compiled: called eagerly they dispatched ~190 small programs, ~16 s of the suite's compiles)
    got = np.asarray(jax.jit(verifier_logits, static_argnums=1)(v, CFG, pt, pt != 0, ct, ct != 0))
    want = []
    for p, c in rows:  # each row alone, unpadded: the logit comes from the last token's final hidden state
        seq = jnp.asarray([p + c], jnp.int32)
        _, hidden = jax.jit(forward, static_argnums=1)(v["backbone"], CFG, seq, jnp.ones_like(seq, bool))
        want.append(float(hidden[0, -1] @ v["score"]["kernel"] + v["score"]["bias"]))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert abs(want[0] - want[1]) > 1e-4
    np.testing.assert_allclose(np.asarray(verifier_scores(v, pt, pt != 0, ct, ct != 0, model_cfg=CFG)),
                               1 / (1 + np.exp(-got)), rtol=1e-6)


@pytest.mark.parametrize("chunk_rows", [4, 6, 8, 12])  # 8: chunks of gcd(12, 8) = 4
def test_chunked_scores_equal_the_one_pass_scores(chunk_rows):
    v = jax.tree.map(jnp.asarray, _host_verifier())
    vd = _synthetic(n=12)
    args = (vd.prompt_tokens, vd.prompt_mask, vd.tokens, vd.mask)
    whole = np.asarray(verifier_scores(v, *args, model_cfg=CFG))
    np.testing.assert_allclose(np.asarray(verifier_scores(v, *args, model_cfg=CFG, chunk_rows=chunk_rows)), whole,
                               rtol=1e-5, atol=1e-6)
    assert np.unique(np.round(whole, 5)).size > 6  # rows really differ, so a row permutation would be caught


def test_loss_and_accuracy_match_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=16).astype(np.float32) * 3
    labels = (rng.random(16) < 0.5).astype(np.float32)
    weights = (np.arange(16) < 13).astype(np.float32)
    loss, acc = verifier_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(weights))
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    bce = -(labels * np.log(p) + (1 - labels) * np.log(1 - p))
    np.testing.assert_allclose(float(loss), (bce * weights).sum() / weights.sum(), rtol=1e-5)
    np.testing.assert_allclose(float(acc), (((logits > 0) == (labels > 0.5)) * weights).sum() / weights.sum())
    g = jax.grad(lambda x: verifier_loss(x, jnp.asarray(labels), jnp.asarray(weights))[0])(jnp.asarray(logits))
    np.testing.assert_allclose(np.asarray(g), (p - labels) * weights / weights.sum(), rtol=1e-4, atol=1e-7)


def test_token_level_loss_matches_numpy_and_each_slot_sees_only_its_prefix():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(4, 6)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]], bool)
    labels, weights = np.array([1.0, 0.0, 1.0, 0.0], np.float32), np.array([1.0, 1.0, 1.0, 0.0], np.float32)
    p = 1 / (1 + np.exp(-z.astype(np.float64)))
    bce = -(labels[:, None] * np.log(p) + (1 - labels[:, None]) * np.log(1 - p))
    per_row = (bce * mask).sum(1) / mask.sum(1)
    got = token_level_loss(jnp.asarray(z), jnp.asarray(mask), jnp.asarray(labels), jnp.asarray(weights))
    np.testing.assert_allclose(float(got), (per_row * weights).sum() / weights.sum(), rtol=1e-5)
    v = jax.tree.map(jnp.asarray, _host_verifier())
    pt = np.full((2, 3), 3, np.int32)
    ct = np.array([[6, 8, 9, 1], [6, 8, 4, 4]], np.int32)  # same first two tokens
    zz = np.asarray(completion_logits(v, CFG, pt, pt != 0, ct, ct != 0))
    np.testing.assert_allclose(zz[0, :2], zz[1, :2], rtol=1e-6, atol=1e-6)  # causal: a slot ignores later tokens
    assert np.abs(zz[0, 2:] - zz[1, 2:]).min() > 1e-6


def test_token_level_step_trains_and_reports_the_last_slot_accuracy():
    vd = _synthetic()
    tx = make_optimizer(OptimConfig(learning_rate=3e-3, schedule="constant", warmup_ratio=0.0), 100)
    state = init_state({"verifier": jax.tree.map(jnp.asarray, _host_verifier())}, tx, jax.random.key(0))
    step = make_verifier_step(CFG, tx, token_level=True)
    first = None
    for e in range(6):
        for b in vd.batches(16, seed=e):
            state, m = step(state, b)
            first = float(m["loss"]) if first is None else first
    assert float(m["loss"]) < 0.8 * first
    held = _synthetic(seed=1)
    scores = np.asarray(verifier_scores(state.params["verifier"], held.prompt_tokens, held.prompt_mask, held.tokens,
                                        held.mask, model_cfg=CFG))
    assert ((scores > 0.5) == (held.labels > 0.5)).mean() > 0.9


def test_a_verifier_step_reports_the_token_level_loss_when_asked():
    """The step's loss is `token_level_loss` over every slot when asked, the last slot's BCE otherwise (mutants
    dropping `token_level` in the step or in `make_verifier_step` trained the last slot only, and the test above,
    which only sees the loss fall, passed: mutation review, session 45)."""
    b = next(_synthetic(n=12).batches(16, seed=0))  # 4 padded rows: weight 0 in either loss (second round, session 48)
    assert b["weights"].sum() == 12
    params = jax.tree.map(jnp.asarray, _host_verifier())
    z = completion_logits(params, CFG, b["prompt_tokens"], b["prompt_mask"], b["tokens"], b["mask"])
    want_tl = float(token_level_loss(z, jnp.asarray(b["mask"]), jnp.asarray(b["labels"]), jnp.asarray(b["weights"])))
    want_last = float(verifier_loss(verifier_logits(params, CFG, b["prompt_tokens"], b["prompt_mask"], b["tokens"],
                                                    b["mask"]), jnp.asarray(b["labels"]), jnp.asarray(b["weights"]))[0])
    assert abs(want_tl - want_last) > 1e-3
    tx = make_optimizer(OptimConfig(learning_rate=1e-3, schedule="constant", warmup_ratio=0.0), 10)
    for token_level, want in ((True, want_tl), (False, want_last)):
        state = init_state({"verifier": jax.tree.map(jnp.asarray, _host_verifier())}, tx, jax.random.key(0))
        _, m = make_verifier_step(CFG, tx, token_level=token_level)(state, b)
        np.testing.assert_allclose(float(m["loss"]), want, rtol=1e-5)


def _synthetic(n=96, seed=0) -> VerifierData:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 6, n)
    tokens = np.zeros((n, 6), np.int32)
    for i, length in enumerate(lengths):
        tokens[i, :length] = rng.integers(2, CFG.vocab_size, length)
        if i % 3 == 0:
            tokens[i, length - 1] = GOOD
    mask = tokens != 0
    last = tokens[np.arange(n), lengths - 1]
    return VerifierData(prompt_tokens=np.full((n, 3), 3, np.int32), prompt_mask=np.ones((n, 3), bool), tokens=tokens,
                        mask=mask, labels=(last == GOOD).astype(np.float32), example_idx=np.arange(n) // 4)


def _train(mesh=None, epochs=6, batch_size=16):
    vd = _synthetic()
    steps = epochs * -(-len(vd) // batch_size)
    tx = make_optimizer(OptimConfig(learning_rate=3e-3, schedule="constant", warmup_ratio=0.0), steps)
    params, policy = _host_verifier(), None
    if mesh is not None:  # as run_rerank builds it: init_verifier places the fresh head on the policy's mesh
        policy = sharding.place_params(init_params(CFG, jax.random.key(0)), CFG, mesh)
        params = init_verifier(policy, CFG, jax.random.key(1))
        assert all(isinstance(x.sharding, jax.sharding.NamedSharding) for x in jax.tree.leaves(params["score"]))
        # a resumed run restores onto abstract_verifier: the same shardings (a head left on one device failed the step)
        abstract = abstract_verifier(policy, CFG, jax.random.key(1))
        assert jax.tree.leaves(jax.tree.map(lambda a, x: a.sharding == x.sharding, abstract, params)) == \
            [True] * len(jax.tree.leaves(params))
    state = init_state({"verifier": jax.tree.map(jnp.asarray, params)}, tx, jax.random.key(0))
    step = make_verifier_step(CFG, tx)
    losses = []
    for e in range(epochs):
        for b in vd.batches(batch_size, seed=e):
            state, m = step(state, b if mesh is None else sharding.shard_batch(b, mesh))
            losses.append(float(m["loss"]))
    # the step donates the verifier: its backbone is a copy, the policy (RL starts from it) is not deleted
    assert policy is None or not any(x.is_deleted() for x in jax.tree.leaves(policy))
    return vd, state, losses, step


def test_verifier_learns_the_synthetic_rule_and_reranks_with_it():
    vd, state, losses, step = _train()
    assert step._cache_size() == 1  # one program for every batch, the padded last one included
    assert np.mean(losses[-3:]) < 0.25 * losses[0]
    held = _synthetic(seed=1)
    scores = np.asarray(verifier_scores(state.params["verifier"], held.prompt_tokens, held.prompt_mask, held.tokens,
                                        held.mask, model_cfg=CFG))
    assert ((scores > 0.5) == (held.labels > 0.5)).mean() > 0.95
    # rerank@4 over held-out groups of 4 with at least one correct sample: the verifier finds it
    grades = [types.SimpleNamespace(score=float(y), extracted="x") for y in held.labels]
    groups = [range(i, i + 4) for i in range(0, len(held), 4) if held.labels[i:i + 4].any()]
    assert len(groups) > 10
    assert np.mean([rerank_correct(scores[list(g)], [grades[j] for j in g]) for g in groups]) > 0.95


def test_verifier_step_on_8_devices_matches_one_device():
    _, one, losses_1, _ = _train(epochs=1)
    _, eight, losses_8, _ = _train(sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=4)), epochs=1)
    np.testing.assert_allclose(losses_8, losses_1, rtol=2e-4, atol=1e-6)
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(eight.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-3, atol=2e-5)


def test_pick_skips_unanswered_samples_and_breaks_ties_by_order():
    g = lambda s, e="1": types.SimpleNamespace(score=s, extracted=e)  # noqa: E731
    assert pick([0.2, 0.9, 0.9], [True, True, True]) == 1
    assert pick([0.2, 0.9, 0.5], [True, False, True]) == 2
    assert pick([0.9], [False]) is None
    assert pick([0.0, 0.0], [True, True]) == 0 and pick([-2.0, -1.0], [True, True]) == 1  # (a float32 sigmoid can be 0)
    assert rerank_correct([0.1, 0.8, 0.3], [g(1.0), g(0.1), g(1.0)]) is False
    assert rerank_correct([0.1, 0.8, 0.3], [g(1.0), g(1.0, None), g(1.0)]) is True  # best one has no answer
    assert rerank_correct([0.9], [g(0.0, "")]) is False
    assert any_correct([g(0.1), g(1.0)]) and not any_correct([g(0.1), g(0.0)])


def test_mathqa_rerank_picks_option_letters_only():
    """The authors' evaluate_rerank keeps a MathQA prediction only if it is one letter; reftjax picked a top-scored
    "5" (wrong) over a correct "b" (review, session 28). Voting keeps any one-character answer, as theirs."""
    from reftjax.graders.reft import ReftGrader

    grades = ReftGrader(answer_type="mathqa").grade_batch(
        [{"answer_value": "b"}] * 2, ["x\nTherefore, the answer is: 5", "x\nTherefore, the answer is: b"])
    assert [g.score for g in grades] == [0.1, 1.0] and all(g.error is None for g in grades)
    assert rerank_correct([0.9, 0.6], grades, letters_only=True) is True
    assert rerank_correct([0.9, 0.6], grades) is False
    # evaluation applies the rule to a MathQA grader inside a multi grader too (regression review)
    from reftjax.evaluate import _grades_mathqa
    from reftjax.graders.build import build_grader

    multi = build_grader({"type": "multi", "calculate_output": "a", "graders": {"a": {"type": "reft",
                                                                                     "answer_type": "mathqa"}}})
    assert _grades_mathqa(multi) and _grades_mathqa(ReftGrader(answer_type="mathqa"))
    assert not _grades_mathqa(ReftGrader()) and not _grades_mathqa(build_grader({"type": "multi",
                                                                                  "calculate_output": "a",
                                                                                  "graders": {"a": {"type": "reft"}}}))


def test_a_verifier_shorter_than_the_evaluation_is_refused():
    """gpu/tpu/paper trained the verifier on 256-token solutions and scored 400-token ones (review, session 28)."""
    import dataclasses

    from experiments.gsm8k_reft import preset_config

    for preset in ("cpu", "gpu", "tpu", "paper"):
        cfg = preset_config(preset)
        assert cfg.rerank.max_new_tokens >= cfg.eval.max_new_tokens, preset
        dataclasses.replace(cfg, rerank=dataclasses.replace(cfg.rerank, epochs=3),
                            eval=dataclasses.replace(cfg.eval, voting_k=cfg.eval.voting_k or 4))
    with pytest.raises(ValueError, match="rerank.max_new_tokens=256 is shorter than eval.max_new_tokens=400"):
        dataclasses.replace(cfg, rerank=dataclasses.replace(cfg.rerank, epochs=3, max_new_tokens=256))


def test_weighted_voting_sums_the_verifier_scores_per_answer():
    from reftjax.evaluate import majority_correct

    g = lambda s, e: types.SimpleNamespace(score=s, extracted=e)  # noqa: E731
    grades = [g(0.1, "3"), g(0.1, "3.0"), g(1.0, "4"), g(0.1, None)]
    assert majority_correct(grades) is False  # "3" and "3.0" are one answer: 2 votes to 1
    assert majority_correct(grades, [0.3, 0.3, 0.7, 0.99]) is True  # 0.7 > 0.6; the unanswered sample has no vote
    assert majority_correct(grades, [0.4, 0.4, 0.7, 0.0]) is False
    assert majority_correct([g(1.0, "5"), g(0.1, "6")], [0.5, 0.5]) is True  # tie: first seen


def test_collect_left_pads_prompts_from_different_buckets_and_dedup_keeps_first():
    a = {"prompt_tokens": np.array([[5, 6]]), "prompt_mask": np.array([[1, 1]]), "tokens": np.array([[7, 1]]),
         "mask": np.array([[1, 1]]), "labels": np.array([1.0]), "example_idx": np.array([0])}
    b = {"prompt_tokens": np.array([[0, 4, 5, 6]]), "prompt_mask": np.array([[0, 1, 1, 1]]),
         "tokens": np.array([[8, 0]]), "mask": np.array([[1, 0]]), "labels": np.array([0.0]),
         "example_idx": np.array([1])}
    vd = collect([a, b], pad_id=2)
    np.testing.assert_array_equal(vd.prompt_tokens, [[2, 2, 5, 6], [0, 4, 5, 6]])
    np.testing.assert_array_equal(vd.prompt_mask, [[0, 0, 1, 1], [0, 1, 1, 1]])
    assert vd.labels.tolist() == [1.0, 0.0] and vd.example_idx.tolist() == [0, 1]
    assert dedup_rows(["x", "y", "x", "x"], [0, 0, 0, 1]) == [0, 1, 3]
    with pytest.raises(ValueError, match="no verifier training rows"):
        collect([], 0)


def test_data_round_trips_and_batches_cover_every_row_once(tmp_path):
    vd = _synthetic(n=37)
    vd.save(tmp_path / "v.npz")
    back = VerifierData.load(tmp_path / "v.npz")
    for f in ("prompt_tokens", "prompt_mask", "tokens", "mask", "labels", "example_idx"):
        np.testing.assert_array_equal(getattr(back, f), getattr(vd, f))
    assert not list(tmp_path.glob("*.tmp*"))
    batches = list(vd.batches(16, seed=3))
    assert [b["tokens"].shape[0] for b in batches] == [16, 16, 16]
    assert sum(b["weights"].sum() for b in batches) == 37
    assert [b["weights"].tolist() for b in batches] == [[1.0] * 16, [1.0] * 16, [1.0] * 5 + [0.0] * 11]
    # each epoch's order comes from its seed (run_rerank: rc.seed + epoch; a resume replays it)
    first = lambda seed: next(vd.batches(16, seed=seed))["tokens"]  # noqa: E731
    np.testing.assert_array_equal(first(3), batches[0]["tokens"])
    assert not np.array_equal(first(4), first(3))


def test_config_checks():
    from reftjax.config import ExperimentConfig
    from reftjax.evaluate import EvalConfig

    with pytest.raises(ValueError, match="voting_k"):
        ExperimentConfig(rerank=RerankConfig(epochs=1), eval=EvalConfig(voting_k=0))
    with pytest.raises(ValueError, match="temperature"):
        RerankConfig(temperature=0.0)
    # (each a mutant that passed: mutation review, session 45)
    for bad, match in ((dict(samples_per_question=0), "samples_per_question, batch_size"),
                       (dict(n_questions=0), "n_questions >= 1"), (dict(max_new_tokens=0), "max_new_tokens >= 1"),
                       (dict(optim=OptimConfig(learning_rate=1e-6, value_head_lr_scale=10.0)), "value_head_lr_scale"),
                       # (second round, session 48)
                       (dict(epochs=-1), "epochs >= 0"), (dict(batch_size=0), "batch_size"),
                       (dict(prompts_per_batch=0), "prompts_per_batch >= 1"),
                       (dict(temperature=float("inf")), "finite"),
                       (dict(seed=-1), "seed >= 0; got None, 256, -1")):
        with pytest.raises(ValueError, match=match):
            RerankConfig(**bad)
    assert ExperimentConfig().rerank.epochs == 0  # off unless asked for


def test_unparseable_answers_neither_vote_nor_get_picked():
    """ReftGrader keeps the text it could not parse in `extracted` (for the logs) with an `error`: such samples
    must not outvote two correct ones, win a tie by coming first, or be the verifier's pick."""
    from reftjax.evaluate import majority_correct
    from reftjax.graders import Grade, ReftGrader

    item = {"answer_value": "42"}
    texts = ["so\nTherefore, the answer is: 42"] * 2 + ["so\nTherefore, the answer is: unknown"] * 3
    grades = ReftGrader().grade_batch([item] * 5, texts)
    assert [g.score for g in grades] == [1.0, 1.0, 0.0, 0.0, 0.0] and grades[2].extracted == "unknown"
    assert majority_correct(grades) is True
    assert majority_correct(grades[2:] + grades[:1]) is True  # unparseable first, then one correct sample
    program_none = Grade(0.0, extracted="None", error="result 'None' is not a number")  # a P-CoT program's grade
    assert majority_correct([grades[0]] + [program_none] * 3) is True
    assert rerank_correct([0.2, 0.9, 0.9], [grades[0], grades[2], program_none]) is True


def test_numeric_votes_are_by_value_and_within_a_tolerance_when_asked():
    """Grading counts a value within 1e-2 of the gold as right, but the vote keyed answers by 4 decimals, so
    3.33, 3.333 and 3.3333 (three right answers) split their votes and lost to two votes for 5: with
    eval.voting_tol=0.01 they are one answer; by default the vote is the ReFT authors' (equal values)."""
    from reftjax.evaluate import majority_correct
    from reftjax.graders.base import Grade

    g = lambda score, ans: Grade(score, extracted=ans)  # noqa: E731
    grades = [g(1.0, "3.33"), g(0.1, "5"), g(1.0, "3.333"), g(0.1, "5.0"), g(1.0, "3.3333")]
    assert majority_correct(grades, tol=1e-2) is True
    assert majority_correct([g(0.1, "2.5"), g(1.0, "2.6"), g(0.1, "2.5")], tol=1e-2) is False  # 0.1 apart: two answers
    # by default the ReFT authors' vote (a Counter over float values, sampling.py; review, session 27): equal values
    # only, so voting@k is the paper's metric; NaN answers never vote (each NaN is its own key there); inf does
    assert majority_correct(grades) is False  # 5 and 5.0: two votes, each 3.33x: one
    assert majority_correct([g(1.0, "42.005"), g(0.1, "5"), g(1.0, "42"), g(0.1, "5")]) is False
    assert majority_correct([g(1.0, "42.005"), g(0.1, "5"), g(1.0, "42"), g(0.1, "5")], tol=1e-2) is True
    assert majority_correct([g(0.1, "nan")] * 3 + [g(1.0, "42")] * 2) is True
    assert majority_correct([g(0.1, "nan"), g(1.0, "42")]) is True  # a NaN seen first does not win the tie
    # a value exactly `tol` from an earlier one votes with it ("within"): 2 and 2.5 (2 votes) tie 7, seen first
    assert majority_correct([g(1.0, "2"), g(0.1, "7"), g(0.1, "7"), g(1.0, "2.5")], tol=0.5) is True
    assert majority_correct([g(0.1, "inf")] * 3 + [g(1.0, "42")] * 2) is False
    # inside the winning group, equal votes: the value seen first decides (a mutant taking the last passed; mutation
    # review, session 44)
    assert majority_correct([g(1.0, "42.009"), g(0.1, "42.017")], tol=1e-2) is True
    assert majority_correct([g(0.1, "42.017"), g(1.0, "42.009")], tol=1e-2) is False
    # ... by value too: 42.009 written twice is one value with 2 votes against 1; and a value graded right in one of
    # its samples is right; no sample with an answer is no vote, wrong whatever the scores (each a mutant that passed
    # the host tests; mutation review, session 55)
    assert majority_correct([g(0.1, "42.017"), g(1.0, "42.009"), g(1.0, "42.0090")], tol=1e-2) is True
    assert majority_correct([g(1.0, "42"), g(0.1, "42.0"), g(0.1, "5")]) is True
    assert majority_correct([g(1.0, None), g(1.0, ""), g(1.0, "nan")]) is False and majority_correct([]) is False


def test_verifier_data_the_grader_failed_throughout_stops_before_it_is_saved(tiny_hf_dir, shared_data, monkeypatch):
    """The verifier's samples were labelled with no fault check: a judge down while they were sampled labelled every
    one wrong, the data were saved once for good, and the verifier learnt them (review, session 43). A prompt batch
    the grader failed on throughout now raises GraderFailure (the CLI's exit 3) before anything is returned to be
    saved; a grader that answers, even "wrong" every time, labels as before."""
    import dataclasses

    from reftjax.config import ExperimentConfig
    from reftjax.graders import build_grader
    from reftjax.graders.base import GraderFailure
    from reftjax.hf import load_model
    from reftjax.rerank import sample_verifier_data
    from reftjax.train import GraderFailure as TrainGraderFailure
    from reftjax.train import prepare_data

    assert TrainGraderFailure is GraderFailure  # (what the CLIs catch)
    monkeypatch.setenv("REFTJAX_GSM8K_DIR", str(shared_data / "gsm8k"))
    cfg = ExperimentConfig()
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, n_train=4, n_val=4, n_test=2))
    model = load_model(tiny_hf_dir)
    data = prepare_data(cfg, model.tokenizer)
    rc = RerankConfig(samples_per_question=2, n_questions=2, max_new_tokens=4, prompts_per_batch=2, dedup=False)
    args = (model.params, model.config, model.tokenizer, data.train_ds, data.train_items)
    kw = dict(eos_ids=tuple(model.config.eos_token_ids), pad_id=model.tokenizer.pad_token_id)
    broken = build_grader({"type": "python", "source": "def grade(sample, item):\n    return item['reference']"})
    with pytest.raises(GraderFailure, match=r"verifier data, prompt batch 1: the grader failed on all 4 samples \(the "
                                            r"first: error: KeyError: 'reference'\); stopped before the data is saved"):
        sample_verifier_data(*args, broken, rc, **kw)
    wrong = build_grader({"type": "python", "source": "def grade(sample, item):\n    return 0.0"})
    vd = sample_verifier_data(*args, wrong, rc, **kw)
    assert len(vd) == 4 and not vd.labels.any()


def test_verifier_data_keeps_the_asked_questions_dedups_per_question_and_labels_only_correct_answers(
        tiny_hf_dir, shared_data, monkeypatch):
    """What `sample_verifier_data` keeps, checked row by row (mutants passed that labelled a partly-rewarded wrong
    answer, ReFT's 0.1, correct; graded a later batch's samples against the first batch's items; kept the padded
    rows of a last batch; sampled one question past `n_questions`, or a batch past it; deduplicated over the whole
    batch rather than per question: mutation review, session 45)."""
    import dataclasses

    import reftjax.rollout
    from reftjax.config import ExperimentConfig
    from reftjax.graders.base import Grade
    from reftjax.hf import load_model
    from reftjax.rerank import sample_verifier_data
    from reftjax.train import prepare_data

    monkeypatch.setenv("REFTJAX_GSM8K_DIR", str(shared_data / "gsm8k"))
    cfg = ExperimentConfig()
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, n_train=3, n_val=4, n_test=2))
    model = load_model(tiny_hf_dir)
    data = prepare_data(cfg, model.tokenizer)
    items = data.train_items
    assert len(items) == 3

    class Grader:  # 1.0 on question 2's samples only; ReFT's 0.1 (a wrong number) on the others
        def __init__(self):
            self.calls = []

        def grade_batch(self, got, texts):
            self.calls.append((list(got), list(texts)))
            return [Grade(1.0 if item is items[2] else 0.1, extracted="1") for item in got]

    decode = reftjax.rollout.decode_tokens  # every sample of a question the same text: one row a question is left
    monkeypatch.setattr(reftjax.rollout, "decode_tokens", lambda *a, **kw: ["same"] * len(decode(*a, **kw)))
    args = (model.params, model.config, model.tokenizer, data.train_ds, items)
    kw = dict(eos_ids=tuple(model.config.eos_token_ids), pad_id=model.tokenizer.pad_token_id)
    rc = RerankConfig(samples_per_question=2, max_new_tokens=4, prompts_per_batch=2)
    grader = Grader()
    vd = sample_verifier_data(*args, grader, rc, **kw)  # batches: questions (0, 1) and (2, a padded row)
    assert vd.example_idx.tolist() == [0, 1, 2] and vd.labels.tolist() == [0.0, 0.0, 1.0]
    assert [[items.index(i) for i in got] for got, _ in grader.calls] == [[0, 1], [2]]
    with_dups = sample_verifier_data(*args, grader, dataclasses.replace(rc, dedup=False), **kw)
    assert with_dups.example_idx.tolist() == [0, 0, 1, 1, 2, 2]
    grader = Grader()
    one = sample_verifier_data(*args, grader, dataclasses.replace(rc, n_questions=1, dedup=False), **kw)
    assert one.example_idx.tolist() == [0, 0] and len(grader.calls) == 1
    # (second round, session 48) n_questions counts questions, not rows, across batches; the progress bar too;
    # each prompt batch samples with its own key, from rc.seed; one faulted sample of a batch is no GraderFailure
    keys, rollout = [], reftjax.rollout.rollout
    monkeypatch.setattr(reftjax.rollout, "rollout",
                        lambda *a, **k: keys.append(jax.random.key_data(a[3])) or rollout(*a, **k))
    done = []
    faulty = Grader()
    faulty.grade_batch = lambda got, texts: [Grade(0.0, error="judge down", details={"grader_fault": True})] + [
        Grade(1.0, extracted="1")] * (len(got) - 1)
    three = sample_verifier_data(*args, faulty, dataclasses.replace(rc, n_questions=3, dedup=False, seed=1), **kw,
                                 progress=types.SimpleNamespace(update=done.append))
    assert three.example_idx.tolist() == [0, 0, 1, 1, 2, 2] and three.labels.tolist() == [0, 1, 1, 1, 0, 1]
    assert done == [2, 1]
    assert len(keys) == 2 and not np.array_equal(keys[0], keys[1])
    sample_verifier_data(*args, Grader(), dataclasses.replace(rc, n_questions=1), **kw)  # seed 0
    assert len(keys) == 3 and not np.array_equal(keys[2], keys[0])


def test_verifier_data_on_a_mesh_rounds_the_prompts_per_call_up_to_its_batch_devices(tiny_hf_dir, shared_data,
                                                                                      monkeypatch, caplog):
    """On a mesh the default `prompts_per_batch=1` was refused (it must split over the batch axes' devices), so
    every rerank run on more than one device needed it raised by hand (helper review, session 42). Now it is rounded
    up to a multiple of them, with an INFO line: on 8 devices, 1 samples what 8 samples without a mesh (the same
    batches, keys and rows), and the run's batch-size check no longer names it."""
    import dataclasses
    import logging

    from reftjax.config import ExperimentConfig
    from reftjax.graders import build_grader
    from reftjax.hf import load_model
    from reftjax.rerank import sample_verifier_data
    from reftjax.sharding import MeshConfig, batch_devices, make_mesh, place_params
    from reftjax.train import check_batch_sizes, prepare_data

    monkeypatch.setenv("REFTJAX_GSM8K_DIR", str(shared_data / "gsm8k"))
    cfg = ExperimentConfig()
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, n_train=10, n_val=4, n_test=2))
    model = load_model(tiny_hf_dir)
    data = prepare_data(cfg, model.tokenizer)
    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    assert batch_devices(mesh) == 8 and batch_devices(make_mesh(MeshConfig(data=2, tensor=4))) == 2
    assert batch_devices(None) == 1
    grader = build_grader({"type": "python",  # (labels of both kinds, read off the sampled text)
                           "source": "def grade(sample, item):\n    return float(len(sample['output_text']) % 2)"})
    kw = dict(eos_ids=tuple(model.config.eos_token_ids), pad_id=model.tokenizer.pad_token_id)
    rc = RerankConfig(samples_per_question=2, max_new_tokens=6, temperature=1.0, dedup=False)
    with caplog.at_level(logging.INFO, logger="reftjax.rerank"):
        on_mesh = sample_verifier_data(place_params(model.params, model.config, mesh), model.config, model.tokenizer,
                                       data.train_ds, data.train_items, grader, rc, mesh=mesh, **kw)
    assert "8 questions per sampling call (rerank.prompts_per_batch 1 rounded up to a multiple of the 8 devices" \
        in caplog.text
    alone = sample_verifier_data(model.params, model.config, model.tokenizer, data.train_ds, data.train_items, grader,
                                 dataclasses.replace(rc, prompts_per_batch=8), **kw)
    one_a_call = sample_verifier_data(model.params, model.config, model.tokenizer, data.train_ds, data.train_items,
                                      grader, rc, **kw)
    assert on_mesh.example_idx.tolist() == alone.example_idx.tolist() == sorted(list(range(10)) * 2)
    for field in ("tokens", "mask", "labels", "prompt_tokens", "prompt_mask"):
        np.testing.assert_array_equal(getattr(on_mesh, field), getattr(alone, field), err_msg=field)
    assert not np.array_equal(one_a_call.tokens, alone.tokens)  # (other keys: the batching is what matched)
    assert 0 < alone.labels.mean() < 1
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="reftjax.rerank"):  # 9 -> 16 (not 9 or 8: not max nor min)
        nine = sample_verifier_data(place_params(model.params, model.config, mesh), model.config, model.tokenizer,
                                    data.train_ds, data.train_items, grader,
                                    dataclasses.replace(rc, prompts_per_batch=9, n_questions=1), mesh=mesh, **kw)
    assert "16 questions per sampling call (rerank.prompts_per_batch 9 rounded up" in caplog.text
    assert nine.example_idx.tolist() == [0, 0]
    with_rerank = dataclasses.replace(cfg, rerank=dataclasses.replace(cfg.rerank, epochs=1, batch_size=16),
                                      eval=dataclasses.replace(cfg.eval, voting_k=4, batch_size=8))
    check_batch_sizes(with_rerank, mesh)  # prompts_per_batch 1 passes; a batch_size the devices do not divide fails
    with pytest.raises(Exception, match=r"^rerank.batch_size=12: must be a multiple of the 8 devices"):
        check_batch_sizes(dataclasses.replace(with_rerank, rerank=dataclasses.replace(with_rerank.rerank,
                                                                                     batch_size=12)), mesh)
