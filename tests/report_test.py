"""summary.json / summary.md of a run (`reftjax.report.write_summary`)."""
import dataclasses
import json

from reftjax.config import ExperimentConfig
from reftjax.evaluate import EvalConfig


def _evals(voting: bool, base: bool):
    vote = {"voting_accuracy": 0.5} if voting else {}
    evals = {"test_sft": {"accuracy": 0.125, "n": 8, **vote}, "test_reft": {"accuracy": 0.25, "n": 8, **vote},
             "val_sft": {"accuracy": 0.5}, "val_rl_3": {"accuracy": 0.75}}
    if base:
        evals["test_base"] = {"accuracy": 0.0, "n": 8}
    return evals


def test_summary_table_shows_dash_for_missing_figures_and_json_keeps_null(tmp_path):
    from reftjax.report import write_summary

    cfg = dataclasses.replace(ExperimentConfig(), eval=EvalConfig(voting_k=0))
    summary = write_summary(tmp_path, cfg, _evals(voting=False, base=False), 12.34)
    md = (tmp_path / "summary.md").read_text()
    assert "None" not in md
    assert "| stage | greedy top-1 (%) | voting@- (%) |" in md
    assert "| before SFT | - | - |" in md
    assert "| after SFT warm-up | 12.5 | - |" in md and "| after ReFT (ppo) | 25.0 | - |" in md
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["test_accuracy"] == {"base": None, "sft": 12.5, "reft": 25.0} == summary["test_accuracy"]
    assert on_disk["test_voting_accuracy"] == {"sft": None, "reft": None, "k": 0}
    assert on_disk["val_accuracy"] == {"sft": 50.0, "rl": {"3": 75.0}} and on_disk["test_n"] == 8


def test_summary_table_with_voting_and_base(tmp_path):
    from reftjax.report import write_summary

    cfg = dataclasses.replace(ExperimentConfig(), eval=EvalConfig(voting_k=16))
    write_summary(tmp_path, cfg, _evals(voting=True, base=True), 1.0)
    md = (tmp_path / "summary.md").read_text()
    assert "| stage | greedy top-1 (%) | voting@16 (%) |" in md
    assert "| before SFT | 0.0 | - |" in md and "| after ReFT (ppo) | 25.0 | 50.0 |" in md
    assert "| after ReFT (ppo) | 25.0 | 50.0 |\n" in md and "rerank" not in md  # (no verifier: no rerank columns)
    assert json.loads((tmp_path / "summary.json").read_text())["test_rerank_accuracy"] is None


def test_summary_json_is_written_last(tmp_path, monkeypatch):
    """summary.json ("status": "done") is what a script polls for: it was written before summary.md (and train.run
    drew the plots after both), so a poller could find it with the rest missing (session 29's list)."""
    from reftjax import report

    written, real = [], report._replace
    monkeypatch.setattr(report, "_replace", lambda path, data: written.append(path.name) or real(path, data))
    report.write_summary(tmp_path, ExperimentConfig(), _evals(voting=False, base=True), 1.0)
    assert written == ["summary.md", "summary.json"]


def test_the_compile_line_names_tracing_and_lowering_too(tmp_path):
    """The metrics rows' compile_seconds count tracing, lowering and compiling; the summary's line gave the compile
    alone under the same word, so one row could read more than the whole invocation (review, session 30)."""
    from reftjax import report

    comp = {"programs": 12, "compile_seconds": 11.84, "trace_lower_seconds": 9.23, "cache_dir": None}
    report.write_summary(tmp_path, ExperimentConfig(), _evals(voting=False, base=True), 1.0, compilation=comp)
    assert "XLA in this invocation: 12 programs, 11.84 s compiling and 9.23 s tracing and lowering." in \
        (tmp_path / "summary.md").read_text()


def test_no_files_when_not_writing(tmp_path):
    from reftjax.report import write_summary

    summary = write_summary(tmp_path, ExperimentConfig(), _evals(voting=False, base=True), 1.0, write=False)
    assert summary["status"] == "done" and not list(tmp_path.iterdir())


