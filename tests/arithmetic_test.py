"""Arithmetic ReFT experiment: generator, tokenizer, data layout, and the --quick pipeline end to end."""
import json
import random
import re
import types

import numpy as np
import pytest

from experiments import arithmetic_reft as exp
from experiments import arithmetic_task as task
from reftjax.graders import ReftGrader
from reftjax.graders.guards import GuardConfig, check


@pytest.fixture(scope="module")
def tokenizer():
    return task.build_tokenizer()


@pytest.fixture(scope="module")
def splits():
    return task.make_splits(task.TaskConfig(), 300, 50, 50, 50, seed=0)


@pytest.fixture(scope="module")
def quick_data(tokenizer):
    return exp.build_data(exp.ExpConfig(**exp.QUICK), tokenizer)


def _replay(problem):
    """Independently re-derives the answer from the question text."""
    sentences = problem["question"].split(". ")
    value = int(re.match(r"\w+ has (\d+) ", sentences[0]).group(1))
    for s in sentences[1:]:
        if m := re.match(r"(He|She) (buys|finds|gets) (\d+) more", s):
            value += int(m.group(3))
        elif m := re.match(r"(He|She) (gives away|loses|sells) (\d+)$", s):
            value -= int(m.group(3))
        elif re.match(r"(He|She) doubles them", s):
            value *= 2
        elif re.match(r"(He|She) triples them", s):
            value *= 3
    return value


def test_generator_answers_match_question_and_cot(splits):
    for p in splits["train"] + splits["hard"]:
        assert int(p["answer_value"]) == _replay(p)
        lines = p["answer_cot"].split("\n")
        assert len(lines) == p["n_steps"]
        prev = None
        for line in lines:
            a, sym, x, b = re.fullmatch(r"(\d+)([+\-*])(\d+)=(\d+)", line).groups()
            a, x, b = int(a), int(x), int(b)
            assert b == {"+": a + x, "-": a - x, "*": a * x}[sym] and b >= 0
            if sym == "+":
                assert a % 10 + x % 10 >= 10  # forced carry
            if sym == "-":
                assert x % 10 > a % 10  # forced borrow
            assert prev is None or a == prev
            prev = b
        assert prev == int(p["answer_value"])
        # the key is the start and the sorted operations, whatever the names, verbs, distractors or CoT order
        start = re.match(r"\w+ has (\d+) ", p["question"]).group(1)
        assert p["key"] == start + ":" + ",".join(sorted(re.findall(r"([+\-*]\d+)=", p["answer_cot"])))
    lines = [ln for p in splits["train"] for ln in p["answer_cot"].split("\n")]
    assert all(1 <= int(x) <= 9 for x in re.findall(r"[+-](\d+)=", "\n".join(lines)))  # operand_digits 1
    assert any(int(a) % 10 + int(x) == 10 for a, x in (re.fullmatch(r"(\d+)\+(\d)=\d+", ln).groups()
                                                     for ln in lines if "+" in ln))  # 8+2 carries too
    # 0..max_distractors (1) irrelevant sentences: question = start, one per step, distractors, "How many"
    assert {len(p["question"].split(". ")) - 2 - p["n_steps"] for p in splits["train"]} == {0, 1}


def test_splits_are_disjoint_deterministic_and_hard_has_one_more_step(splits):
    cfg = task.TaskConfig()
    q = {k: {p["question"] for p in v} for k, v in splits.items()}
    assert not (q["train"] & q["val"]) and not (q["train"] & q["test"]) and not (q["val"] & q["test"])
    # and by arithmetic: 16-18% of val/test problems repeated a training problem's start and operations (in some order)
    # under other names, items or distractors, so their answers were recall (helper review, session 20)
    k = {name: {p["key"] for p in v} for name, v in splits.items()}
    assert not (k["train"] & k["val"]) and not (k["train"] & k["test"]) and not (k["val"] & k["test"])
    big = task.make_splits(cfg, 5000, 500, 400, 0, seed=0)
    train_keys = {p["key"] for p in big["train"]}
    assert not any(p["key"] in train_keys for p in big["val"] + big["test"])
    assert not {p["key"] for p in big["val"]} & {p["key"] for p in big["test"]}
    assert len({p["question"] for p in big["train"]}) == len(big["train"])  # no repeat inside a split either
    assert {p["n_steps"] for p in splits["train"]} == set(range(cfg.min_steps, cfg.max_steps + 1))
    assert {p["n_steps"] for p in splits["hard"]} == {cfg.max_steps + 1}
    assert task.make_splits(cfg, 300, 50, 50, 50, seed=0) == splits
    assert task.make_splits(cfg, 300, 50, 50, 50, seed=1)["train"] != splits["train"]
    assert any(re.search(r"years old|miles away|friends|leaves at|pages", p["question"]) for p in splits["train"])


