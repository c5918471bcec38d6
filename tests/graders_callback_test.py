"""The jit bridge: rewards from inside jit equal direct grading on 1 and 8 devices."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from reftjax.graders.base import Grade
from reftjax.graders.callback import decode_rows, grade_in_jit, make_reward_fn
from reftjax.graders.guards import GuardConfig, apply_guards, check
from reftjax.graders.reft import ReftGrader, reft_target

B, T = 16, 48


def _decode(rows):
    return ["".join(chr(t) for t in row) for row in rows]


def _encode(rows, width):
    """Rows of token ids (or texts, one character a token) left-aligned in a [len(rows), width] batch and its mask;
    the positions after each row are 0."""
    ids = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for b, row in enumerate(rows):
        ids[b, : len(row)] = [ord(c) for c in row] if isinstance(row, str) else row
        mask[b, : len(row)] = 1
    return ids, mask


def _batch(seed=0):
    """Random N-CoT completions: right, wrong and unparseable answers, padded after a random length."""
    rng = np.random.default_rng(seed)
    items = [{"answer_value": str(v)} for v in rng.integers(0, 50, size=24)]
    idx = rng.integers(0, len(items), size=B).astype(np.int32)
    texts = [reft_target("so", [items[i]["answer_value"], "999", "??"][b % 3])[: T - 3] for b, i in enumerate(idx)]
    ids, mask = _encode(texts, T)
    ids[mask == 0] = ord("7")  # junk after the mask must be ignored
    return items, ids, mask, idx


def _direct(items, ids, mask, idx, grader):
    texts = decode_rows(ids, mask, _decode)
    return np.asarray([g.score for g in grader.grade_batch([items[i] for i in idx], texts)], np.float32)


def test_decode_stops_at_the_first_masked_position():
    ids = np.array([[65, 66, 67, 68], [65, 66, 67, 68]], np.int32)
    mask = np.array([[1, 1, 0, 1], [1, 1, 1, 1]], np.int32)
    assert decode_rows(ids, mask, _decode) == ["AB", "ABCD"]


@pytest.mark.parametrize("cot", ["nl", "python"])
def test_real_tokenizer_completions_ending_in_eos_are_graded_without_it(smollm_tokenizer, cot):
    """The rollout mask keeps the EOS; decoding it into the text made every finished completion score 0
    (`'42<|im_end|>'` is not a number; a P-CoT program ending in it does not parse). The tokenizer, its bound
    `batch_decode` and `text_decoder` all drop special tokens; a plain function is used as given."""
    from reftjax.graders.callback import text_decoder

    tok = smollm_tokenizer
    text = reft_target("6 * 7 = 42", "42") if cot == "nl" else "\n    x = 6 * 7\n    return x"
    items = [{"answer_value": "42", "question": "What is six times seven?"}]
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    row = np.full((1, len(ids) + 3), tok.pad_token_id, np.int32)
    row[0, : len(ids)] = ids
    mask = (np.arange(row.shape[1]) < len(ids)).astype(np.int32)[None]
    idx = np.zeros(1, np.int32)
    grader = ReftGrader(cot=cot)
    for decode in (tok, tok.batch_decode, text_decoder(tok)):
        fn = make_reward_fn(grader, items, decode)
        np.testing.assert_array_equal(fn(row, mask, idx), [1.0])
        assert "<|im_end|>" not in fn.last.texts[0] and fn.last.texts[0].rstrip().endswith(text.split()[-1])
    as_given = make_reward_fn(grader, items, lambda rows: tok.batch_decode(rows))  # keeps the EOS: scores 0
    np.testing.assert_array_equal(as_given(row, mask, idx), [0.0])
    assert as_given.last.texts[0].endswith("<|im_end|>")


def test_single_device_jit_matches_direct():
    items, ids, mask, idx = _batch()
    grader = ReftGrader()
    fn = make_reward_fn(grader, items, _decode)
    expected = _direct(items, ids, mask, idx, grader)
    assert set(expected.tolist()) == {0.0, float(np.float32(0.1)), 1.0}
    step = jax.jit(lambda a, m, i: grade_in_jit(fn, a, m, i) * 2.0)
    dev = jax.devices()[0]
    out = step(*(jax.device_put(x, dev) for x in (ids, mask, idx)))
    assert out.sharding.device_set == {dev}
    np.testing.assert_array_equal(np.asarray(out), expected * 2.0)
    assert out.dtype == jnp.float32 and out.shape == (B,)
    assert fn.last.counters["graded"] == B and len(fn.last.grades) == B
    assert fn.last.texts[0].startswith("so\nTherefore")


@pytest.mark.parametrize("explicit", [False, True])
def test_eight_device_mesh_matches_direct_and_keeps_batch_sharding(explicit):
    assert jax.device_count() == 8
    items, ids, mask, idx = _batch(1)
    grader = ReftGrader()
    fn = make_reward_fn(grader, items, _decode)
    if explicit:
        mesh = jax.make_mesh((8,), ("data",))
    else:
        mesh = Mesh(np.array(jax.devices()), ("data",))
    batch = NamedSharding(mesh, P("data"))
    rows = NamedSharding(mesh, P("data", None))

    @jax.jit
    def step(a, m, i, values):
        rewards = grade_in_jit(fn, a, m, i, out_sharding=batch)
        return rewards - jnp.mean(rewards) + 0.0 * jnp.sum(values)  # collectives around it

    args = (jax.device_put(ids, rows), jax.device_put(mask, rows), jax.device_put(idx, batch),
            jax.device_put(np.ones(B, np.float32), batch))
    out = step(*args)
    expected = _direct(items, ids, mask, idx, grader)
    np.testing.assert_allclose(np.asarray(out), expected - expected.mean(), rtol=1e-6, atol=1e-6)
    assert out.sharding.spec == P("data")


def test_bad_example_index_scores_its_row_zero_and_the_others_as_usual():
    """One out-of-range index (a padding row's -1) scored the whole batch 0 (helper review): the valid rows lost
    their rewards without an error."""
    items, ids, mask, idx = _batch()
    fn = make_reward_fn(ReftGrader(), items, _decode)
    out = fn(ids, mask, np.full(B, 10_000, np.int32))
    assert out.tolist() == [0.0] * B and fn.last.error is None
    assert all("example_idx 10000 is not in [0, 24)" in g.error for g in fn.last.grades)
    expected = _direct(items, ids, mask, idx, ReftGrader())
    padded = idx.copy()
    padded[3] = -1
    out = fn(ids, mask, padded)
    assert out[3] == 0.0 and np.array_equal(np.delete(out, 3), np.delete(expected, 3)) and expected.max() == 1.0
    assert fn.last.counters["errors"] == 1 and fn.last.example_idx[3] == -1


def test_unanswered_rows_are_counted_apart_from_rows_the_grader_could_not_grade():
    """`grader_errors` counted every row without an extractable answer (scored 0 by the ReFT grader's design), so
    it equalled `graded` on an untrained model and read as a broken grader (helper review)."""
    items = [{"item_id": str(i), "question": "q", "answer_value": "4"} for i in range(4)]
    texts = [reft_target("2+2=4", "4"), reft_target("2+2=5", "5"), "I do not know", "x"]
    ids, mask = _encode(texts, 40)
    fn = make_reward_fn(ReftGrader(), items, _decode)
    out = fn(ids, mask, np.array([0, 1, 2, -1], np.int32))
    np.testing.assert_allclose(out, [1.0, 0.1, 0.0, 0.0])
    assert dict(fn.last.counters) == {"graded": 4, "unanswered": 1, "errors": 1}
    fn = make_reward_fn(ReftGrader(), items, lambda rows: 1 / 0)  # grading raised: every row is the grader's
    fn(ids, mask, np.array([0, 1, 2, 3], np.int32))
    assert dict(fn.last.counters) == {"graded": 4, "unanswered": 0, "errors": 4}
    # a grader's own failure is its error, not the completion's: a python grader's code raising (alone or inside a
    # multi grader), the sandbox failing under a P-CoT program; a model's program failing is unanswered (regression
    # review: a broken python grader read as 4 unanswered, 0 grader errors)
    from reftjax.graders import build_grader
    from reftjax.graders.sandbox import SandboxResult

    broken = {"type": "python", "source": "def grade(sample, item):\n    return float(item['answr'] == 1)"}
    zero = {"type": "string_check", "input": "x", "reference": "y", "operation": "eq"}  # scores 0: a / z fails
    div = {"type": "multi", "graders": {"a": broken | {"source": "def grade(sample, item):\n    return 1.0"},
                                        "z": zero}, "calculate_output": "a / z"}
    fn = make_reward_fn(build_grader(div), items, _decode)
    fn(ids, mask, np.array([0, 1, 2, 3], np.int32))
    assert dict(fn.last.counters) == {"graded": 4, "unanswered": 0, "errors": 4}  # (a formula's failure; helper)
    assert "calculate_output: ZeroDivisionError: float division by zero" in fn.last.grades[0].error
    for cfg in (broken, {"type": "multi", "graders": {"p": broken}, "calculate_output": "p"}):
        fn = make_reward_fn(build_grader(cfg), items, _decode)
        fn(ids, mask, np.array([0, 1, 2, 3], np.int32))
        assert dict(fn.last.counters) == {"graded": 4, "unanswered": 0, "errors": 4}, cfg
        assert "KeyError: 'answr'" in fn.last.grades[0].error

    class Pool:  # the model's first program fails; the sandbox fails under the second
        def run(self, jobs):
            return [SandboxResult("error", error="NameError: x"), SandboxResult("sandbox_failure", error="hung"),
                    SandboxResult("ok", value_float=4.0, value_str="4"), SandboxResult("ok", value_float=5.0,
                                                                                     value_str="5")][:len(jobs)]

    fn = make_reward_fn(ReftGrader(cot="python", pool=Pool()), items, _decode)
    np.testing.assert_allclose(fn(ids, mask, np.array([0, 1, 2, 3], np.int32)), [0.0, 0.0, 1.0, 0.1])
    assert dict(fn.last.counters) == {"graded": 4, "unanswered": 1, "errors": 1}


def test_grade_in_jit_refuses_one_index_per_prompt_when_tracing():
    """With n samples per prompt the reward needs one index per completion row; the prompt batch's indices (B/n of
    them) were accepted and every reward came back 0 (the host saw a shape mismatch), so GRPO learned nothing."""
    items, ids, mask, idx = _batch()
    fn = make_reward_fn(ReftGrader(), items, _decode)
    with pytest.raises(ValueError, match=r"example_idx \(8,\) must be \[B, T\], \[B, T\] and \[B\]: one item index "
                                         r"per completion row \(with n samples per prompt, jnp.repeat"):
        jax.jit(lambda a, m, i: grade_in_jit(fn, a, m, i))(ids, mask, idx[::2])


def test_example_indices_may_be_a_list():
    """A Python list of indices failed with AttributeError: 'list' object has no attribute 'shape' (library-user
    review, session 28)."""
    items, ids, mask, idx = _batch()
    fn = make_reward_fn(ReftGrader(), items, _decode)
    want = jax.jit(lambda a, m, i: grade_in_jit(fn, a, m, i))(ids, mask, idx)
    got = jax.jit(lambda a, m, i: grade_in_jit(fn, a, m, i))(ids, mask, [int(i) for i in idx])
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_a_custom_reward_callable_may_return_a_list():
    """grade_in_jit documents that any callable with HostRewardFn's signature works; one returning a Python list
    failed in XLA ("Mismatched number of outputs from callback")."""
    items, ids, mask, idx = _batch()
    out = jax.jit(lambda a, m, i: grade_in_jit(lambda a, m, i: [float(x) for x in i], a, m, i))(ids, mask, idx)
    np.testing.assert_array_equal(np.asarray(out), idx.astype(np.float32))
    # a NaN silently skipped every update (whitening spread it to every advantage); a wrong length failed as XLA's
    # "CpuCallback error" (helper review): both now say what the callable returned
    def nan_at_3(a, m, i):
        return [float("nan") if r == 3 else 0.0 for r in range(len(i))]

    with pytest.raises(Exception, match=r"reward function .*nan_at_3 returned non-finite rewards at rows \[3\]"):
        jax.block_until_ready(jax.jit(lambda a, m, i: grade_in_jit(nan_at_3, a, m, i))(ids, mask, idx))
    with pytest.raises(Exception, match=r"returned shape \(3,\) for 16 completion rows"):
        jax.block_until_ready(jax.jit(lambda a, m, i: grade_in_jit(lambda a, m, i: [0.0] * 3, a, m, i))(ids, mask, idx))


def test_guards_zero_flagged_rewards_and_count():
    items = [{"answer_value": "4"}]
    texts = ["2+2=4, because two and two make four.\nTherefore, the answer is: 4",
             "\nTherefore, the answer is: 4",
             "2+2=4 by counting on fingers\nTherefore, the answer is: 4\nTherefore, the answer is: 4"]
    ids, mask = _encode(texts, 120)
    fn = make_reward_fn(ReftGrader(), items, _decode, guards=GuardConfig(max_tokens=80))
    out = fn(ids, mask, np.zeros(3, np.int32))
    assert out.tolist() == [1.0, 0.0, 0.0]
    assert fn.last.counters["no_reasoning"] == 1 and fn.last.counters["repeated_answer"] == 1
    assert fn.last.counters["too_long"] == 1  # the third text has 83 characters (tokens here)
    assert fn.last.grades[1].details["guards"] == ["no_reasoning"]
    discount = make_reward_fn(ReftGrader(), items, _decode,
                              guards=GuardConfig(action="discount", discount=0.5))
    assert discount(ids, mask, np.zeros(3, np.int32)).tolist() == [1.0, 0.5, 0.5]
    assert discount.totals["graded"] == 3
    off = make_reward_fn(ReftGrader(), items, _decode, guards=GuardConfig(enabled=False, max_tokens=80))
    assert off(ids, mask, np.zeros(3, np.int32)).tolist() == [1.0, 1.0, 1.0] and "too_long" not in off.last.counters


def test_too_long_leaves_out_a_final_eos_or_stop_sequence():
    """A reply that stopped exactly at the token cap is not cut off: counting its EOS (or stop sequence) flagged it
    `too_long` and zeroed a correct answer (session 20's left-alone list)."""
    body = "two and two make four, as anyone can count\nTherefore, the answer is: 4"
    eos, stop = 3, (ord("\n"), ord("Q"))
    rows = [[ord(c) for c in body] + [eos],  # finished on the EOS at the cap
            [ord(c) for c in body] + list(stop),  # finished on the stop sequence at the cap
            [ord(c) for c in body + "!"]]  # cut off at the cap
    ids, mask = _encode(rows, 80)
    guards = GuardConfig(max_tokens=len(body) + 1)
    decode = lambda rows: _decode([[t for t in r if t != eos] for r in rows])  # noqa: E731 - special tokens dropped
    fn = make_reward_fn(ReftGrader(), [{"answer_value": "4"}], decode, guards=guards, stop_sequences=[stop],
                        eos_ids=(eos,))
    assert fn(ids[:2], mask[:2], np.zeros(2, np.int32)).tolist() == [1.0, 1.0]
    assert fn.last.counters.get("too_long", 0) == 0
    fn(ids, mask, np.zeros(3, np.int32))
    assert fn.last.counters["too_long"] == 1 and fn.last.grades[2].details["guards"] == ["too_long"]


def test_hash_marker_skips_markdown_headings():
    """GSM8K's `#### 42` is an answer marker; a Markdown heading `#### Step 1` is not (it used to count: a
    structured CoT was flagged `repeated_answer`/`no_reasoning` and its reward zeroed)."""
    cfg = GuardConfig(markers="####")
    assert cfg.markers == ("####",)
    cot = "#### Step 1\nTom has 3 apples and buys 4 more.\n#### Step 2\n3 + 4 = 7 apples in all.\n#### 7"
    assert check(cfg, cot, 30) == []
    assert check(cfg, "#### 7", 3) == ["no_reasoning"]
    assert check(cfg, "He has 3 + 4 = 7 apples in all.\n#### 7\n#### -7.5", 20) == ["repeated_answer"]
    assert check(cfg, "He has 3 + 4 = 7 apples in all.\n####$7", 20) == []
    assert check(GuardConfig(enabled=False), "#### 7\n#### 8", 3) == []
    # the gsm8k extraction reads these as answers, so the guard counts them (full reward slipped past no_reasoning)
    for bare in ("####\n42", "#### **42**", "#### `42`", "#### $42", "####  \\(42\\)"):
        assert check(cfg, bare, 3) == ["no_reasoning"], bare


def test_repeated_lines_flags_a_looping_completion():
    """More than `max_repeated_line_fraction` (0.5) of a completion's non-empty lines repeating an earlier one is
    degenerate repetition; no test read this guard (a mutant that never flagged passed the suite; mutation review,
    session 44). Exactly half is not more than half; under four lines is too short to judge; None turns it off."""
    loop = "Tom has 3 + 4 = 7 apples.\n" * 4  # 3 of 4 lines repeat the first
    assert check(GuardConfig(), loop, 30) == ["repeated_lines"]
    assert check(GuardConfig(), "3 + 4 = 7\n\n7 * 2 = 14\n3 + 4 = 7\n  \n7 * 2 = 14\n", 30) == []  # 2 of 4: half
    assert check(GuardConfig(), "3 + 4 = 7\n" * 3, 30) == []  # three lines
    assert check(GuardConfig(max_repeated_line_fraction=None), loop, 30) == []
    assert check(GuardConfig(max_repeated_line_fraction=0.25), "a = 1\nb = 2\na = 1\nc = 3\nd = 4", 30) == []
    assert check(GuardConfig(max_repeated_line_fraction=0.1), "a = 1\nb = 2\na = 1\nc = 3\nd = 4", 30) == \
        ["repeated_lines"]  # 1 of 5
    out, counts = apply_guards(GuardConfig(action="discount", discount=0.5), [loop, "fine"], [30, 3],
                               [Grade(1.0), Grade(1.0)])
    assert [g.score for g in out] == [0.5, 1.0] and counts["repeated_lines"] == 1
    assert out[0].details["guards"] == ["repeated_lines"] and out[0].details["score_before_guards"] == 1.0


def test_no_reasoning_flags_bare_answers_without_a_marker_and_in_longer_hash_runs():
    """A bare answer the grader pays gave `no_reasoning` no marker to measure from: "42" (the reft extraction reads a
    text without its trigger whole), "##### 42" and "#### = 42" (the gsm8k extraction reads the last `####`, also
    inside a longer run, and the first number after it) kept full reward with the guards on (helper review)."""
    item = {"question": "q", "answer_value": "42", "answer": "w #### 42"}
    cfg = GuardConfig(min_reasoning_chars=5)  # the arithmetic experiment's setting; the default 20 too
    for extract, field, text in (("reft", "answer_value", "42"), ("reft", "answer_value", " 42 "),
                                 ("gsm8k", "answer", "##### 42"), ("gsm8k", "answer", "#### = 42"),
                                 ("gsm8k", "answer", "####42")):
        grade = ReftGrader(extract=extract, answer_field=field).grade_batch([item], [text])[0]
        assert grade.score == 1.0, text
        for guards in (cfg, GuardConfig()):
            out, counts = apply_guards(guards, [text], [3], [grade], answer_in_text=True)
            assert out[0].score == 0.0 and counts["no_reasoning"] == 1, (text, guards)
    # worked answers keep their reward, with or without a marker
    cot = "Tom has 6 bags of 7 apples, so 6 * 7 = 42 apples in all.\n"
    for extract, field, text in (("reft", "answer_value", cot + "Therefore, the answer is: 42"),
                                 ("gsm8k", "answer", cot + "##### 42"), ("gsm8k", "answer", cot + "42")):
        grade = ReftGrader(extract=extract, answer_field=field).grade_batch([item], [text])[0]
        out, counts = apply_guards(GuardConfig(), [text], [30], [grade], answer_in_text=True)
        assert out[0].score == grade.score and not any(counts.values()), text
    assert check(GuardConfig(), cot + "42", 30, answer="42") == []
    assert check(GuardConfig(), "  42", 3, answer="42") == ["no_reasoning"]
    # a second answer in a longer run of '#' (the last marker, which the extraction reads) counts as one
    assert check(GuardConfig(), cot + "#### 7\n##### 42", 30) == ["repeated_answer"]
    # ... but Markdown h5/h6 headings before the answer are not answers (regression review)
    assert check(GuardConfig(), "##### 1. Setup\nTom has 3 apples.\n###### 2. Add\n3 + 4 = 7\n#### 7", 30) == []
    # no marker and no answer read from the text (an empty or answerless reply, or a grader that records the whole
    # text as its answer: string_check, text_similarity): not checked. The reasoned replies below kept their full
    # reward before this guard's fix and keep it (regression review: every short reply was zeroed)
    assert check(GuardConfig(), "", 3) == [] and check(GuardConfig(), "I don't know", 3) == []
    from reftjax.graders.build import build_grader

    texts = ["France is a country in Europe; its capital city is Paris.", "The capital is Paris."]
    for cfg in ({"type": "string_check", "operation": "ilike", "input": "{{sample.output_text}}",
                 "reference": "{{item.city}}"},
                {"type": "text_similarity", "evaluation_metric": "rouge_1", "input": "{{sample.output_text}}",
                 "reference": "{{item.city}}"}):
        grader = build_grader(cfg)
        plain = grader.grade_batch([{"city": "Paris"}] * 2, texts)
        ids, mask = _encode(texts, 80)
        fn = make_reward_fn(grader, [{"city": "Paris"}], _decode, guards=GuardConfig())
        assert fn(ids, mask, np.zeros(2, np.int32)).tolist() == pytest.approx([g.score for g in plain])
        assert all(g.score > 0 for g in plain) and fn.last.counters["no_reasoning"] == 0, cfg


_DISPATCH = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from reftjax.graders.callback import grade_in_jit, make_reward_fn
    from reftjax.graders.reft import ReftGrader
    fn = make_reward_fn(ReftGrader(), [{"answer_value": "0"}] * 64,
                        lambda rows: ["".join(chr(t) for t in r) for r in rows])
    mesh = jax.make_mesh((8,), ("data",))
    sh = NamedSharding(mesh, P("data"))
    @jax.jit
    def f(a, m, i, x):
        r = grade_in_jit(fn, a, m, i, out_sharding=sh)
        return x + jnp.sum((r - jnp.mean(r)) * x)
    rows = NamedSharding(mesh, P("data", None))
    a = jax.device_put(np.full((64, 8), 48, np.int32), rows)
    m = jax.device_put(np.ones((64, 8), np.int32), rows)
    i = jax.device_put(np.zeros(64, np.int32), sh)
    x = jax.device_put(np.ones(64, np.float32), sh)
    outs = [f(a, m, i, x) for _ in range(int(sys.argv[1]))]  # no waiting between dispatches
    jax.block_until_ready(outs)
    print("ok", fn.totals["graded"])
""")


def test_many_dispatches_without_waiting_do_not_deadlock():  # ~3 s; deadlocked with ordered=False
    """The REFERENCE hazard, in a subprocess so a deadlock fails the test instead of hanging it."""
    proc = subprocess.run([sys.executable, "-c", _DISPATCH, "100"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["ok", str(100 * 64)]


_GATHER = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from reftjax.graders.callback import grade_in_jit
    from reftjax.sharding import activation_mesh
    mesh = Mesh(np.array(jax.devices()), ("data",))  # Auto axes, as reftjax's meshes
    sh, rows = NamedSharding(mesh, P("data")), NamedSharding(mesh, P("data", None))
    host = lambda ids, mask, idx: (mask.sum(1) + idx).astype(np.float32)
    a = jax.device_put(np.ones((16, 8), np.int32), rows)
    i = jax.device_put(np.arange(16, dtype=np.int32), sh)
    given = jax.jit(lambda a, i: grade_in_jit(host, a * 2, a, i, out_sharding=sh))(a, i)
    with activation_mesh(mesh):  # the RL experience's case: no out_sharding, the step's mesh active
        active = jax.jit(lambda a, i: grade_in_jit(host, a * 2, a, i) * 1.0)(a, i)
    same = np.asarray(given).tolist() == np.asarray(active).tolist() == list(range(8, 24))
    print(given.sharding.spec == P("data"), same)
""")


def test_the_gather_to_the_callback_is_explicit_on_a_mesh():
    """The callback's operands go to one device; left to the partitioner, every compile of the RL experience
    printed four "Involuntary full rematerialization" warnings on 8 devices (session 29's list). Compiled in a
    subprocess without the cache (XLA's C++ log is written at compile time)."""
    env = {**os.environ, "JAX_ENABLE_COMPILATION_CACHE": "false"}
    proc = subprocess.run([sys.executable, "-c", _GATHER], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["True", "True"], proc.stdout
    assert "Involuntary full rematerialization" not in proc.stderr, proc.stderr[-2000:]


def test_guard_markers_given_as_one_string_are_one_marker():
    cfg = GuardConfig.from_dict({"markers": "Therefore"})
    assert cfg.markers == ("Therefore",)  # was ('T', 'h', 'e', ...): every worked solution flagged


def test_a_final_stop_sequence_is_not_graded():
    """The rollout keeps a stop sequence's tokens (sampled actions, mask 1) but its text is not answer text: a correct
    "... is: 42" ended by the stop "\n\nQ" read as "42\n\nQ" (not a number, reward 0; helper review)."""
    from reftjax.rollout import without_stop

    stop = tuple(ord(c) for c in "\n\nQ")
    texts = ["6 times 7 is 42.\nTherefore, the answer is: 42\n\nQ", "6 times 7 is 42.\nTherefore, the answer is: 42"]
    ids, mask = _encode(texts, 64)
    items = [{"answer_value": "42"}]
    plain = make_reward_fn(ReftGrader(), items, _decode)
    assert plain(ids, mask, np.zeros(2, np.int32)).tolist() == [0.0, 1.0]
    fn = make_reward_fn(ReftGrader(), items, _decode, stop_sequences=[stop])
    assert fn(ids, mask, np.zeros(2, np.int32)).tolist() == [1.0, 1.0]
    assert without_stop([1, 2, 3], [(2, 3)]) == [1] and without_stop([1, 2, 3], [(1, 2)]) == [1, 2, 3]
    # when one stop sequence ends another ("Q" and "\n\nQ"), the longest goes, in either order (the first listed
    # did: "42\n\n" for a string_check eq grader, helper review)
    short = (ord("Q"),)
    for order in ([short, stop], [stop, short]):
        assert without_stop([5, *stop], order) == [5] and without_stop([5, 6, *short], order) == [5, 6]
        fn = make_reward_fn(ReftGrader(), items, _decode, stop_sequences=order)
        fn(ids, mask, np.zeros(2, np.int32))
        assert [g.extracted for g in fn.last.grades] == ["42", "42"] and fn.last.texts[0] == texts[1]


def test_an_index_one_past_the_items_scores_its_row_zero_and_the_others_as_usual():
    """`len(items)` is out of range as -1 is: that row scores 0 with the reason; an IndexError would have zeroed
    the whole batch (mutation review, session 46)."""
    items, ids, mask, idx = _batch()
    fn = make_reward_fn(ReftGrader(), items, _decode)
    expected = _direct(items, ids, mask, idx, ReftGrader())
    past = idx.copy()
    past[0] = len(items)
    out = fn(ids, mask, past)
    assert fn.last.error is None and out[0] == 0.0 and np.array_equal(out[1:], expected[1:])
    assert "example_idx 24 is not in [0, 24)" in fn.last.grades[0].error


def test_no_reasoning_measures_before_the_first_marker_and_around_a_bare_answer():
    """The reasoning is what precedes the first marker (an answer stated first and then justified has none), or,
    with no marker, the text around the answer the grader read, after it as well as before."""
    body = "two and two make four, as anyone can count on their fingers"
    first = "\nTherefore, the answer is: 4\n" + body + "\nTherefore, the answer is: 4"
    assert check(GuardConfig(), first, 30) == ["no_reasoning", "repeated_answer"]
    assert check(GuardConfig(), "42, since six bags of seven apples make that many", 30, answer="42") == []
    assert check(GuardConfig(), "42, six sevens", 30, answer="42") == ["no_reasoning"]


def test_guard_options_are_checked():
    with pytest.raises(ValueError, match=r"discount must be in \[0, 1\], got 1.5"):
        GuardConfig(action="discount", discount=1.5)
    with pytest.raises(ValueError, match=r"unknown guard options \['max_token'\]"):
        GuardConfig.from_dict({"max_token": 5})
    assert GuardConfig.from_dict({"max_tokens": 5, "action": "discount"}).max_tokens == 5
    # a negative discount made a negative reward (Grade refused it mid-run), a typo'd action acted as "discount",
    # an empty marker matched everywhere and a cap of 0 flagged every reply (mutation review, session 55)
    for bad, message in (({"action": "discount", "discount": -0.5}, r"discount must be in \[0, 1\], got -0.5"),
                         ({"action": "zeros"}, "action must be 'zero' or 'discount', got 'zeros'"),
                         ({"markers": ("####", "")}, "markers must be non-empty strings"),
                         ({"max_tokens": 0}, "max_tokens must be >= 1, got 0")):
        with pytest.raises(ValueError, match=message):
            GuardConfig(**bad)


def test_guards_strip_the_answer_and_keep_the_grade_s_details():
    """The answer a grader read is looked for stripped ("42\\n" is the "42" of the text), and a flagged grade keeps
    its details (a multi grader's sub-scores) beside the guards' (mutation review, session 55)."""
    assert check(GuardConfig(min_reasoning_chars=5), "abc 42", 3, answer=" 42\n") == ["no_reasoning"]  # "abc": 3
    assert check(GuardConfig(min_reasoning_chars=5), "abcde 42", 3, answer=" 42\n") == []
    (out,), _ = apply_guards(GuardConfig(max_tokens=5), ["x"], [9], [Grade(1.0, details={"scores": {"a": 1.0}})])
    assert out.score == 0.0
    assert out.details == {"scores": {"a": 1.0}, "guards": ["too_long"], "score_before_guards": 1.0}


def test_a_grader_failure_is_every_row_faulted_not_some():
    """`every_one_faulted` stops a run only when the grader failed on every row: one row's fault (or a model's
    unanswered rows) is not a broken grader."""
    from reftjax.graders.base import every_one_faulted, faulted

    assert every_one_faulted([faulted("a"), faulted("b")]) == "a"
    assert every_one_faulted([faulted("a"), Grade(0.0, error="no answer")]) is None
    assert every_one_faulted([Grade(0.0, error="no answer")]) is None and every_one_faulted([]) is None


def test_the_last_record_is_each_call_s_own_and_the_totals_add_up():
    """`last` describes the latest call only (a failed batch keeps no texts of the batch before it, which the RL
    samples dump would print beside its rows), its `seconds` count the decoding as well as the grading, and
    `totals` add every call's counters (mutation review, session 56)."""
    import time

    items = [{"answer_value": "4"}]
    texts = [reft_target("2+2=4", "4"), "I do not know"]
    ids, mask = _encode(texts, 40)
    state = {"fail": False}

    def decode(rows):
        time.sleep(0.05)
        if state["fail"]:
            raise ZeroDivisionError("decoder broke")
        return _decode(rows)

    fn = make_reward_fn(ReftGrader(), items, decode)
    assert fn(ids, mask, np.array([0, 0], np.int32)).tolist() == [1.0, 0.0]
    assert fn.last.texts == tuple(texts) and fn.last.error is None and fn.last.seconds >= 0.05
    state["fail"] = True
    assert fn(ids, mask, np.array([0, -1], np.int32)).tolist() == [0.0, 0.0]
    assert fn.last.error == "ZeroDivisionError: decoder broke" and fn.last.texts == ()
    assert [g.error for g in fn.last.grades] == ["batch failed"] * 2 and fn.last.example_idx == (0, -1)
    assert fn.last.counters == {"graded": 2, "unanswered": 0, "errors": 2} and fn.last.seconds >= 0.05
    state["fail"] = False
    fn(ids, mask, np.array([0, 0], np.int32))
    assert dict(fn.last.counters) == {"graded": 2, "unanswered": 1, "errors": 0} and fn.last.error is None
    assert dict(fn.totals) == {"graded": 6, "unanswered": 2, "errors": 2}


def test_a_direct_call_with_one_index_per_prompt_scores_the_batch_zero_with_the_reason():
    """Called outside `grade_in_jit` (which refuses it when tracing), indices that are not one per row fail the
    batch with the shapes named: grading the first rows and returning fewer rewards than rows is not an option."""
    items, ids, mask, idx = _batch()
    fn = make_reward_fn(ReftGrader(), items, _decode)
    out = fn(ids, mask, idx[::2])
    assert out.tolist() == [0.0] * B
    assert fn.last.error == f"ValueError: bad shapes ids ({B}, {T}) mask ({B}, {T}) idx ({B // 2},)"


def test_the_guards_read_the_grader_s_answer_out_of_the_text():
    """The ReFT N-CoT grader reads its answer out of the text (`answer_in_text`), so a bare "42" with no marker is
    flagged `no_reasoning` through the reward function too, not only through `apply_guards` called directly."""
    items = [{"answer_value": "42"}]
    texts = ["42", "Tom has 6 bags of 7 apples, so 6 * 7 = 42 apples in all.\nTherefore, the answer is: 42"]
    ids, mask = _encode(texts, 100)
    plain = make_reward_fn(ReftGrader(), items, _decode)
    assert plain(ids, mask, np.zeros(2, np.int32)).tolist() == [1.0, 1.0]
    fn = make_reward_fn(ReftGrader(), items, _decode, guards=GuardConfig())
    assert fn(ids, mask, np.zeros(2, np.int32)).tolist() == [0.0, 1.0]
    assert fn.last.counters["no_reasoning"] == 1 and fn.last.grades[0].details["guards"] == ["no_reasoning"]


def test_an_infinite_custom_reward_is_refused_as_a_nan_is():
    items, ids, mask, idx = _batch()

    def inf_at_1(a, m, i):
        return [float("inf") if r == 1 else 0.0 for r in range(len(i))]

    with pytest.raises(Exception, match=r"reward function .*inf_at_1 returned non-finite rewards at rows \[1\] "
                                        r"\(\[inf\]\)"):
        jax.block_until_ready(jax.jit(lambda a, m, i: grade_in_jit(inf_at_1, a, m, i))(ids, mask, idx))


def test_make_reward_fn_checks_the_grader_against_the_first_item_unless_told_not_to():
    items = [{"answer_value": "forty-two"}, {"answer_value": "4"}]
    with pytest.raises(ValueError, match=r"gold answer 'forty-two' in field 'answer_value' is not a number"):
        make_reward_fn(ReftGrader(), items, _decode)
    fn = make_reward_fn(ReftGrader(), items, _decode, validate=False)
    ids, mask = _encode([reft_target("2+2=4", "4")], 40)
    assert fn(ids, mask, np.array([1], np.int32)).tolist() == [1.0]


def test_failure_messages_sub_score_means_and_the_score_range():
    """`failure_message`'s line as the CLIs print it, with and without the first failure; `every_one_faulted`
    names a fault without a message; `sub_score_means` averages over the rows that carry sub-scores (a row without
    an item, scored 0 by the callback, has none); a score above 1 is refused as one below 0 is (mutation review,
    session 56)."""
    from reftjax.graders.base import every_one_faulted, failure_message, faulted, sub_score_means

    assert failure_message("RL iteration 3", "8 rows", "judge: timeout", "stopped before the update") == (
        "RL iteration 3: the grader failed on all 8 rows (the first: judge: timeout); stopped before the update. "
        "Fix the grader (try it with `python -m reftjax.graders run`) or its judge's endpoint (a model grader's "
        "base_url may change on resume) and rerun the same command: the run resumes from its last checkpoint")
    assert failure_message("evaluation x", "4 answers", None, "nothing recorded", rerun="it redoes x") == (
        "evaluation x: the grader failed on all 4 answers (graded in process 0: its log names the first failure); "
        "nothing recorded. Fix the grader (try it with `python -m reftjax.graders run`) or its judge's endpoint (a "
        "model grader's base_url may change on resume) and rerun the same command: it redoes x")
    assert every_one_faulted([faulted(""), faulted("b")]) == "no message"
    grades = [Grade(1.0, details={"scores": {"a": 1.0, "b": 0.25}}), Grade(0.0, error="example_idx -1 is not in"),
              Grade(0.5, details={"scores": {"a": 0.0, "b": 0.75}, "guards": ["too_long"]})]
    assert sub_score_means(grades) == {"score_a": 0.5, "score_b": 0.5}
    assert sub_score_means([Grade(1.0), Grade(0.0, error="x")]) == {} and sub_score_means([]) == {}
    for bad in (1.5, -0.25):
        with pytest.raises(ValueError, match=rf"score must be in \[0, 1\], got {bad}"):
            Grade(bad)