def test_summary_names_test_examples_dropped_by_length(tmp_path):
    from reftjax.report import write_summary

    stats = {"test": {"examples": 32, "kept": 30, "dropped": 2, "prompt_truncated": 0, "target_truncated": 0}}
    summary = write_summary(tmp_path, ExperimentConfig(), _evals(voting=False, base=True), 1.0, data_stats=stats)
    assert summary["data_stats"] == stats
    md = (tmp_path / "summary.md").read_text()
    assert "n = 8 (2 of 32 test examples dropped: prompt longer than data.tokenize.max_prompt_len = 300; " in md
    # over every question, the dropped counted wrong (the authors keep every test question; review, session 27)
    t = summary["test_accuracy"]
    assert summary["test_accuracy_all_questions"] == {k: round(x * 30 / 32, 2) for k, x in t.items()}
    assert f"greedy accuracy over all 32, the dropped counted wrong: base {round(t['base'] * 30 / 32, 2)}%" in md
    v = summary["test_voting_accuracy"]  # voting@k too (review, session 29)
    assert summary["test_voting_accuracy_all_questions"] == {k: x if k == "k" or x is None else round(x * 30 / 32, 2)
                                                             for k, x in v.items()}
    voted = write_summary(tmp_path, ExperimentConfig(eval=EvalConfig(voting_k=16)), _evals(voting=True, base=True), 1.0,
                          data_stats=stats)
    assert voted["test_voting_accuracy_all_questions"]["reft"] == round(50.0 * 30 / 32, 2)
    assert f"; voting@16 reft {round(50.0 * 30 / 32, 2)}%" in (tmp_path / "summary.md").read_text()
    # rerank@k's all-questions figure is in the note too (it was in summary.json only; session 29's list)
    cfg = ExperimentConfig(eval=EvalConfig(voting_k=16))
    cfg = dataclasses.replace(cfg, rerank=dataclasses.replace(cfg.rerank, epochs=1))
    evals = _evals(voting=True, base=True)
    evals["test_reft"]["rerank_accuracy"] = 0.75
    reranked = write_summary(tmp_path, cfg, evals, 1.0, data_stats=stats)
    assert reranked["test_rerank_accuracy_all_questions"]["reft"] == round(75.0 * 30 / 32, 2)
    assert f"; rerank@16 reft {round(75.0 * 30 / 32, 2)}%)" in (tmp_path / "summary.md").read_text()
    # from the unrounded fraction: 6 of 1,314 kept is 0.46%, and 6 of all 1,319 is 0.45%, not 0.46 x 1314 / 1319
    # rounded again (GSM8K P-CoT's case; 0.01 off for a quarter of the outcomes; review, session 30)
    gsm = {"test": {"examples": 1319, "kept": 1314, "dropped": 5}}
    evals = {"test_sft": {"accuracy": 6 / 1314, "n": 1314, "voting_accuracy": 14 / 1314}}
    got = write_summary(tmp_path, ExperimentConfig(eval=EvalConfig(voting_k=16)), evals, 1.0, data_stats=gsm)
    assert (got["test_accuracy"]["sft"], got["test_accuracy_all_questions"]["sft"]) == (0.46, 0.45)
    assert got["test_voting_accuracy_all_questions"]["sft"] == round(100 * 14 / 1319, 2) == 1.06
    none = {"test": {**stats["test"], "kept": 32, "dropped": 0}}
    again = write_summary(tmp_path, ExperimentConfig(), _evals(voting=False, base=True), 1.0, data_stats=none)
    assert again["test_accuracy_all_questions"] == again["test_accuracy"]
    older = {"test": {"examples": 32, "dropped": 2}}  # a caller's stats without "kept" (regression review)
    third = write_summary(tmp_path, ExperimentConfig(), _evals(voting=False, base=True), 1.0, data_stats=older)
    assert third["test_accuracy_all_questions"] == summary["test_accuracy_all_questions"]


