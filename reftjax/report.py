"""Run reports: `summary.json`, `summary.md` and PNG plots from `metrics.jsonl` / `evals.json`."""
from __future__ import annotations

import io
import json
import os
import pathlib
import time

from reftjax.config import selection_metric, to_json
from reftjax.metrics import read_metrics


def _pct(x):
    return None if x is None else round(100.0 * x, 2)


def _cell(x) -> str:
    """A Markdown table cell: a missing figure (stage not evaluated, voting off) reads "-"."""
    return "-" if x is None else str(x)


def _compile_line(c: dict | None) -> str:
    if not c:
        return ""
    # (both: the metrics rows' compile_seconds count tracing and lowering too, and one row's could exceed this line's
    # compile-only figure; review, session 30)
    line = (f" XLA in this invocation: {c['programs']} programs, {c['compile_seconds']} s compiling and "
            f"{c.get('trace_lower_seconds', 0.0)} s tracing and lowering")
    if c.get("cache_dir"):
        line += f" ({c['cache_hits']} loaded from the compilation cache, ~{c['compile_seconds_saved']} s saved)"
    return line + "."


def wall_times(rows: list[dict], now: float) -> tuple[float, int]:
    """(seconds, invocations) over every invocation of a run, from `metrics.jsonl`'s rows: each invocation logs an
    `invocation` row once its model and data are in, with the `startup_seconds` before it (rows of earlier versions
    lack them: 0), and runs to its last logged row, its `end` row when it was not killed (a killed one's time after
    its last row is not known), the current one to `now`. Rows before the first `invocation` row (invocations of a
    version that did not log them) count as one invocation from its first row to its last."""
    spans, start, last, current = [], None, None, False
    for row in rows:
        t = row.get("time")
        if not isinstance(t, (int, float)):
            continue
        if row.get("phase") == "invocation":
            if start is not None:
                spans.append(last - start)
            startup = row.get("startup_seconds")
            start, last = t - (startup if isinstance(startup, (int, float)) else 0.0), t
            current = True
        elif start is not None:
            last = max(last, t)
        else:  # (they were left out: a run resumed across the upgrade reported only its later invocations)
            start = last = t
    if start is not None:
        spans.append((max(now, last) if current else last) - start)
    return sum(spans), len(spans)


