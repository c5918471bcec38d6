"""Does the verifier help? rerank@k vs voting@k vs greedy at laptop scale (arithmetic word problems).

    python -m experiments.arithmetic_rerank [--quick] [--out DIR] [--seed 0] [--k 8]

The ReFT recipe for reranking (`reftjax.rerank`) on the task of `experiments.arithmetic_reft`:
a tiny random-init Llama is warmed up by SFT until 80% validation accuracy; k solutions to each
of the first `--n-train-questions` training problems are sampled from it at temperature 1 and graded
against the gold answers; a verifier initialised from the warm-up model learns to tell correct from
wrong ones; then, per held-out problem, k fresh samples are scored and the top-scored one with an answer is taken.

The verifier's learning rate is chosen on the validation split (rerank@k) from `--lrs`; the
test split is read only for the chosen one. Reports greedy top-1, voting@k, rerank@k and the
any-of-k-correct upper bound on validation and test; writes ``results.json`` and ``results.md``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import time

import numpy as np

from experiments import arithmetic_reft as ar
from experiments import arithmetic_task as task

QUICK = dict(n_train=64, n_val=16, n_test=16, n_hard=8, warmup_samples=256, warmup_target=0.0,
             warmup_check_every=256)


def sample(runner: ar.Runner, policy, split: str, k: int, seed: int, n: int | None = None, batch: int = 128):
    """k temperature-1 samples per problem of `split`: (prompt tokens, mask, completions, masks, grades, problem
    idx)."""
    import jax

    from reftjax.rollout import rollout

    items = runner.data.problems[split][:n]
    tok, mask = (a[:len(items)] for a in runner.data.prompts[split])
    samp = dataclasses.replace(runner.sample, n=k, max_new_tokens=runner.cfg.eval_new_tokens)
    out = {key: [] for key in ("prompt_tokens", "prompt_mask", "tokens", "mask", "idx")}
    grades = []
    for s in range(0, len(items), batch):
        t, m = tok[s:s + batch], mask[s:s + batch]
        rows = len(t)
        if rows < batch:  # one program for every call: pad the last batch with copies, dropped below
            t = np.concatenate([t, np.repeat(t[:1], batch - rows, 0)])
            m = np.concatenate([m, np.repeat(m[:1], batch - rows, 0)])
        r = rollout(policy, t, m, jax.random.fold_in(jax.random.key(seed), s), model_cfg=runner.model_cfg, cfg=samp)
        keep = rows * k
        texts = runner.decode(r.tokens_BxN, r.lengths_B)[:keep]
        grades += runner.grader.grade_batch([items[s + j // k] for j in range(keep)], texts)
        for key, v in (("prompt_tokens", r.prompt_tokens_BxP), ("prompt_mask", r.prompt_mask_BxP),
                       ("tokens", r.tokens_BxN), ("mask", r.mask_BxN)):
            out[key].append(np.asarray(v)[:keep])
        out["idx"].append(s + np.arange(keep) // k)
    return {key: np.concatenate(v) for key, v in out.items()}, grades


def train_verifier(runner: ar.Runner, warm, data, lr: float, epochs: int, batch: int, seed: int,
                   token_level: bool = False):
    import jax

    from reftjax.rerank import init_verifier, make_verifier_step
    from reftjax.steps import OptimConfig, init_state, make_optimizer

    steps = epochs * -(-len(data) // batch)
    tx = make_optimizer(OptimConfig(learning_rate=lr), steps)  # linear decay, 10% warm-up, clip 1.0 (ReFT's)
    state = init_state({"verifier": init_verifier(warm, runner.model_cfg, jax.random.key(seed))}, tx,
                       jax.random.key(seed + 1))
    step, losses = make_verifier_step(runner.model_cfg, tx, token_level), []
    for e in range(epochs):
        for b in data.batches(batch, seed=seed + e):
            state, m = step(state, b)
            losses.append(m["loss"])
    return state.params["verifier"], [float(x) for x in jax.device_get(losses)]


def accuracies(verifier, runner: ar.Runner, samples, grades, k: int) -> dict:
    from reftjax.evaluate import majority_correct
    from reftjax.rerank import any_correct, rerank_correct, verifier_scores

    scores = np.asarray(verifier_scores(verifier, samples["prompt_tokens"], samples["prompt_mask"], samples["tokens"],
                                        samples["mask"], model_cfg=runner.model_cfg))
    groups = range(0, len(grades), k)
    correct = np.array([g.score >= 1.0 for g in grades])
    aucs = [within_auc(scores[g:g + k], correct[g:g + k]) for g in groups if 0 < correct[g:g + k].sum() < k]
    return {"voting": float(np.mean([majority_correct(grades[g:g + k]) for g in groups])),
            "weighted_voting": float(np.mean([majority_correct(grades[g:g + k], scores[g:g + k]) for g in groups])),
            "within_question_auc": float(np.mean(aucs)) if aucs else None, "mixed_questions": len(aucs),
            "rerank": float(np.mean([rerank_correct(scores[g:g + k], grades[g:g + k]) for g in groups])),
            "upper_bound": float(np.mean([any_correct(grades[g:g + k]) for g in groups])),
            "sample_accuracy": float(np.mean([g.score >= 1.0 for g in grades]))}


def within_auc(scores, correct) -> float:
    """P(a correct sample outscores a wrong one of the same question), ties counting half: what reranking needs."""
    pos, neg = scores[correct], scores[~correct]
    return float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m experiments.arithmetic_rerank", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny CI version (pipeline check, not the result)")
    ap.add_argument("--out", default="runs/arithmetic_rerank")
    ap.add_argument("--seed", type=ar.seed_arg, default=0)
    ap.add_argument("--k", type=int, default=8, help="samples per problem (training data and rerank@k)")
    ap.add_argument("--n-train-questions", type=int, default=1000, help="training problems sampled for the verifier")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3])
    ap.add_argument("--token-level", action="store_true", help="train every completion slot (Cobbe et al.)")
    args = ap.parse_args(argv)
    cfg = ar.ExpConfig(**(QUICK if args.quick else {}))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0, load = time.time(), os.getloadavg()[0]
    tokenizer = task.build_tokenizer()
    runner = ar.Runner(cfg, ar.build_data(cfg, tokenizer), tokenizer)

    import jax

    from reftjax.models import init_params
    from reftjax.rerank import collect, dedup_rows

    def reached(samples, policy, stats):  # validation only
        return runner.accuracy(policy, "val") >= cfg.warmup_target

    warm, used = ar.train_sft(runner, init_params(runner.model_cfg, jax.random.key(args.seed)), cfg.warmup_samples,
                              cfg.warmup_lr, "linear", args.seed, reached if cfg.warmup_target > 0 else None,
                              cfg.warmup_check_every)
    k = args.k
    train, train_grades = sample(runner, warm, "train", k, seed=100 + args.seed, n=args.n_train_questions)
    texts = runner.decode(train["tokens"], train["mask"].sum(1))
    keep = dedup_rows(texts, train["idx"].tolist())
    data = collect([{"prompt_tokens": train["prompt_tokens"][keep], "prompt_mask": train["prompt_mask"][keep],
                     "tokens": train["tokens"][keep], "mask": train["mask"][keep],
                     "labels": np.array([train_grades[i].score >= 1.0 for i in keep], np.float32),
                     "example_idx": train["idx"][keep]}], tokenizer.pad_token_id)
    print(f"warm-up {used} samples; verifier data {len(data)} rows ({len(train_grades)} sampled), "
          f"{data.labels.mean():.3f} correct", flush=True)
    held = {s: sample(runner, warm, s, k, seed=200 + args.seed) for s in ("val", "test")}
    greedy = {s: runner.accuracy(warm, s) for s in ("val", "test")}
    tried = {}
    for lr in args.lrs:
        verifier, losses = train_verifier(runner, warm, data, lr, args.epochs, args.batch, args.seed, args.token_level)
        tried[lr] = {"val": accuracies(verifier, runner, *held["val"], k), "loss_first": losses[0],
                     "loss_last": float(np.mean(losses[-10:])), "verifier": verifier}
        print(f"  lr {lr:g}: val {tried[lr]['val']}  loss {losses[0]:.3f} -> {tried[lr]['loss_last']:.3f}", flush=True)
    best = max(tried, key=lambda lr: tried[lr]["val"]["rerank"])  # ties: the first (smallest) lr
    test = accuracies(tried[best]["verifier"], runner, *held["test"], k)
    result = {"k": k, "seed": args.seed, "warmup_samples": used, "verifier_rows": len(data),
              "verifier_positive_fraction": float(data.labels.mean()), "chosen_lr": best,
              "greedy": greedy, "val": tried[best]["val"], "test": test,
              "lr_search": {str(lr): {kk: v for kk, v in r.items() if kk != "verifier"} for lr, r in tried.items()},
              "config": dataclasses.asdict(cfg), "args": vars(args), "wall_seconds": time.time() - t0,
              "loadavg_start_end": [load, os.getloadavg()[0]]}
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    md = [f"# rerank@{k} on arithmetic word problems (seed {args.seed})", "",
          f"Warm-up {used} SFT samples; verifier trained on {len(data)} deduplicated samples of "
          f"{min(args.n_train_questions, len(runner.data.problems['train']))} training problems "
          f"({pct(data.labels.mean())}% correct), lr {best:g} chosen on validation rerank@{k}.", "",
          f"| split | greedy top-1 | one sample | voting@{k} | rerank@{k} | weighted voting@{k} | any of {k} correct | "
          "within-question AUC |", "|---|---|---|---|---|---|---|---|"]
    for s, r in (("val", tried[best]["val"]), ("test", test)):
        auc = "-" if r["within_question_auc"] is None else f"{r['within_question_auc']:.3f}"
        md.append(f"| {s} | {pct(greedy[s])} | {pct(r['sample_accuracy'])} | {pct(r['voting'])} | {pct(r['rerank'])} | "
                  f"{pct(r['weighted_voting'])} | {pct(r['upper_bound'])} | {auc} |")
    md += ["", f"Wall time {result['wall_seconds']:.0f} s on {os.cpu_count()} CPU cores."]
    ar.write_atomic(out / "results.json", lambda f: json.dump(result, f, indent=1))
    ar.write_atomic(out / "results.md", lambda f: f.write("\n".join(md) + "\n"))
    print("\n".join(md), flush=True)
    return result


if __name__ == "__main__":
    main()