def test_prepare_data_warns_about_examples_dropped_by_length(smollm_tokenizer, shared_data, caplog, monkeypatch):
    """GSM8K with a 100-token prompt limit: some test questions do not fit; the run says so (per split, with the
    limit) instead of evaluating on fewer examples silently, and the counts reach the summary."""
    from reftjax.data import TokenizeConfig
    from reftjax.train import prepare_data, split_stats

    monkeypatch.setenv("REFTJAX_GSM8K_DIR", str(shared_data / "gsm8k"))
    data_cfg = dataclasses.replace(ExperimentConfig().data, n_train=8, n_val=8, n_test=64,
                                   tokenize=TokenizeConfig(max_prompt_len=100, max_target_len=400))
    cfg = dataclasses.replace(ExperimentConfig(), data=data_cfg)
    with caplog.at_level("WARNING", logger="reftjax"):
        data = prepare_data(cfg, smollm_tokenizer)
    st = split_stats(data)
    assert st["test"]["examples"] == 64 and 0 < st["test"]["dropped"] < 64
    assert st["test"]["kept"] == len(data.test_ds.prompt) == 64 - st["test"]["dropped"]
    msgs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("test split:")]
    assert msgs and f"{st['test']['dropped']} of 64 examples dropped" in msgs[0] and "max_prompt_len=100" in msgs[0]
    assert "kept examples only" in msgs[0]


def test_summary_without_a_warm_up_labels_the_loaded_model(tmp_path):
    """sft.epochs=0 (RL alone): the run used to evaluate the test set twice on the same weights and label the second
    row "after SFT warm-up"."""
    from reftjax.report import write_summary

    cfg = ExperimentConfig()
    cfg = dataclasses.replace(cfg, sft=dataclasses.replace(cfg.sft, epochs=0), eval=EvalConfig(voting_k=16))
    write_summary(tmp_path, cfg, _evals(voting=True, base=False), 1.0)
    md = (tmp_path / "summary.md").read_text()
    assert "| loaded model (no SFT warm-up) | 12.5 | 50.0 |" in md
    assert "before SFT" not in md and "after SFT warm-up" not in md


def test_partial_credit_graders_report_and_plot_the_mean_score_that_selects(tmp_path):
    """With a grader other than ReFT's, the best checkpoint and early stopping go by the mean validation score, but
    the summary and plots showed accuracy alone (0 throughout for partial credit) and never the selecting figure."""
    from reftjax.metrics import MetricsLogger
    from reftjax.report import plot_names, plot_run, write_summary

    sim = (("type", "text_similarity"), ("name", "s"), ("input", "{{sample.output_text}}"),
           ("reference", "{{item.answer_value}}"), ("evaluation_metric", "fuzzy_match"))
    cfg = dataclasses.replace(ExperimentConfig(), grader=sim)
    evals = {"test_sft": {"accuracy": 0.0, "n": 8, "mean_score": 0.31}, "test_reft": {"accuracy": 0.0, "n": 8,
             "mean_score": 0.62}, "val_sft": {"accuracy": 0.0, "mean_score": 0.3},
             "val_rl_10": {"accuracy": 0.0, "mean_score": 0.5}, "val_rl_20": {"accuracy": 0.0, "mean_score": 0.61}}
    summary = write_summary(tmp_path, cfg, evals, 1.0)
    assert summary["selection_metric"] == "mean_score"
    assert summary["test_mean_score"] == {"base": None, "sft": 0.31, "reft": 0.62}
    assert summary["val_mean_score"] == {"sft": 0.3, "rl": {10: 0.5, 20: 0.61}}
    md = (tmp_path / "summary.md").read_text()
    assert "| stage | greedy top-1 (%) | voting@- (%) | mean score |" in md
    assert "| after SFT warm-up | 0.0 | - | 0.31 |" in md and "| after ReFT (ppo) | 0.0 | - | 0.62 |" in md
    assert "Validation mean score (selects the best checkpoint): the warm-up 0.3; RL iteration 10: 0.5, 20: 0.61." in md
    assert "Validation greedy accuracy (%): the warm-up 0.0; RL iteration 10: 0.0, 20: 0.0." in md
    log = MetricsLogger(tmp_path, tensorboard=False)
    for step, score in ((10, 0.5), (20, 0.61)):
        log.log("val", step, {"accuracy": 0.0, "mean_score": score})
    log.close()
    written = plot_run(tmp_path, summary["selection_metric"])
    assert [p.name for p in written] == ["reward.png", "kl.png", "response_length.png", "val_accuracy.png",
                                         "val_mean_score.png"] == [f"{n}.png" for n in plot_names("mean_score")]
    # summary.md lists what plot_run drew, in its order (the notebook's last cell shows them: plot_names)
    assert md.rstrip().endswith("\n\nPlots: " + ", ".join(f"plots/{p.name}" for p in written))
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)
    for best, said in ((0, "the warm-up, RL's starting point: no readable RL checkpoint beat its validation mean "
                            "score (0.3), so"), (20, "RL iteration 20, the best validation mean score.")):
        write_summary(tmp_path, cfg, evals, 1.0, best_iteration=best)
        assert f"Tested after ReFT and exported as hf/best: {said}" in (tmp_path / "summary.md").read_text()
    assert "mean_score" not in write_summary(tmp_path, ExperimentConfig(), evals, 1.0)["selection_metric"]
    assert [p.name for p in plot_run(tmp_path, "accuracy")] == [f"{n}.png" for n in plot_names("accuracy")] == \
        ["reward.png", "kl.png", "response_length.png", "val_accuracy.png"]
    assert (tmp_path / "summary.md").read_text().rstrip().endswith(
        "\n\nPlots: plots/reward.png, plots/kl.png, plots/response_length.png, plots/val_accuracy.png")