def write_summary(out: pathlib.Path, cfg, evals: dict, wall_seconds: float, write: bool = True,
                  data_stats: dict | None = None, compilation: dict | None = None,
                  best_iteration: int | None = None) -> dict:
    """Accuracy before SFT, after warm-up and after ReFT (greedy and voting), as JSON and Markdown
    (`write=False`: only the dict, for the non-writing processes of a multi-process run).
    `wall_seconds` and `compilation` are this invocation's; `wall_seconds_total` adds the earlier invocations of a
    resumed run (`wall_times`). `data_stats`: per-split tokenization counts (`train.split_stats`); examples dropped
    by the length limits are named next to the test size, since accuracy is over the kept ones.
    `best_iteration`: the RL iteration of the policy tested after ReFT (`hf/best`), 0 for the warm-up (no RL
    validation beat it: `rl.best_includes_warmup`), None without one (no RL, or no validation during it)."""
    logged = read_metrics(out)
    total, invocations = wall_times(logged, time.time())
    # rows the grader could not grade (scored 0): a judge down for a while, a grader that fails on some items; the
    # metrics had them, the summaries did not (review F, session 42). An iteration logged again counts once (the last)
    rl_errors = {row.get("step"): int(row.get("grader_errors") or 0) for row in logged if row.get("phase") == "rl"}
    eval_errors = {key: int(v[field]) for name, v in sorted(evals.items())  # (the voting samples' apart)
                   for key, field in ((name, "grader_errors"), (f"{name} voting samples", "voting_grader_errors"))
                   if v.get(field)}
    def acc(name, key="accuracy"):
        return evals.get(name, {}).get(key)

    val = {int(k.rsplit("_", 1)[1]): v for k, v in evals.items() if k.startswith("val_rl_")}
    val_rl = {i: v["accuracy"] for i, v in val.items()}
    val_score = {i: v.get("mean_score") for i, v in val.items()}
    # graders with partial credit select checkpoints on the mean validation score (train.selection_metric), so the
    # report shows it beside the accuracy; with the ReFT grader accuracy is what selects
    metric = selection_metric(cfg)
    by_score = metric == "mean_score"
    summary = {
        "name": cfg.name, "model": cfg.model, "status": "done", "wall_seconds": round(wall_seconds, 1),
        "wall_seconds_total": round(max(total, wall_seconds), 1), "invocations": max(invocations, 1),
        "test_n": evals.get("test_sft", {}).get("n"),
        "test_accuracy": {"base": _pct(acc("test_base")), "sft": _pct(acc("test_sft")),
                          "reft": _pct(acc("test_reft"))},
        "test_voting_accuracy": {"sft": _pct(acc("test_sft", "voting_accuracy")),
                                 "reft": _pct(acc("test_reft", "voting_accuracy")), "k": cfg.eval.voting_k},
        "test_rerank_accuracy": {"sft": _pct(acc("test_sft", "rerank_accuracy")),
                                 "reft": _pct(acc("test_reft", "rerank_accuracy")),
                                 "weighted_voting_sft": _pct(acc("test_sft", "weighted_voting_accuracy")),
                                 "weighted_voting_reft": _pct(acc("test_reft", "weighted_voting_accuracy")),
                                 "upper_bound_sft": _pct(acc("test_sft", "upper_bound_accuracy")),
                                 "upper_bound_reft": _pct(acc("test_reft", "upper_bound_accuracy")),
                                 "k": cfg.eval.voting_k} if cfg.rerank.epochs else None,
        "val_accuracy": {"sft": _pct(acc("val_sft")), "rl": {k: _pct(v) for k, v in sorted(val_rl.items())}},
        "test_mean_score": {"base": acc("test_base", "mean_score"), "sft": acc("test_sft", "mean_score"),
                            "reft": acc("test_reft", "mean_score")},
        "val_mean_score": {"sft": acc("val_sft", "mean_score"), "rl": dict(sorted(val_score.items()))},
        "selection_metric": metric,
        "best_iteration": best_iteration,
        "grader_errors": {"rl": sum(rl_errors.values()), "evaluations": eval_errors},
        "data_stats": data_stats,
        "compilation": compilation,
        "config": to_json(cfg),
    }
    # greedy accuracy over every test question, the ones the length limit dropped counted wrong: the ReFT authors keep
    # every test question, so this is the figure to set beside the paper's (review, session 27: GSM8K P-CoT drops 5
    # of 1,319 at 300 prompt tokens); equal to test_accuracy when none was dropped
    test_stats = (data_stats or {}).get("test") or {}
    if test_stats.get("examples"):
        share = test_stats.get("kept", test_stats["examples"] - test_stats.get("dropped", 0)) / test_stats["examples"]

        def scale(figures: dict, key: str) -> dict:  # from the unrounded fractions (the rounded percentages, scaled
            # and rounded again, were 0.01 off for a quarter of GSM8K's outcomes; review, session 30)
            names = {"base": "test_base", "sft": "test_sft", "reft": "test_reft"}
            out = {}
            for k, x in figures.items():
                prefix, _, stage = k.rpartition("_")
                raw = acc(names[stage], f"{prefix}_accuracy" if prefix else key) if stage in names else None
                out[k] = x if k == "k" or x is None else _pct(raw * share)
            return out

        summary["test_accuracy_all_questions"] = scale(summary["test_accuracy"], "accuracy")
        # voting@k (and rerank@k) over every question too: the paper's voting@100 counts the dropped ones wrong as
        # well (only the greedy figure had it until session 29, review)
        summary["test_voting_accuracy_all_questions"] = scale(summary["test_voting_accuracy"], "voting_accuracy")
        if summary["test_rerank_accuracy"] is not None:
            summary["test_rerank_accuracy_all_questions"] = scale(summary["test_rerank_accuracy"], "rerank_accuracy")
    if not write:
        return summary
    t, v = summary["test_accuracy"], summary["test_voting_accuracy"]
    dropped = ""
    if test_stats.get("dropped"):
        every = summary["test_accuracy_all_questions"]
        dropped = (f" ({test_stats['dropped']} of {test_stats['examples']} test examples dropped: prompt longer "
                   f"than data.tokenize.max_prompt_len = {cfg.data.tokenize.max_prompt_len}; greedy accuracy over "
                   f"all {test_stats['examples']}, the dropped counted wrong: "
                   + ", ".join(f"{k} {_cell(x)}%" for k, x in every.items() if x is not None)
                   + "".join(f"; voting@{cfg.eval.voting_k} {k} {_cell(x)}%"
                             for k, x in summary["test_voting_accuracy_all_questions"].items()
                             if k != "k" and x is not None)
                   + "".join(f"; rerank@{cfg.eval.voting_k} {k} {_cell(x)}%"
                             for k, x in (summary.get("test_rerank_accuracy_all_questions") or {}).items()
                             if k in ("sft", "reft") and x is not None) + ")")
    r = summary["test_rerank_accuracy"]
    k = cfg.eval.voting_k or "-"
    head, rule = f"| stage | greedy top-1 (%) | voting@{k} (%) |", "|---|---|---|"
    start = "warm-up" if cfg.sft.epochs else "loaded model"  # RL's starting point
    if cfg.sft.epochs:
        rows = [("before SFT", t["base"], None, None), ("after SFT warm-up", t["sft"], v["sft"], "sft")]
    else:  # RL alone: the "sft" evaluation is of the loaded model (train.run skips the identical test_base)
        rows = [("loaded model (no SFT warm-up)", t["sft"], v["sft"], "sft")]
    if cfg.rl.iterations:  # (rl.iterations=0: the warm-up alone, no after-ReFT evaluation)
        rows.append((f"after ReFT ({cfg.rl.ppo.algo})" + (f": the {start}, best on validation" if best_iteration == 0
                                                          else ""), t["reft"], v["reft"], "reft"))
    if r is not None:  # rerank@k, verifier-weighted voting and the upper bound (some sample correct), same samples
        head += f" rerank@{k} (%) | weighted voting@{k} (%) | any of {k} correct (%) |"
        rule += "---|---|---|"
    if by_score:  # after the rerank columns, as each row's cells (it came before them: every figure shifted, review)
        head, rule = head + " mean score |", rule + "---|"
    table = []
    for stage, greedy, voting, key in rows:
        line = f"| {stage} | {_cell(greedy)} | {_cell(voting) if key else '-'} |"
        if r is not None:
            line += "".join(f" {_cell(r[prefix + key]) if key else '-'} |" for prefix in ("", "weighted_voting_",
                                                                                         "upper_bound_"))
        if by_score:
            line += f" {_cell(_round(summary['test_mean_score'][key or 'base']))} |"
        table.append(line)
    lines = [
        f"# {cfg.name}: {cfg.model}", "",
        f"Test set: {cfg.data.test_file or f'{cfg.data.test_dataset}/{cfg.data.test_split}'}, n = "
        f"{summary['test_n']}{dropped}. "
        + ("It is the validation file (data.val_file), which selects the best checkpoint: its test figures are "
           "not held out." if same_file(cfg.data.test_file, cfg.data.val_file)
           else "Model selection on a validation split only (never on test)."), "",
        head, rule, *table, "",
        _val_line("Validation greedy accuracy (%)", summary["val_accuracy"], start), "",
        *([_val_line("Validation mean score (selects the best checkpoint)",
                     {"sft": _round(summary["val_mean_score"]["sft"]),
                      "rl": {k: _round(x) for k, x in summary["val_mean_score"]["rl"].items()}}, start), ""]
          if by_score else []),
        *([_best_line(best_iteration, metric, summary, start), ""] if cfg.rl.iterations else []),
        *([f"Grader errors (rows the grader could not grade, scored 0): {summary['grader_errors']['rl']} in the RL "
           f"rollouts" + (f"; in the evaluations {eval_errors}" if eval_errors else "") + ".", ""]
          if summary["grader_errors"]["rl"] or eval_errors else []),
        f"Wall time: {summary['wall_seconds']} s in this invocation"
        + (f", {summary['wall_seconds_total']} s over all {summary['invocations']} (a killed one counted to its last "
           f"logged row)" if summary["invocations"] > 1 else "") + f".{_compile_line(compilation)}", "",
        "Plots: " + ", ".join(f"plots/{name}.png" for name in plot_names(metric)),
    ]
    _replace(out / "summary.md", ("\n".join(lines) + "\n").encode())
    # last: a script that polls for summary.json ("status": "done") finds summary.md (and, written before this by
    # train.run, the plots) already there; it came first (session 29's list)
    _replace(out / "summary.json", json.dumps(summary, indent=2).encode())
    return summary