def test_task_config_rejects_bad_values():
    with pytest.raises(ValueError, match="min_steps"):
        task.TaskConfig(min_steps=3, max_steps=2)
    with pytest.raises(ValueError, match="operand_digits"):
        task.TaskConfig(operand_digits=3)


def test_two_digit_operands_and_multiplication(tokenizer):
    rng = random.Random(0)
    probs = [task.generate_problem(rng, 4, 2, mul_prob=0.5, digits=2) for _ in range(200)]
    assert all(int(p["answer_value"]) == _replay(p) for p in probs)
    assert any("*" in p["answer_cot"] for p in probs)
    assert all(10 <= int(x) <= 99 for p in probs for x in re.findall(r"[+-](\d+)=", p["answer_cot"]))
    for p in probs[:20]:  # "*" and "doubles"/"triples" are in the vocabulary
        text = task.prompt_text(p) + task.target_text(p)
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_random_cot_order_is_a_valid_permutation_of_the_same_problem(splits):
    cfg = task.TaskConfig(cot_order="random")
    rand = task.make_splits(cfg, 300, 50, 50, 50, seed=0)
    assert task.make_splits(cfg, 300, 50, 50, 50, seed=0) == rand  # deterministic
    # 5-8 would go below 0: the only valid order adds first
    assert {tuple(task._random_order_lines(random.Random(s), 5, [("-", 8), ("+", 7)])) for s in range(8)} == \
        {("5+7=12", "12-8=4")}
    reordered = 0
    for p, q in zip(splits["train"] + splits["hard"], rand["train"] + rand["hard"]):
        # same question and answer as the text-order task; the CoT applies the same operations
        assert (q["question"], q["answer_value"], q["n_steps"]) == (p["question"], p["answer_value"], p["n_steps"])
        ops = lambda cot: sorted(re.fullmatch(r"\d+([+-]\d+)=\d+", line).group(1) for line in cot.split("\n"))
        assert ops(q["answer_cot"]) == ops(p["answer_cot"])
        value = int(re.match(r"\w+ has (\d+) ", q["question"]).group(1))
        for line in q["answer_cot"].split("\n"):  # a chain from the start value, never below 0
            a, sym, x, b = re.fullmatch(r"(\d+)([+-])(\d+)=(\d+)", line).groups()
            assert int(a) == value and int(b) == (int(a) + int(x) if sym == "+" else int(a) - int(x)) >= 0
            value = int(b)
        assert value == int(q["answer_value"])
        reordered += q["answer_cot"] != p["answer_cot"]
    assert reordered > 100  # about half of 2-3 step chains change order
    with pytest.raises(ValueError, match="mul_prob"):
        task.TaskConfig(cot_order="random", mul_prob=0.5)
    with pytest.raises(ValueError, match="cot_order"):
        task.TaskConfig(cot_order="sorted")


def test_tokenizer_round_trips_without_unknowns(tokenizer, splits):
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert len(tokenizer) == len(task.vocabulary()) < 200
    for p in splits["train"][:100] + splits["hard"][:50]:
        text = task.prompt_text(p) + task.target_text(p)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text
        assert tokenizer.decode(ids + [1, 0, 0], skip_special_tokens=True) == text
    # digits are single tokens, so "47" is two pieces and " 47" is " 4" + "7"
    assert tokenizer.convert_ids_to_tokens(tokenizer("a 47", add_special_tokens=False)["input_ids"]) == \
        [tokenizer.unk_token, " 4", "7"]