def test_no_after_reft_row_without_rl_iterations(tmp_path):
    from reftjax.config import RLConfig
    from reftjax.report import write_summary

    cfg = dataclasses.replace(ExperimentConfig(), rl=RLConfig(iterations=0), eval=EvalConfig(voting_k=0))
    summary = write_summary(tmp_path, cfg, {k: v for k, v in _evals(False, True).items() if k != "test_reft"}, 1.0)
    md = (tmp_path / "summary.md").read_text()
    assert "| after SFT warm-up | 12.5 | - |" in md and "after ReFT" not in md
    assert summary["test_n"] == 8 and "n = 8." in md  # (the test size: test_sft's, there without an after-ReFT test)


def test_wall_time_adds_up_every_invocation_of_a_resumed_run(tmp_path):
    """summary.json's `wall_seconds` was the last invocation's alone: a run killed after 5 h and resumed for 1 h
    reported 1 h. Each invocation logs an `invocation` row; a killed one counts to its last logged row."""
    from reftjax.config import ExperimentConfig
    from reftjax.metrics import MetricsLogger
    from reftjax.report import wall_times, write_summary

    rows = [{"phase": "invocation", "step": 1, "time": 100.0}, {"phase": "sft", "step": 0, "time": 130.0},
            {"phase": "sft", "step": 1, "time": 160.0},  # killed after this row
            {"phase": "invocation", "step": 2, "time": 1000.0}, {"phase": "rl", "step": 1, "time": 1010.0}]
    assert wall_times(rows, now=1025.0) == (60.0 + 25.0, 2)
    assert wall_times(rows[:3], now=170.0) == (70.0, 1)
    # rows logged before invocation rows existed count as one invocation, first row to last (they were left out: a
    # run resumed across the upgrade reported its later invocations only; regression review)
    old = [{"phase": "sft", "step": s, "time": 1000.0 + 10 * s} for s in range(100)]
    assert wall_times(old, now=9e9) == (990.0, 1)
    assert wall_times(old + [{"phase": "invocation", "step": 1, "time": 5000.0}, {"phase": "rl", "step": 1,
                                                                                 "time": 5010.0}], now=5120.0) == \
        (990.0 + 120.0, 2)
    assert wall_times([], now=9.0) == (0.0, 0)
    # an invocation runs to its latest row, wherever that row sits in the file
    assert wall_times([rows[0], rows[2], rows[1], *rows[3:]], now=1025.0) == (60.0 + 25.0, 2)
    # an invocation's start-up before its row (model load, tokenization) and its tail after its last step (exports,
    # an interrupt's save: the `end` row) count too (both were left out; review, session 30)
    timed = [{"phase": "invocation", "step": 1, "time": 100.0, "startup_seconds": 40.0},
             {"phase": "sft", "step": 0, "time": 130.0}, {"phase": "end", "step": 1, "time": 190.0, "seconds": 130.0},
             {"phase": "invocation", "step": 2, "time": 1000.0, "startup_seconds": 5.0}]
    assert wall_times(timed, now=1010.0) == (130.0 + 15.0, 2)
    logger = MetricsLogger(tmp_path, tensorboard=False, enabled=True)
    logger.log("invocation", 1, {})
    logger.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {**first, "time": first["time"] - 500.0}, {"phase": "sft", "step": 0, "time": first["time"] - 400.0},
        {**first, "step": 2}]) + "\n")
    summary = write_summary(tmp_path, ExperimentConfig(), _evals(voting=False, base=True), 3.0)
    assert summary["invocations"] == 2 and summary["wall_seconds"] == 3.0
    assert 100.0 <= summary["wall_seconds_total"] < 110.0  # 100 s of the first invocation + this one's few
    assert "over all 2 (a killed one counted to its last logged row)" in (tmp_path / "summary.md").read_text()


