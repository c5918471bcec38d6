"""The arithmetic behind the benchmark figures of BUILD_NOTES, checked against hand computations.

tests/bench_smoke_test.py only runs each script and parses its JSON line, so an inverted ratio, a median taken over
the warm-up iteration, tokens counted from the wrong record or an MFU over the wrong time would be published
unnoticed. Here the pure helpers of bench/ppo_iteration.py, bench/sft_step.py, bench/rollout.py,
bench/decode_profile.py, bench/data_pipeline.py, bench/graders.py, bench/judge.py, bench/optimizer_update.py,
bench/attention_core.py, bench/interrupt_poll.py and bench/sft_profile.py get made-up timings (a toy FLOP model,
`_Cfg`, a fake clock, `_Clock`), with no model loaded and no benchmark run.
"""
import functools
import importlib.util
import os
import pathlib
import sys

import numpy as np
import pytest

import reftjax.host

ROOT = pathlib.Path(__file__).resolve().parents[1]


class _Cfg:
    """A FLOP model simple enough to compute by hand: 10 + context (+100 for the vocabulary head) a token."""

    def flops_per_token(self, context: int = 0, head: bool = True) -> float:
        return 10.0 + context + (100.0 if head else 0.0)


@functools.cache  # (each script once per process)
def _load(name: str):
    """Import bench/<name>.py without its entry-point side effects: `use_hugepage_malloc` would re-execute the
    pytest process, and the scripts' environment defaults and sys.path entries are undone after the import."""
    env, path, real = dict(os.environ), list(sys.path), reftjax.host.use_hugepage_malloc
    reftjax.host.use_hugepage_malloc = lambda: "system"
    try:
        spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        reftjax.host.use_hugepage_malloc = real
        sys.path[:] = path
        os.environ.clear()
        os.environ.update(env)
    return module