def test_gold_targets_score_one_and_pass_the_guards(splits):
    items = splits["train"][:50]
    grades = ReftGrader(cot="nl").grade_batch(items, [task.target_text(p) for p in items])
    assert [g.score for g in grades] == [1.0] * len(items)
    guard = GuardConfig(max_tokens=48, min_reasoning_chars=5)
    assert all(not check(guard, task.target_text(p), 30) for p in items)
    assert check(guard, "Therefore, the answer is: 5", 8) == ["no_reasoning"]


def test_build_data_layout(tokenizer, quick_data):
    cfg, data = exp.ExpConfig(**exp.QUICK), quick_data
    assert cfg.task_config().min_steps == 2  # the docstring's "2..max_steps"
    assert {p["n_steps"] for p in data.problems["train"]} == {2, 3} == {p["n_steps"] for p in data.problems["test"]}
    tok, mask = data.prompts["train"]
    sft = data.sft
    for i in range(20):
        p = data.problems["train"][i]
        n = int(mask[i].sum())
        assert mask[i, :-n].sum() == 0 and tokenizer.decode(tok[i, -n:]) == task.prompt_text(p)
        loss = sft["loss_mask"][i].astype(bool)
        assert tokenizer.decode(sft["tokens"][i][loss]) == task.target_text(p) + tokenizer.eos_token
        real = sft["attn_mask"][i].astype(bool)
        assert tokenizer.decode(sft["tokens"][i][real]) == task.prompt_text(p) + task.target_text(p) + "<eos>"
    with pytest.raises(ValueError, match="eval_every"):
        exp.ExpConfig(arm_samples=100, eval_every=64)


def test_quick_pipeline_end_to_end(tmp_path, capsys):
    # GRPO shares train_rl with PPO (algo switch); it is left out to keep the test's compile count down.
    # The first RL iteration trains only the critic (the critic warm-up path, a second compiled ppo step).
    result = exp.main(["--quick", "--out", str(tmp_path), "--seeds", "0", "--arms", "sft", "reft",
                       "--critic-warmup-samples", "16"])
    out = capsys.readouterr().out
    assert "| +ReFT (PPO) |" in out and "| +SFT |" in out and "| +GRPO |" not in out
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["seeds"] == [0] and (tmp_path / "curves.png").stat().st_size > 1000
    assert (tmp_path / "results.md").read_text().startswith("| model |")
    seed = result["per_seed"][0]
    cfg = exp.ExpConfig(**exp.QUICK)
    for arm in ("sft", "reft"):
        curve = seed[arm]["curve"]
        assert [pt["samples"] for pt in curve] == list(range(0, cfg.arm_samples + 1, cfg.eval_every))
        assert curve[0]["val"] == seed["warmup"]["val"]  # every arm starts from the same warm-up
        assert seed[arm]["val"] == max(pt["val"] for pt in curve)  # chosen on validation
        assert all(0.0 <= seed[arm][k] <= 1.0 for k in ("val", "test", "hard"))
    rl_stats = seed["reft"]["curve"][1]
    assert 0.0 <= rl_stats["extracted"] <= 1.0 and rl_stats["length"] > 0
    assert np.isfinite(rl_stats["kl"])
    with pytest.raises(ValueError, match="critic_warmup_samples"):
        exp.ExpConfig(**{**exp.QUICK, "critic_warmup_samples": 8})  # not a multiple of rl_batch 16


@pytest.mark.parametrize("target, used", [(0.6, 128), (0.95, 256)])  # 0.6: a check equal to the target stops
def test_warmup_stops_at_the_first_validation_check_reaching_the_target(tokenizer, target, used):
    """warmup_target: validation is checked every warmup_check_every samples and the warm-up stops at the first
    check at or above the target; an unreachable target runs the whole warmup_samples. Only validation is read
    before the stop (scripted accuracies stand in for the model's)."""
    cfg = exp.ExpConfig(**{**exp.QUICK, "arms": (), "warmup_target": target, "warmup_check_every": 64})
    runner = exp.Runner(cfg, exp.build_data(cfg, tokenizer), tokenizer)
    seen, vals = [], iter([0.1, 0.6, 0.7, 0.9, 0.3])

    def scripted(policy, split):
        seen.append(split)
        return next(vals) if split == "val" else 0.25

    runner.accuracy = scripted
    out = exp.run_seed(runner, 0)["warmup"]
    checks = used // 64
    assert out["warmup_samples"] == used
    assert seen == ["val"] * checks + ["val", "test", "hard"]
    assert out["val"] == [0.1, 0.6, 0.7, 0.9, 0.3][checks] and out["test"] == 0.25
    with pytest.raises(ValueError, match="warmup_check_every"):
        exp.ExpConfig(**{**exp.QUICK, "warmup_target": 0.5, "warmup_check_every": 10})