def test_a_failed_summary_write_leaves_the_previous_summary_whole(tmp_path, monkeypatch):
    """summary.json, summary.md and the plots were written in place: a full disk (or a kill) cut a finished run's
    valid summary.json to invalid JSON, which a sweep script polling for it then read (helper review)."""
    import pathlib

    import pytest

    from reftjax.config import ExperimentConfig
    from reftjax.report import plot_run, write_summary

    write_summary(tmp_path, ExperimentConfig(), _evals(voting=False, base=True), 1.0)
    plot_run(tmp_path, "accuracy")
    before = {p.name: p.read_bytes() for p in [*tmp_path.iterdir(), *(tmp_path / "plots").iterdir()] if p.is_file()}
    assert {"summary.json", "summary.md", "reward.png"} <= set(before)
    real = pathlib.Path.write_bytes

    def disk_full(self, data):
        real(self, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_bytes", disk_full)
    for call in (lambda: write_summary(tmp_path, ExperimentConfig(), _evals(voting=True, base=True), 2.0),
                 lambda: plot_run(tmp_path, "accuracy")):
        with pytest.raises(OSError, match="No space left"):
            call()
    after = {p.name: p.read_bytes() for p in [*tmp_path.iterdir(), *(tmp_path / "plots").iterdir()] if p.is_file()}
    assert after == before  # whole, and no temporary file left beside them
    json.loads((tmp_path / "summary.json").read_text())


def test_summary_columns_with_a_mean_score_and_reranking(tmp_path):
    """With a partial-credit grader and the verifier on, the header had "mean score" before the rerank columns and
    each row after them: every one of those figures sat under another's name (review, session 29)."""
    from reftjax.report import write_summary

    grader = (("type", "string_check"), ("input", "{{sample.output_text}}"), ("reference", "x"), ("operation", "eq"))
    cfg = ExperimentConfig(eval=EvalConfig(voting_k=2), grader=grader)
    cfg = dataclasses.replace(cfg, rerank=dataclasses.replace(cfg.rerank, epochs=1))
    evals = _evals(voting=True, base=True)
    evals["test_sft"].update(rerank_accuracy=0.5, weighted_voting_accuracy=0.625, upper_bound_accuracy=0.75,
                             mean_score=0.33)
    write_summary(tmp_path, cfg, evals, 1.0)
    md = (tmp_path / "summary.md").read_text().splitlines()
    head = next(x for x in md if x.startswith("| stage"))
    row = next(x for x in md if x.startswith("| after SFT warm-up"))
    cells = dict(zip([c.strip() for c in head.strip("|").split("|")], [c.strip() for c in row.strip("|").split("|")]))
    assert cells == {"stage": "after SFT warm-up", "greedy top-1 (%)": "12.5", "voting@2 (%)": "50.0",
                     "rerank@2 (%)": "50.0", "weighted voting@2 (%)": "62.5", "any of 2 correct (%)": "75.0",
                     "mean score": "0.33"}


def test_plot_ticks_are_whole_iterations(tmp_path, monkeypatch):
    """A short run's plots had ticks at iterations 0.5, 1.5, ... (session 29's list)."""
    import matplotlib.pyplot as plt

    from reftjax import report

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    report._plot(tmp_path / "r.png", [(1, 0.1), (2, 0.3), (3, 0.2)], "t", "RL iteration", "reward")
    ticks = figures[0].axes[0].get_xticks()
    monkeypatch.undo()
    plt.close(figures[0])
    assert len(ticks) >= 3 and all(float(t).is_integer() for t in ticks) and (tmp_path / "r.png").is_file()


def test_plot_axes_stay_within_what_the_quantity_can_take(tmp_path, monkeypatch):
    """An accuracy of 0 throughout was drawn on an axis from -0.05 to 0.05, one of 1 up to 1.05 (matplotlib's
    margins): accuracy, scores and rewards stay within [0, 1] and lengths above 0, a sliver past the bound so markers
    show whole; the KL estimate, which can be negative, keeps matplotlib's axis; data inside keeps it too."""
    import matplotlib.pyplot as plt

    from reftjax import report

    def limits(pts, bounds):
        figures = []
        monkeypatch.setattr(plt, "close", figures.append)
        report._plot(tmp_path / "p.png", pts, "t", "RL iteration", "y", bounds)
        monkeypatch.undo()
        plt.close(figures[0])
        return figures[0].axes[0].get_ylim()

    lo, hi = limits([(0, 0.0), (3, 0.0), (6, 0.0)], report.UNIT)
    assert -0.003 < lo < 0 < hi <= 0.06
    lo, hi = limits([(1, 1.0), (2, 1.0)], report.UNIT)
    assert 0.9 < lo < 1 < hi < 1.003
    lo, hi = limits([(1, 0.0), (2, 0.5), (3, 1.0)], report.UNIT)
    assert -0.03 < lo < 0 and 1 < hi < 1.03
    assert limits([(1, 0.2), (2, 0.4)], report.UNIT) == limits([(1, 0.2), (2, 0.4)], None)  # inside: matplotlib's
    assert limits([(1, -0.01), (2, 0.0)], None)[0] < -0.01  # KL: no bound
    lo, _ = limits([(1, 0.0), (2, 128.0)], (0.0, None))
    assert -3 < lo < 0


def test_the_summary_names_the_tested_policy_and_the_validation_plot_starts_at_the_warm_up(tmp_path, monkeypatch):
    """Which policy the after-ReFT row tests and hf/best holds: an RL iteration, or the warm-up when no RL
    validation beat it (rl.best_includes_warmup), or the final policy without validation; the validation plots had
    no point for the warm-up, the figure RL starts from and must beat (session 29's list)."""
    from reftjax import report
    from reftjax.metrics import MetricsLogger

    evals = _evals(voting=False, base=False)
    by = {}
    for best in (3, 0, None):
        summary = report.write_summary(tmp_path, ExperimentConfig(), evals, 1.0, best_iteration=best)
        by[best] = (tmp_path / "summary.md").read_text()
        assert summary["best_iteration"] == json.loads((tmp_path / "summary.json").read_text())["best_iteration"]
    assert "hf/best: RL iteration 3, the best validation accuracy." in by[3] and "| after ReFT (ppo) | 25.0 |" in by[3]
    assert ("hf/best: the warm-up, RL's starting point: no readable RL checkpoint beat its validation accuracy (50.0%)"
            in by[0]
            and "| after ReFT (ppo): the warm-up, best on validation | 25.0 |" in by[0])
    assert "hf/best: the final policy (no best checkpoint" in by[None] and "| after ReFT (ppo) | 25.0 |" in by[None]
    no_warm_up = dataclasses.replace(ExperimentConfig(), sft=dataclasses.replace(ExperimentConfig().sft, epochs=0))
    report.write_summary(tmp_path, no_warm_up, evals, 1.0, best_iteration=0)  # RL alone: the loaded model competes
    md = (tmp_path / "summary.md").read_text()
    assert "hf/best: the loaded model, RL's starting point" in md and "(ppo): the loaded model, best on" in md
    assert "Validation greedy accuracy (%): the loaded model 50.0; RL iteration 3: 75.0." in md
    assert "Validation greedy accuracy (%): the warm-up 50.0; RL iteration 3: 75.0." in by[3]
    report.write_summary(tmp_path, no_warm_up, {"test_sft": {"accuracy": 0.125, "n": 8}}, 1.0)  # no validation
    assert "Validation greedy accuracy (%): none during RL." in (tmp_path / "summary.md").read_text()
    log = MetricsLogger(tmp_path, tensorboard=False)
    log.log("eval/val_sft", 0, {"accuracy": 0.5, "mean_score": 0.5})
    log.log("eval/test_sft", 0, {"accuracy": 0.125, "mean_score": 0.1})  # not a validation
    for step, acc in ((3, 0.75), (6, 0.25)):
        log.log("val", step, {"accuracy": acc, "mean_score": acc})
    log.close()
    drawn = {}
    monkeypatch.setattr(report, "_plot", lambda path, pts, title, x, y, bounds: drawn.setdefault(path.name, (pts, x)))
    report.plot_run(tmp_path, "mean_score")
    for name in ("val_accuracy.png", "val_mean_score.png"):
        assert drawn[name] == ([(0, 0.5), (3, 0.75), (6, 0.25)], "RL iteration (0: before RL)")


def test_the_summaries_count_grader_errors(tmp_path):
    """A judge down for a while scored rows 0 as grader errors: the metrics had them, the summaries did not, and
    showed the zeros as measured (review F, session 42). An RL iteration logged again (a resume) counts once."""
    from reftjax.report import write_summary

    rows = [{"phase": "rl", "step": 1, "grader_errors": 0}, {"phase": "rl", "step": 2, "grader_errors": 4},
            {"phase": "rl", "step": 2, "grader_errors": 3}, {"phase": "rl", "step": 3, "grader_errors": 8}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    evals = _evals(voting=False, base=True)
    evals["val_rl_3"]["grader_errors"] = 4
    evals["test_sft"].update(voting_samples=40, voting_grader_errors=5, grader_errors=0)  # (counted apart: session 45)
    summary = write_summary(tmp_path, ExperimentConfig(), evals, 1.0)
    assert summary["grader_errors"] == {"rl": 11, "evaluations": {"test_sft voting samples": 5, "val_rl_3": 4}}
    assert ("Grader errors (rows the grader could not grade, scored 0): 11 in the RL rollouts; in the evaluations "
            "{'test_sft voting samples': 5, 'val_rl_3': 4}.") in (tmp_path / "summary.md").read_text()
    # a validation row's errors are an evaluation's (counted from evals), not RL's; RL errors alone are said too
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows + [
        {"phase": "val", "step": 3, "grader_errors": 4}, {"phase": "eval/test_sft", "step": 0, "grader_errors": 2}]))
    summary = write_summary(tmp_path, ExperimentConfig(), _evals(voting=False, base=True), 1.0)
    assert summary["grader_errors"] == {"rl": 11, "evaluations": {}}
    assert "\nGrader errors (rows the grader could not grade, scored 0): 11 in the RL rollouts.\n" in \
        (tmp_path / "summary.md").read_text()
    clean = write_summary(tmp_path / "x", ExperimentConfig(), _evals(voting=False, base=True), 1.0, write=False)
    assert clean["grader_errors"] == {"rl": 0, "evaluations": {}}