def _val_line(what: str, figures: dict, start: str) -> str:
    """One validation curve in words: "what: the warm-up 50.0; RL iteration 3: 75.0, 6: 25.0" (it was a Python dict,
    `{3: 75.0, 6: 25.0}`, without its unit or RL's starting point)."""
    rl = ", ".join(f"{k}: {_cell(x)}" for k, x in figures["rl"].items())
    return (f"{what}: " + (f"the {start} {figures['sft']}; " if figures["sft"] is not None else "")
            + (f"RL iteration {rl}" if rl else "none during RL") + ".")


def _best_line(best_iteration: int | None, metric: str, summary: dict, start: str) -> str:
    name = "accuracy" if metric == "accuracy" else "mean score"
    if best_iteration is None:
        return ("Tested after ReFT and exported as hf/best: the final policy (no best checkpoint: no validation "
                "during RL, checkpoint.keep_best=0, or none readable).")
    if best_iteration == 0:
        warm = (f"{summary['val_accuracy']['sft']}%" if metric == "accuracy"
                else _round(summary["val_mean_score"]["sft"]))
        return (f"Tested after ReFT and exported as hf/best: the {start}, RL's starting point: no readable RL "
                f"checkpoint beat its validation {name} ({warm}), so the after-ReFT figures are its own "
                f"(rl.best_includes_warmup).")
    return f"Tested after ReFT and exported as hf/best: RL iteration {best_iteration}, the best validation {name}."