def test_rl_probe_runs_and_reports_finite_metrics():
    """The fixed-prompt RL probe runs end to end (tiny warm-up) and reports one finite point per iteration."""
    from experiments import arithmetic_rl_probe as probe

    history = probe.main(["--algo", "grpo", "--group", "2", "--prompts", "4", "--minibatch", "8", "--iters", "2",
                          "--warmup-samples", "32", "--print-every", "1"])
    assert [h["iter"] for h in history] == [0, 1]
    for h in history:
        assert 0.0 <= h["correct"] <= 1.0 and 0.0 <= h["reward"] <= 1.0
        assert all(np.isfinite(v) for v in h.values())
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # first rollout comes from the reference itself
    # PPO on its default --minibatch (64 > its 4 rows) failed in ExpConfig's check with a traceback (helper review)
    assert len(probe.main(["--algo", "ppo", "--prompts", "4", "--iters", "1", "--warmup-samples", "32"])) == 1
    with pytest.raises(SystemExit):  # argparse error naming the probe's own flags
        probe.main(["--algo", "grpo", "--group", "3", "--prompts", "4", "--minibatch", "8", "--iters", "1"])
    with pytest.raises(SystemExit):  # GRPO needs 2 samples per prompt
        probe.main(["--algo", "grpo", "--group", "1", "--prompts", "4", "--minibatch", "4", "--iters", "1"])