def test_a_summary_without_timed_rows_counts_this_invocation(tmp_path):
    """`write_summary` from a library caller (no metrics.jsonl): the total wall time is at least this invocation's,
    one invocation; it read 0 in a mutant that passed the suite (mutation review, session 44)."""
    from reftjax.report import write_summary

    summary = write_summary(tmp_path, ExperimentConfig(), _evals(voting=False, base=False), 12.3)
    assert (summary["wall_seconds"], summary["wall_seconds_total"], summary["invocations"]) == (12.3, 12.3, 1)
    assert "\nWall time: 12.3 s in this invocation.\n" in (tmp_path / "summary.md").read_text()  # (no "over all 1")


def test_every_figure_is_read_from_its_own_stage_and_kind(tmp_path):
    """Each stage (base, sft, reft) and kind (greedy, voting, rerank, weighted voting, any correct, mean score) a
    figure of its own: one read from the wrong stage or kind shows (the fixtures gave sft and reft one voting figure,
    and reft no rerank figures; mutation review, session 55)."""
    from reftjax.report import write_summary

    grader = (("type", "string_check"), ("input", "{{sample.output_text}}"), ("reference", "x"), ("operation", "eq"))
    cfg = ExperimentConfig(eval=EvalConfig(voting_k=4), grader=grader)
    cfg = dataclasses.replace(cfg, rerank=dataclasses.replace(cfg.rerank, epochs=1))
    kinds = ("accuracy", "voting_accuracy", "rerank_accuracy", "weighted_voting_accuracy", "upper_bound_accuracy",
             "mean_score")
    evals = {"test_base": {"accuracy": 0.0625, "mean_score": 0.05, "n": 8},
             "test_sft": {"n": 8, **dict(zip(kinds, (0.125, 0.5, 0.375, 0.4375, 0.625, 0.2)))},
             "test_reft": {"n": 8, **dict(zip(kinds, (0.25, 0.625, 0.5, 0.5625, 0.75, 0.3)))},
             "val_sft": {"accuracy": 0.5, "mean_score": 0.45}, "val_rl_3": {"accuracy": 0.75, "mean_score": 0.7}}
    stats = {"test": {"examples": 10, "kept": 8, "dropped": 2}}  # 80% kept
    summary = write_summary(tmp_path, cfg, evals, 1.0, data_stats=stats)
    assert summary["test_voting_accuracy"] == {"sft": 50.0, "reft": 62.5, "k": 4}
    assert summary["test_rerank_accuracy"] == {"sft": 37.5, "reft": 50.0, "weighted_voting_sft": 43.75,
                                               "weighted_voting_reft": 56.25, "upper_bound_sft": 62.5,
                                               "upper_bound_reft": 75.0, "k": 4}
    assert summary["test_mean_score"] == {"base": 0.05, "sft": 0.2, "reft": 0.3}
    assert summary["val_mean_score"] == {"sft": 0.45, "rl": {3: 0.7}}
    assert summary["test_rerank_accuracy_all_questions"] == {
        "sft": 30.0, "reft": 40.0, "weighted_voting_sft": 35.0, "weighted_voting_reft": 45.0, "upper_bound_sft": 50.0,
        "upper_bound_reft": 60.0, "k": 4}
    md = (tmp_path / "summary.md").read_text()
    assert ("n = 8 (2 of 10 test examples dropped: prompt longer than data.tokenize.max_prompt_len = 300; greedy "
            "accuracy over all 10, the dropped counted wrong: base 5.0%, sft 10.0%, reft 20.0%; voting@4 sft 40.0%; "
            "voting@4 reft 50.0%; rerank@4 sft 30.0%; rerank@4 reft 40.0%).") in md
    assert ("| before SFT | 6.25 | - | - | - | - | 0.05 |\n"
            "| after SFT warm-up | 12.5 | 50.0 | 37.5 | 43.75 | 62.5 | 0.2 |\n"
            "| after ReFT (ppo) | 25.0 | 62.5 | 50.0 | 56.25 | 75.0 | 0.3 |\n") in md