# Four rows (2 prompts x 2 samples, prompt-major) of real prompt lengths 3, 3, 5, 5 and completions 2, 4, 1, 3.
# With _Cfg, model_flops(group=1) = prompts 2 * (3 * 11 + 5 * 12) = 186 + completions 2 * 114 + 4 * 115 + 1 * 115
# + 3 * 116 = 1151: 1337; group=2 (each prompt once): 93 + 1151 = 1244.
PROMPT_MASK = np.array([[0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
LENGTHS = np.array([2, 4, 1, 3])


def _records():
    """A warm-up iteration that differs from all others, then three steady ones whose first, median, mean, min
    and max all differ (iter_s 2, 4, 9; flops/iter_s 30, 25, 10; rollout_s 1, 3, 8; sys_s 0.5, 0.1, 0.2)."""
    warm = {"iter_s": 50.0, "gen_tokens": 1000, "flops": 5e6, "rollout_s": 40.0, "sys_s": 7.0, "reward": 0.9}
    steady = [{"iter_s": 2.0, "gen_tokens": 30, "flops": 60.0, "rollout_s": 1.0, "sys_s": 0.5, "reward": 0.1},
              {"iter_s": 4.0, "gen_tokens": 10, "flops": 100.0, "rollout_s": 3.0, "sys_s": 0.1, "reward": 0.2},
              {"iter_s": 9.0, "gen_tokens": 50, "flops": 90.0, "rollout_s": 8.0, "sys_s": 0.2, "reward": 0.3}]
    return [warm, *steady]


def test_ppo_summary_is_over_the_steady_iterations():
    """`_summary` (every `<algo>_*` and `trl_*` figure): the warm-up record is out of the medians and the tokens/s,
    iter_s is the median (not the mean or min), tokens/s is all steady tokens over all steady seconds, the MFU the
    median of flops / iter_s over the peak, `first_iter_s` the warm-up's."""
    ppo = _load("ppo_iteration")
    out = ppo._summary("ppo", _records(), peak=100.0, extra_keys=("rollout_s", "sys_s"))
    assert out == {"ppo_iter_s": 4.0, "ppo_tokens_per_s": 6.0,  # 90 tokens / 15 s
                   "ppo_gen_tokens_mean": 30.0, "ppo_first_iter_s": 50.0,
                   "ppo_mfu": 0.25,  # median(25, 30, 10) / 100
                   "ppo_iters": [2.0, 4.0, 9.0], "ppo_rollout_s": 3.0, "ppo_sys_s": 0.2}


def test_ppo_algo_figures_compile_time_and_reward():
    """`<algo>_compile_s` is the first iteration less the steady median (not the mean, not the first steady one), with
    the phase medians of `_summary`; `<algo>_reward_mean` averages every iteration's reward."""
    ppo = _load("ppo_iteration")
    records = [{**r, "experience_s": 1.0, "update_s": 2.0, "rollout_sys_s": 0.0, "experience_sys_s": 0.0,
                "update_sys_s": 0.0, "update_flops": f} for r, f in zip(_records(), (9e9, 300.0, 100.0, 200.0))]
    out = ppo._algo_figures("grpo", records, peak=100.0)
    assert out["grpo_compile_s"] == 46.0  # 50 - median(4, 2, 9)
    assert out["grpo_update_floor_s"] == 2.0  # median(300, 100, 200) / 100: the warm-up's 9e9 is out
    assert out["grpo_reward_mean"] == 0.375  # (0.9 + 0.1 + 0.2 + 0.3) / 4
    assert out["grpo_iter_s"] == 4.0 and out["grpo_rollout_s"] == 3.0 and out["grpo_update_s"] == 2.0
    assert out["grpo_tokens_per_s"] == 6.0


def test_ppo_ratios_are_reftjax_over_trl():
    """`ratio_vs_trl` is ppo's tokens/s over TRL's (above 1: reftjax faster), `ratio_<algo>_vs_trl` each other
    algorithm's, each from its own algorithm's records over the steady iterations, and from the unrounded tokens/s:
    TRL's 10.049 tokens/s is 10.0 in the summary, so a ratio of the summary keys would read 1.01 where it is 1.0."""
    ppo = _load("ppo_iteration")

    def records(tokens, seconds):  # a warm-up record that would change every ratio, then the steady ones
        return [{"gen_tokens": 1, "iter_s": 1000.0, "flops": 1.0}] + [
            {"gen_tokens": t, "iter_s": s, "flops": 1.0} for t, s in zip(tokens, seconds)]

    trl = records([100, 101], [10.0, 10.0])  # 10.05 tokens/s, 10.1 rounded
    algos = {"ppo": records([201, 201], [10.0, 10.0]), "grpo": records([300, 303], [10.0, 10.0]),
             "rloo": records([90, 30], [5.0, 10.0])}
    assert ppo._trl_ratios(algos, trl) == {"ratio_vs_trl": 2.0, "ratio_grpo_vs_trl": 3.0, "ratio_rloo_vs_trl": 0.8}
    summary = {**ppo._summary("trl", trl, peak=1.0), **ppo._summary("ppo", algos["ppo"], peak=1.0)}
    assert (summary["ppo_tokens_per_s"], summary["trl_tokens_per_s"]) == (20.1, 10.1)  # their ratio: 1.99
    # 3x TRL's 10.05 tokens/s is 30.15: ppo's 201 tokens an iteration may take 6.67 s, rloo's mean 60 tokens 1.99 s
    assert ppo._budgets_at_3x_trl(algos, trl) == {"ppo_iter_s_at_3x_trl": 6.67, "grpo_iter_s_at_3x_trl": 10.0,
                                                  "rloo_iter_s_at_3x_trl": 1.99}


def test_ppo_iteration_record_phases_tokens_and_flops():
    """`iteration_record`: each phase is the time between its own clock readings, gen_tokens is the sum of the
    rows' lengths (EOS included, padding not), and the FLOPs count the real prompt tokens with the bench's
    samples / group / experience-from-rollout / epochs / reference in their places of `rl_iteration_flops`."""
    ppo = _load("ppo_iteration")
    rec = ppo.iteration_record(_Cfg(), (10.0, 11.0, 13.5, 17.0), (1.0, 1.25, 2.0, 4.0), LENGTHS, PROMPT_MASK,
                               samples=2, group=1, fast=False, epochs=2, reference=True, reward=0.5, loss=-1.0)
    # rollout 1244 (each prompt prefilled once for its 2 samples) + 1337 x (policy 1 + reference 1 + 3 x 2 epochs)
    assert rec == {"iter_s": 7.0, "rollout_s": 1.0, "experience_s": 2.5, "update_s": 3.5,
                   "rollout_sys_s": 0.25, "experience_sys_s": 0.75, "update_sys_s": 2.0,
                   "gen_tokens": 10, "flops": 1244.0 + 1337.0 * 8, "update_flops": 1337.0 * 6, "reward": 0.5,
                   "loss": -1.0}
    shared = ppo.iteration_record(_Cfg(), (0.0, 1.0, 2.0, 3.0), (0.0,) * 4, LENGTHS, PROMPT_MASK,
                                  samples=2, group=2, fast=True, epochs=1, reference=False, reward=0.0, loss=0.0)
    assert shared["flops"] == 1244.0 + 1244.0 * 3  # share_prompt, no policy or reference forward, one epoch
    assert shared["update_flops"] == 1244.0 * 3
    grpo = ppo.iteration_record(_Cfg(), (0.0, 1.0, 2.0, 3.0), (0.0,) * 4, LENGTHS, PROMPT_MASK,
                                samples=2, group=1, fast=True, epochs=3, reference=True, reward=0.0, loss=0.0)
    assert grpo["flops"] == 1244.0 + 1337.0 * (1 + 9)
    assert grpo["update_flops"] == 1337.0 * 9


def test_ppo_iteration_passes_its_own_settings_to_the_record(monkeypatch):
    """`ReftjaxRL.iteration` hands `iteration_record` the trimmed rollout's rows and the algorithm's samples, group,
    epochs, experience-from-rollout and reference settings each under its own name (samples and group swapped at
    this call changed only the MFU and survived session 47's review), and threads the state."""
    import types

    import jax

    import reftjax.rollout

    ppo = _load("ppo_iteration")
    raw = types.SimpleNamespace(lengths_B=np.array([9, 9, 9, 9]), prompt_mask_BxP=np.ones((4, 6)))
    trimmed = types.SimpleNamespace(lengths_B=LENGTHS, prompt_mask_BxP=PROMPT_MASK)
    seen = {}

    def rollout(*args, **kw):
        seen["rollout"] = kw
        return raw

    def record(*args, **kw):
        seen["record"] = args, kw
        return {"iter_s": 1.0}
    monkeypatch.setattr(reftjax.rollout, "rollout", rollout)
    monkeypatch.setattr(reftjax.rollout, "trim_to_bucket", lambda r, buckets: trimmed if r is raw else None)
    monkeypatch.setattr(ppo, "iteration_record", record)
    runner = types.SimpleNamespace(
        rng=jax.random.key(0), state=types.SimpleNamespace(params={"policy": "p", "value_head": "v"}), ref="ref",
        prompt_tokens="t", prompt_mask="m", cfg=_Cfg(), sampling=types.SimpleNamespace(max_new_tokens=8), idx="i",
        fast=True, samples=4, group=2, epochs=3, reference=False, records=[], algo="ppo",
        exp_fn=lambda params, ref, ro, idx: ("exp", {"reward": 0.25}) if ro is trimmed else None,
        ppo_step=lambda state, exp: ("new state", {"loss": -2.0}))
    assert ppo.ReftjaxRL.iteration(runner) == {"iter_s": 1.0} and runner.state == "new state"
    args, kw = seen["record"]
    assert args[3] is LENGTHS and args[4] is PROMPT_MASK
    assert kw == {"samples": 4, "group": 2, "fast": True, "epochs": 3, "reference": False, "reward": 0.25,
                  "loss": -2.0}
    assert seen["rollout"]["value_head"] == "v"  # experience from the rollout: its values come with it


def test_trl_step_counts():
    """TRL's step: gen_tokens sums its completions' lengths and the FLOPs are generation 1x + training 3x of
    `model_flops` over every row's prompt (TRL prefills each row's prompt)."""
    ppo = _load("ppo_iteration")
    completions = [[7] * 2, [7] * 4, [7] * 1, [7] * 3]
    assert ppo.trl_step_counts(_Cfg(), [3, 3, 5, 5], completions) == {"gen_tokens": 10, "flops": 1337.0 * 4}


def test_sft_step_figures():
    """bench/sft_step.py's keys: medians of the timed steps (not mean or min), tokens/s = batch x seq / median,
    `ratio_vs_torch` = torch's median over reftjax's (above 1: reftjax faster), `compile_s` the first call less the
    reftjax median, each MFU = 3 x forward FLOPs (context seq / 2) / its own median / peak."""
    sft = _load("sft_step")
    # n_tok = 16; flops = 3 * (10 + 4 + 100) * 16 = 5472
    out = sft.step_figures(_Cfg(), 2, 8, reftjax_steps=[1.0, 4.0, 2.0], torch_steps=[3.0, 9.0, 6.0],
                           compile_wall_s=10.0, peak=5472 / 0.2)
    assert out == {"reftjax_step_s": 2.0, "torch_step_s": 6.0, "reftjax_tokens_per_s": 8.0,
                   "torch_tokens_per_s": 2.7, "ratio_vs_torch": 3.0, "compile_s": 8.0,
                   "mfu_reftjax": 0.1, "mfu_torch": 0.033}


def _schedule(sft, schedule, repeats, block):
    """Run `run_schedule` with a clock that returns each call's sequence number, to see which calls land where."""
    calls = []

    def timed(fn):
        calls.append(fn())
        return float(len(calls)), len(calls) / 10
    return sft.run_schedule({"reftjax": lambda: "r", "torch": lambda: "t"}, timed, repeats, schedule, block), calls


def test_sft_schedule_keeps_switch_steps_out_of_the_medians():
    """Blocked schedule: each block starts with an untimed-for-the-median switch step, blocks alternate, and each
    contender gets exactly `repeats` timed steps (the last block shortened); alternate: one step each, no switch."""
    sft = _load("sft_step")
    runs, calls = _schedule(sft, "blocked", repeats=5, block=2)
    assert "".join(calls) == "rrrtttrrrtttrrtt"
    assert runs["reftjax"]["switch"] == [1.0, 7.0, 13.0] and runs["torch"]["switch"] == [4.0, 10.0, 15.0]
    assert runs["reftjax"]["steps"] == [2.0, 3.0, 8.0, 9.0, 14.0]
    assert runs["torch"]["steps"] == [5.0, 6.0, 11.0, 12.0, 16.0]
    assert runs["torch"]["sys"] == [0.5, 0.6, 1.1, 1.2, 1.6]
    runs, calls = _schedule(sft, "alternate", repeats=2, block=3)
    assert "".join(calls) == "rtrt" and runs["reftjax"]["steps"] == [1.0, 3.0] and runs["torch"]["switch"] == []


def test_rollout_batch_figures():
    """bench/rollout.py's per-batch keys: rows x new tokens over the median run (not the first, compiling one),
    `ratio_bB` = transformers' median over reftjax's, `compile_s_bB` = first less the median, the one-device keys
    from their own runs, and the model GFLOP/s over the real (unpadded) prompt lengths."""
    rollout_bench = _load("rollout")
    out, gflops = rollout_bench.batch_figures(_Cfg(), [[1, 2, 3], [4, 5]], 4, first_s=12.0,
                                              t_ours=[2.0, 1.0, 6.0], t_theirs=[5.0, 8.0, 4.0], t_one=[3.0])
    assert out == {"reftjax_tok_s_b2": 4.0, "hf_tok_s_b2": 1.6, "ratio_b2": 2.5, "compile_s_b2": 10.0,
                   "reftjax_one_device_tok_s_b2": 2.7, "ratio_one_device_b2": 1.67}
    # prompts 3 * 11 + 2 * 11 = 55, completions 4 * (110 + 3 + 2) + 4 * (110 + 2 + 2) = 916, over the median 2 s
    assert gflops == pytest.approx(971 / 2 / 1e9)
    out, _ = rollout_bench.batch_figures(_Cfg(), [[1]], 4, 1.0, [1.0], [1.0], [])
    assert "ratio_one_device_b1" not in out


HLO = """HloModule jit__rollout
  %fusion.3 = f32[2,4]{1,0} fusion(f32[2,4]{1,0} %p.1), kind=kLoop, metadata={op_name="jit(_r)/while/body/mlp/dot"}
  %fusion.4 = f32[2,4]{1,0} fusion(f32[2,4]{1,0} %p.2), kind=kLoop, metadata={op_name="jit(_r)/while/body/mlp/dot"}
  %copy.7 = f32[2]{0} copy(f32[2]{0} %p.3), metadata={op_name="jit(_r)/prefill/copy"}
  ROOT %tuple.1 = (f32[2]{0}) tuple(f32[2]{0} %copy.7)
"""


def test_decode_profile_groups_per_step_ms():
    """bench/decode_profile.py's `step_ms_by_group`: op names lose the jit and loop-body prefixes, ops of one op_name
    add up, only ops that ran exactly once per decode step count, and microseconds become ms per step."""
    decode = _load("decode_profile")
    names = decode._op_names(HLO)
    assert names == {"fusion.3": "mlp/dot", "fusion.4": "mlp/dot", "copy.7": "prefill/copy",
                     "tuple.1": ""}
    n = 4
    events = ([{"ph": "X", "name": "fusion.3", "dur": 500.0}] * n + [{"ph": "X", "name": "fusion.4", "dur": 250.0}] * n
              + [{"ph": "X", "name": "tuple.1", "dur": 100.0}] * n
              + [{"ph": "X", "name": "copy.7", "dur": 9000.0}]  # the prefill: once, not a decode step's op
              + [{"ph": "X", "name": "other", "dur": 7.0}] * n  # not an op of the program
              + [{"ph": "B", "name": "fusion.3", "dur": 1e6}])  # not a complete event
    assert decode.step_ms_by_group(events, names, n) == {"mlp/dot": 0.75, "tuple.1": 0.1}


# bench/data_pipeline.py, graders.py, judge.py, optimizer_update.py, attention_core.py, interrupt_poll.py and
# sft_profile.py (helper-148's review); bench/sft_breakdown.py (session 48: it ran at import before).


class _Clock:
    """A fake `time.perf_counter`: `now` moves only when the code under test advances it."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_data_pipeline_median_time_is_the_median_of_its_calls(monkeypatch):
    """`_median_time` (`tokenize_s`, and the epoch time behind every `loader_*` rate): the median of the repeats'
    times (5, 1, 2 s: not the first, the fastest or the mean), with the last call's result."""
    dp = _load("data_pipeline")
    clock, durations = _Clock(), iter([5.0, 1.0, 2.0])

    def fn():
        clock.now += next(durations)
        return clock.now

    monkeypatch.setattr(dp, "time", type("T", (), {"perf_counter": staticmethod(clock)}))
    assert dp._median_time(fn, 3) == (2.0, 8.0)


def test_data_pipeline_figures():
    """bench/data_pipeline.py's rates: examples and real tokens over the tokenization time, batches and real (not
    padded) tokens over the epoch time, padding = 1 - real / slots over all batches, and the ratio the slower
    stage's real tokens/s over 125 (each stage the slower once)."""
    dp = _load("data_pipeline")
    counts = [(30, 40), (20, 40), (50, 80)]  # 100 real tokens in 160 slots
    assert dp.pipeline_figures(300, 6000, 2.0, counts, 0.5) == {
        "tokenize_s": 2.0, "tokenize_examples_per_s": 150.0, "tokenize_tokens_per_s": 3000,
        "loader_batches_per_s": 6.0, "loader_tokens_per_s": 200, "loader_padding_fraction": 0.375,
        "ratio_vs_sft_step_125_tok_s": 2}  # min(3000, 200) / 125 = 1.6
    out = dp.pipeline_figures(300, 6000, 4.0, counts, 0.05)  # tokenization 1500 tokens/s, the loader 2000
    assert out["ratio_vs_sft_step_125_tok_s"] == 12 and out["loader_tokens_per_s"] == 2000
    assert dp.mean_length([[1], [1, 2], list(range(10))]) == 4.3


def test_graders_figures():
    """bench/graders.py's keys: completions per second = batch / median seconds (not inverted), the batch-64 and
    direct host-function times in ms, and each callback's overhead = its own time less the direct call's."""
    gr = _load("graders")
    out = gr.grader_figures(256, ncot_s=0.5, ncot64_s=0.02, pcot_s=4.0, direct_s=0.01, in_jit_s=0.015,
                            in_pure_s=0.012)
    assert out == pytest.approx({"ncot_per_s": 512.0, "ncot_batch64_ms": 20.0, "pcot_per_s": 64.0, "host_fn_ms": 10.0,
                                 "callback_overhead_ms": 5.0, "pure_callback_overhead_ms": 2.0})


def test_graders_share_of_rollout(monkeypatch):
    """`grade_share_of_rollout`: grading's share of rollout + grading (1 of 3 + 1 s), each timed over `repeats`."""
    gr = _load("graders")
    seen = []

    def fake_median(fn, repeats):
        seen.append(repeats)
        return float(fn())
    monkeypatch.setattr(gr, "median_seconds", fake_median)
    share = gr.grade_share_of_rollout(lambda: 3.0, lambda ids, mask, idx: ids + mask + idx, 0.5, 0.25, 0.25,
                                      repeats=7)
    assert share == 0.25 and seen == [7, 7]


def test_judge_figures():
    """bench/judge.py's keys: the first half of the grades are the right answers, the second the same items' wrong
    ones; means and pair shares over the n pairs, `scored_share` over all 2n replies (a grader fault is not scored),
    replies/s from the warm pass, the first error in request order, and whether the two passes agree."""
    from reftjax.graders.base import Grade, faulted

    jd = _load("judge")
    grades = [Grade(1.0), Grade(0.5), faulted("judge down"),  # right answers: 1, 0.5, 0
              Grade(0.0, error="no label"), Grade(0.5), Grade(0.25)]  # wrong answers: 0, 0.5, 0.25
    out = jd.judge_figures(grades, list(grades), first_s=10.0, warm_s=2.0)
    assert out == {"first_pass_s": 10.0, "warm_pass_s": 2.0, "replies_per_s": 3.0, "scored_share": 5 / 6,
                   "same_grades_twice": True, "mean_score_right": 0.5, "mean_score_wrong": 0.25,
                   "right_above_wrong": 1 / 3, "ties": 1 / 3, "example_error": "judge down"}
    assert not jd.judge_figures(grades, grades[:5] + [Grade(0.0)], 1.0, 1.0)["same_grades_twice"]


def test_optimizer_update_best_after_warmup():
    """bench/optimizer_update.py: each optax figure is the fastest of `repeats` calls after an untimed compiling
    one (100 s), with the (donated) state threaded through every call; torch's the fastest step after its first."""
    ou = _load("optimizer_update")
    clock, durations = _Clock(), [100.0, 5.0, 2.0, 3.0]

    def fn(state):
        clock.now += durations[state]
        return state + 1, state
    assert ou.best_update_seconds(fn, 0, 3, clock=clock) == (4, 2.0)
    durations[0] = 0.5  # even a first call faster than the rest is not among the timed ones
    assert ou.best_update_seconds(fn, 0, 3, clock=clock) == (4, 2.0)
    assert ou.steady_min([0.5, 2.0, 1.0]) == 1.0


def test_attention_core_layers_seconds(monkeypatch):
    """bench/attention_core.py: every figure is `layers` x the fastest of `repeats` calls of one layer, timed only
    after an untimed first call."""
    import reftjax.metrics

    ac = _load("attention_core")
    calls, timed = [], []

    def fake_min(fn, repeats):
        timed.append((len(calls), repeats))
        for _ in range(repeats):
            fn()
        return 0.0123
    monkeypatch.setattr(reftjax.metrics, "min_seconds", fake_min)
    assert ac.layers_seconds(lambda: calls.append(1), 4, 30) == 0.369
    assert timed == [(1, 4)] and len(calls) == 5


def test_interrupt_poll_median_call_seconds():
    """bench/interrupt_poll.py: each figure is the median (4, 1, 2 s: 2) of the call timed right after its step was
    dispatched, the step waited for only after the timing; `dispatch=None` (`check_idle`) queues and waits nothing."""
    ip = _load("interrupt_poll")
    clock, durations, log = _Clock(), iter([4.0, 1.0, 2.0]), []

    class Step:
        def block_until_ready(self):
            log.append("wait")

    def call():
        log.append("call")
        clock.now += next(durations)

    def dispatch():
        log.append("dispatch")
        return Step()
    assert ip.median_call_seconds(call, dispatch, 3, clock=clock) == 2.0
    assert log == ["dispatch", "call", "wait"] * 3
    log.clear()
    durations = iter([1.0, 3.0])
    assert ip.median_call_seconds(call, None, 2, clock=clock) == 2.0 and log == ["call", "call"]


def test_interrupt_poll_timed_calls():
    """bench/interrupt_poll.py's three figures time the right call after the right dispatch: `check` and `poll`
    after a queued step, `check_idle` with nothing queued."""
    ip = _load("interrupt_poll")

    class Stop:
        def check(self):
            return "check"

        def poll(self):
            return "poll"

    def dispatch():
        return "step"
    cases = ip.timed_calls(Stop(), dispatch)
    assert {k: (call(), d) for k, (call, d) in cases.items()} == {
        "check_after_dispatch": ("check", dispatch), "check_idle": ("check", None),
        "poll_after_dispatch": ("poll", dispatch)}


def test_sft_profile_op_figures():
    """bench/sft_profile.py's profile keys: only complete ("X") events of the program's ops count, microseconds
    become seconds summed over threads, runs count the events (one without a duration too), the top ops are the
    largest `top` by seconds, and the kinds drop only a trailing ".N" (fusion.1 and fusion.12 are one kind)."""
    sp = _load("sft_profile")
    names = {"fusion.1": "mlp/dot", "fusion.12": "attn/dot", "dot.3": "head", "copy": ""}
    events = ([{"ph": "X", "name": "fusion.1", "dur": 2e6}] * 2 + [{"ph": "X", "name": "fusion.12", "dur": 1.5e6},
              {"ph": "X", "name": "dot.3", "dur": 3e6}, {"ph": "X", "name": "dot.3"},
              {"ph": "X", "name": "copy", "dur": 5e5}]
              + [{"ph": "X", "name": "other", "dur": 9e6}, {"ph": "B", "name": "fusion.1", "dur": 1e7}])
    out = sp.op_figures(events, names, top=2)
    assert out == {"ops_s_thread_summed": 9.0,
                   "top_ops": [{"op": "fusion.1", "runs": 2, "s": 4.0, "name": "mlp/dot"},
                               {"op": "dot.3", "runs": 2, "s": 3.0, "name": "head"}],
                   "by_kind_s": {"fusion": 5.5, "dot": 3.0, "copy": 0.5}}
    assert list(out["by_kind_s"]) == ["fusion", "dot", "copy"]


def test_sft_breakdown_medians_after_warmup_with_the_wait_inside_the_timing(monkeypatch):
    """bench/sft_breakdown.py: each figure is the median of `repeats` calls after an untimed first one (100 s), each
    timed until `wait` returns (JAX dispatches asynchronously: a call returns before its work is done), rounded to
    10 ms; a training step's state is threaded from call to call (it is donated)."""
    import reftjax.metrics

    sb = _load("sft_breakdown")
    clock, durations = _Clock(), iter([100.0, 5.0, 1.0, 2.004])
    monkeypatch.setattr(reftjax.metrics, "time", type("T", (), {"perf_counter": staticmethod(clock)}))
    waited = []

    def fn():
        return next(durations)

    def wait(out):  # the work happens here, as in jax.block_until_ready
        clock.now += out
        waited.append(out)
    assert sb.median_after_warmup(fn, 3, wait) == 2.0 and waited == [100.0, 5.0, 1.0, 2.004]
    states = []

    def step(state, batch):
        states.append(state)
        return state + batch, {"loss": state}
    call = sb.threaded(step, 10, 5)
    assert [call()["loss"] for _ in range(3)] == [10, 15, 20] and states == [10, 15, 20]