def _round(x):
    return None if x is None else round(x, 4)


_VAL_X = "RL iteration (0: before RL)"


def same_file(a: str | None, b: str | None) -> bool:
    """Whether paths `a` and `b` name one file: the same inode where both exist (hard and symbolic links), else the
    same real path."""
    if not (a and b):
        return False
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def plot_names(metric: str = "accuracy") -> tuple[str, ...]:
    """The plots `plot_run` draws in plots/ (each `<name>.png`), in order: what summary.md lists and the notebook
    shows (its last cell showed the first four alone, never the mean score that selects the best with a grader that
    gives partial credit)."""
    return ("reward", "kl", "response_length", "val_accuracy") + (("val_mean_score",) if metric == "mean_score"
                                                                   else ())


def plot_run(out: pathlib.Path, metric: str = "accuracy") -> list[pathlib.Path]:
    """reward / KL / response length per RL iteration and validation accuracy, one PNG each; with
    `metric="mean_score"` (`train.selection_metric` of a grader with partial credit) the mean validation score too."""
    import matplotlib

    matplotlib.use("Agg")

    rows = read_metrics(out)
    rl = [r for r in rows if r["phase"] == "rl"]
    # the warm-up's validation (the loaded model's without one) at iteration 0: RL's starting point, a candidate for
    # the best
    val = [r for r in rows if r["phase"] in ("val", "eval/val_sft")]
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    written = []
    # (the range each quantity can take: graders score in [0, 1], lengths are counts; the KL estimate has no bound)
    for key, title, bounds in (("reward", "mean grader reward per rollout batch", UNIT),
                               ("kl", "KL(policy || reference) per sequence", None),
                               ("response_length", "mean response length (tokens)", (0.0, None))):
        pts = [(r["step"], r[key]) for r in rl if r.get(key) is not None]
        written.append(_plot(plots / f"{key}.png", pts, title, "RL iteration", key, bounds))
    pts = [(r["step"], r["accuracy"]) for r in val if r.get("accuracy") is not None]
    written.append(_plot(plots / "val_accuracy.png", pts, "validation greedy accuracy", _VAL_X, "accuracy", UNIT))
    if metric == "mean_score":
        pts = [(r["step"], r["mean_score"]) for r in val if r.get("mean_score") is not None]
        written.append(_plot(plots / "val_mean_score.png", pts, "validation mean grader score (selects the best "
                             "checkpoint)", _VAL_X, "mean score", UNIT))
    return written


UNIT = (0.0, 1.0)


def _plot(path, pts, title, xlabel, ylabel, bounds=None):
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # iterations (ticks at 0.5, 1.5 on short runs)
    if pts:
        xs, ys = zip(*sorted(pts))
        ax.plot(xs, ys, marker="o" if len(xs) < 40 else None, linewidth=1.5)
        if bounds is not None:
            # matplotlib's margins put an accuracy of 0 throughout on an axis from -0.05 to 0.05 (and one of 1 up to
            # 1.05): keep the axis within what the quantity can take, a sliver past it so its markers show whole
            lo, hi = ax.get_ylim()
            sliver = 0.02 * (hi - lo)
            ax.set_ylim(lo if bounds[0] is None else max(lo, bounds[0] - sliver),
                        hi if bounds[1] is None else min(hi, bounds[1] + sliver))
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    _replace(path, buf.getvalue())
    return path


def _replace(path: pathlib.Path, data: bytes) -> None:
    """Writes `path` whole or not at all (a temporary sibling renamed over it): a full disk or a kill left a
    finished run's summary.json cut short, invalid JSON for a script polling for it (helper review)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