def test_a_test_file_that_is_the_validation_file_is_said_to_be_so(tmp_path):
    """The test file named apart from the validation file (another spelling, a link) is still not held out; two
    files, or a file named once, are (mutation review, session 55)."""
    import os

    from reftjax.report import same_file, write_summary

    (tmp_path / "val.jsonl").write_text("{}\n")
    (tmp_path / "other.jsonl").write_text("{}\n")
    os.symlink(tmp_path / "val.jsonl", tmp_path / "link.jsonl")
    spelt = os.path.join(str(tmp_path), "..", tmp_path.name, "val.jsonl")
    assert same_file(spelt, str(tmp_path / "val.jsonl")) and same_file(str(tmp_path / "link.jsonl"), spelt)
    assert not same_file(str(tmp_path / "other.jsonl"), str(tmp_path / "val.jsonl"))
    assert not same_file(None, str(tmp_path / "val.jsonl")) and not same_file(None, None)
    assert same_file(str(tmp_path / "gone" / "a.jsonl"), os.path.join(str(tmp_path), "gone", ".", "a.jsonl"))
    for test_file, held_out in ((spelt, False), (str(tmp_path / "link.jsonl"), False),
                                (str(tmp_path / "other.jsonl"), True), (None, True)):
        cfg = ExperimentConfig()
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(
            cfg.data, train_file=str(tmp_path / "other.jsonl"), train_format="openai",
            val_file=str(tmp_path / "val.jsonl"), test_file=test_file))
        write_summary(tmp_path, cfg, _evals(voting=False, base=True), 1.0)
        md = (tmp_path / "summary.md").read_text()
        assert ("Model selection on a validation split only (never on test)." in md) == held_out, test_file
        assert ("It is the validation file (data.val_file), which selects the best checkpoint: its test figures are "
                "not held out." in md) != held_out, test_file