def test_rerank_experiment_runs_and_reports_consistent_accuracies(tmp_path, monkeypatch):
    """The rerank@k experiment runs end to end (quick setting) and its figures bound each other as they must.
    The lr is chosen on validation rerank@k (the first lr's is scripted worse, its voting better; one verifier is
    trained and reused to keep the test short)."""
    from experiments import arithmetic_rerank as rr

    real_train, real_acc, trained, calls = rr.train_verifier, rr.accuracies, [], []

    def train_once(*a):
        if not trained:
            trained.append(real_train(*a))
        return trained[0]

    def scripted(*a):
        calls.append(real_acc(*a))
        return {**calls[-1], "rerank": -1.0, "voting": 2.0} if len(calls) == 1 else calls[-1]

    monkeypatch.setattr(rr, "train_verifier", train_once)
    monkeypatch.setattr(rr, "accuracies", scripted)
    res = rr.main(["--quick", "--out", str(tmp_path), "--k", "4", "--n-train-questions", "16", "--epochs", "1",
                   "--batch", "16", "--lrs", "1e-3", "3e-3"])
    assert res["chosen_lr"] == 3e-3 and res["val"] == calls[1] and 16 <= res["verifier_rows"] <= 64
    for split in ("val", "test"):
        r = res[split]
        assert 0 <= r["rerank"] <= r["upper_bound"] <= 1 and r["voting"] <= r["upper_bound"]
        assert r["sample_accuracy"] <= r["upper_bound"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["test"] == res["test"] and "| test |" in (tmp_path / "results.md").read_text()


def test_rl_settings_and_token_budgets_are_checked_before_anything_trains(tokenizer, quick_data):
    """--critic sepraate / --grpo-group 1 failed only when their RL arm started, after the warm-up and the SFT arm
    (nothing saved); --max-steps / --operand-digits lengthened the gold traces past the fixed sampling budgets, so
    those problems could not be answered, silently (helper review)."""
    with pytest.raises(ValueError, match="critic"):
        exp.ExpConfig(**{**exp.QUICK, "critic": "sepraate"})
    with pytest.raises(ValueError, match="group_size"):
        exp.ExpConfig(**{**exp.QUICK, "grpo_group": 1, "rl_batch": 16, "minibatch_size": 16})
    exp.ExpConfig(**{**exp.QUICK, "critic": "sepraate", "arms": ("sft",)})  # no RL arm: nothing to check
    with pytest.raises(ValueError, match="below arm_samples"):
        exp.ExpConfig(**{**exp.QUICK, "critic_warmup_samples": exp.QUICK["arm_samples"]})
    long = exp.ExpConfig(**{**exp.QUICK, "max_steps": 5})
    with pytest.raises(ValueError, match=r"longest gold trace is \d+ tokens \(with EOS\), over (max|eval)_new_tokens"):
        exp.build_data(long, tokenizer)
    # the budgets count the EOS, and every held-out split (hard too) is checked against eval_new_tokens
    longest = {k: max(len(t) for t in task.encode(tokenizer, [task.target_text(p) for p in v])) + 1
               for k, v in quick_data.problems.items()}
    exp.build_data(exp.ExpConfig(**{**exp.QUICK, "max_new_tokens": longest["train"]}), tokenizer)
    with pytest.raises(ValueError, match="train split.*max_new_tokens"):
        exp.build_data(exp.ExpConfig(**{**exp.QUICK, "max_new_tokens": longest["train"] - 1}), tokenizer)
    assert longest["hard"] > max(longest["val"], longest["test"])
    with pytest.raises(ValueError, match="hard split.*eval_new_tokens"):
        exp.build_data(exp.ExpConfig(**{**exp.QUICK, "eval_new_tokens": longest["hard"] - 1}), tokenizer)


# ---------------------------------------------------------------- reporting, with scripted models (no training)
def test_runner_budgets_and_scores(tokenizer, quick_data):
    """Greedy eval uses eval_new_tokens and RL sampling max_new_tokens; `correct` counts graded-1 rows only, and a
    2-step gold trace passes the guards (min_reasoning_chars 5, not the authors' 20)."""
    cfg = exp.ExpConfig(**exp.QUICK)
    runner = exp.Runner(cfg, quick_data, tokenizer)
    assert (runner.greedy.max_new_tokens, runner.sample.max_new_tokens) == (cfg.eval_new_tokens, cfg.max_new_tokens)
    i = next(j for j, p in enumerate(quick_data.problems["train"]) if p["n_steps"] == 2)
    p = quick_data.problems["train"][i]
    wrong = task.target_text({**p, "answer_value": str(int(p["answer_value"]) + 1)})
    rows = task.encode(tokenizer, [task.target_text(p), wrong])
    tokens = np.zeros((2, 64), np.int32)
    for r, ids in enumerate(rows):
        tokens[r, :len(ids) + 1] = ids + [tokenizer.eos_token_id]
    r = types.SimpleNamespace(tokens_BxN=tokens, lengths_B=np.array([len(x) + 1 for x in rows]))
    scores, diag = runner.scores(np.array([i, i]), r)
    assert scores.tolist() == pytest.approx([1.0, 0.1])
    assert (diag["correct"], diag["extracted"], diag["reward_raw"]) == pytest.approx((0.5, 1.0, 0.55))


def test_run_seed_reports_the_validation_best_checkpoint(monkeypatch, tokenizer, quick_data):
    """Each arm reports the checkpoint with the best validation accuracy (ties keep the earlier one; the warm-up
    competes), with that checkpoint's test and hard figures; the arm trains on ARM_SEED + seed."""
    import reftjax.models

    cfg = exp.ExpConfig(**{**exp.QUICK, "arms": ("sft",), "warmup_target": 0.0})
    runner = exp.Runner(cfg, quick_data, tokenizer)
    acc = {"warm": (0.5, 0.4, 0.1), "a": (0.7, 0.6, 0.3), "b": (0.7, 0.9, 0.8)}  # val, test, hard
    runner.accuracy = lambda policy, split: acc[policy][("val", "test", "hard").index(split)]
    runner.copy = lambda tree: tree
    seeds = []

    def fake_sft(runner, policy, n, lr, schedule, seed, on_eval=None, eval_every=0):
        seeds.append(seed)
        if schedule == "linear":
            return "warm", n
        for done, p in ((32, "a"), (64, "b")):
            on_eval(done, p, {"loss": 1.0})
        return "b", n

    monkeypatch.setattr(exp, "train_sft", fake_sft)
    monkeypatch.setattr(reftjax.models, "init_params", lambda *a: "init")
    out = exp.run_seed(runner, 3)
    assert seeds == [3, exp.ARM_SEED + 3]
    assert {k: out["warmup"][k] for k in ("val", "test", "hard")} == {"val": 0.5, "test": 0.4, "hard": 0.1}
    assert {k: out["sft"][k] for k in ("val", "test", "hard", "samples")} == \
        {"val": 0.7, "test": 0.6, "hard": 0.3, "samples": 32}
    assert [pt["samples"] for pt in out["sft"]["curve"]] == [0, 32, 64]


def test_train_rl_critic_warmup_iterations(monkeypatch, tokenizer, quick_data):
    """PPO's first critic_warmup_samples train only the critic, counted in samples; evaluation every eval_every."""
    import jax

    import reftjax.rollout
    import reftjax.steps

    cfg = exp.ExpConfig(**{**exp.QUICK, "arms": ("reft",), "critic_warmup_samples": 32})
    runner = exp.Runner(cfg, quick_data, tokenizer)
    calls, evals = [], []
    state = types.SimpleNamespace(params={"policy": "p"}, rng=jax.random.key(0))
    em = {"reward": 0.0, "kl": 0.0, "value_explained_variance": 0.0}

    def steps(algo, lr, critic_only=False):
        step = lambda s, e: (calls.append("critic" if critic_only else "both"), (s, {}))[1]  # noqa: E731
        return None, types.SimpleNamespace(group_size=1), lambda *a: (None, em), step

    runner.rl_steps, runner.scores = steps, lambda idx, r: (np.zeros(len(idx)), {"correct": 0.0})
    runner.copy = lambda tree: tree
    monkeypatch.setattr(reftjax.steps, "init_rl_params", lambda *a: {})
    monkeypatch.setattr(reftjax.steps, "init_state", lambda *a: state)
    monkeypatch.setattr(reftjax.rollout, "rollout", lambda *a, **k: None)
    exp.train_rl(runner, "warm", "ppo", 1e-4, 0, lambda done, policy, stats: evals.append(done))
    assert calls == ["critic", "critic", "both", "both"] and evals == [32, 64]


def test_summarize_reports_population_std_and_arm_minus_sft():
    cfg = exp.ExpConfig(**{**exp.QUICK, "arms": ("sft", "reft")})
    fig = lambda v, t: {"val": v, "test": t, "hard": 0.2, "samples": 32, "warmup_samples": 128}  # noqa: E731
    per_seed = [{"warmup": fig(0.5, 0.5), "sft": fig(0.6, 0.5), "reft": fig(0.7, 0.6)},
                {"warmup": fig(0.5, 0.5), "sft": fig(0.6, 0.7), "reft": fig(0.7, 0.65)}]
    md = exp.summarize(per_seed, cfg)
    assert "| +SFT | 60.0 ± 0.0 | 60.0 ± 10.0 | 20.0 ± 0.0 | 50.0, 70.0 | 32, 32 |" in md
    assert "ReFT - SFT on test per seed: +10.0, -5.0 (mean +2.5)." in md and "GRPO" not in md


def test_defaults_match_the_module_docstring():
    cfg = exp.ExpConfig()
    assert (cfg.warmup_target, cfg.kl_coef, cfg.grpo_group) == (0.8, 0.05, 4)  # "80%", "KL 0.05", "4 samples"
    assert (cfg.gae_lambda, cfg.value_lr_scale) == (1.0, 30)  # "GAE lambda 1.0", "the critic's lr 30x"
    assert (cfg.value_grad_to_backbone, cfg.cot_order, cfg.arms) == (False, "random", ("sft", "reft", "grpo"))


def test_rerank_accuracies_on_scripted_scores(monkeypatch):
    """voting / weighted voting / rerank / upper bound / one-sample accuracy and the within-question AUC (mixed
    questions only, ties half) of three hand-made questions of k=4 samples."""
    import reftjax.rerank
    from experiments import arithmetic_rerank as rr
    from reftjax.graders.base import Grade

    right, wrong, none = (lambda a: Grade(1.0, a)), (lambda a: Grade(0.1, a)), Grade(0.0)
    grades = [right("5"), wrong("6"), wrong("6"), none, *[right("7")] * 4,
              right("8"), wrong("9"), right("8"), wrong("9")]
    scores = np.array([0.2, 0.9, 0.1, 0.5, *[0.3] * 4, 0.5, 0.5, 0.7, 0.1], np.float32)
    monkeypatch.setattr(reftjax.rerank, "verifier_scores", lambda *a, **k: scores)
    dummy = dict.fromkeys(("prompt_tokens", "prompt_mask", "tokens", "mask"))
    acc = rr.accuracies(None, types.SimpleNamespace(model_cfg=None), dummy, grades, 4)
    assert acc == pytest.approx({"voting": 2 / 3, "weighted_voting": 2 / 3, "rerank": 2 / 3, "upper_bound": 1.0,
                                 "sample_accuracy": 7 / 12, "within_question_auc": (1 / 3 + 0.875) / 2,
                                 "mixed_questions": 2})


def test_rerank_sample_grades_each_completion_against_its_own_problem(monkeypatch, tokenizer, quick_data):
    """k samples per problem, in problem order across padded batches: sample j of problem i is graded against i."""
    import reftjax.rollout
    from experiments import arithmetic_rerank as rr

    runner = exp.Runner(exp.ExpConfig(**exp.QUICK), quick_data, tokenizer)
    tok, _ = quick_data.prompts["val"]
    gold = {tok[i].tobytes(): ids for i, ids in enumerate(
        task.encode(tokenizer, [task.target_text(p) for p in quick_data.problems["val"]]))}

    def fake_rollout(policy, t, m, key, model_cfg, cfg):
        rows = [gold[t[b].tobytes()] if j % 2 == 0 else [] for b in range(len(t)) for j in range(cfg.n)]
        out = np.zeros((len(rows), 64), np.int32)
        for r, ids in enumerate(rows):
            out[r, :len(ids)] = ids
        return types.SimpleNamespace(tokens_BxN=out, lengths_B=np.array([len(r) for r in rows]), mask_BxN=out > 0,
                                     prompt_tokens_BxP=np.repeat(t, cfg.n, 0), prompt_mask_BxP=np.repeat(m, cfg.n, 0))

    monkeypatch.setattr(reftjax.rollout, "rollout", fake_rollout)
    samples, grades = rr.sample(runner, None, "val", 3, seed=0, n=7, batch=4)
    assert samples["idx"].tolist() == np.repeat(np.arange(7), 3).tolist() and len(grades) == 21
    assert [g.score for g in grades] == [1.0, 0.0, 1.0] * 7
    assert (samples["prompt_tokens"] == np.repeat(tok[:7], 3, 0)).all()


def test_the_experiments_refuse_seeds_a_jax_key_would_wrap_before_anything_runs(capsys):
    """--seed / --seeds take 0 to 2**31 - 1: `jax.random.key` keeps a seed's low 32 bits and the experiments add
    offsets (10,000 + 1000 for an arm's critic), so 2**32 + 5 ran as 5 and -1 failed in NumPy after the warm-up
    (session 55's list). argparse exits 2 naming the flag; the largest seed passes the parser."""
    from experiments import arithmetic_rerank as rr
    from experiments import arithmetic_rl_probe as probe

    for main, flag in ((exp.parse_args, "--seeds"), (rr.main, "--seed"), (probe.main, "--seed")):
        for bad in ("4294967301", "2147483648", "-1", "1.5"):
            with pytest.raises(SystemExit) as e:
                main([flag, bad])
            assert e.value.code == 2
            err = capsys.readouterr().err
            assert f"argument {flag}: " in err and ("2**31 - 1" in err or "expected an integer, got '1.5'" in err)
    assert exp.parse_args(["--seeds", "0", "2147483647"])[1].seeds == [0, 2**31 - 1]
