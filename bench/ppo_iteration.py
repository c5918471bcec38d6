"""Benchmark: one RL iteration (rollout + grade + update) of reftjax vs TRL's GRPOTrainer.

SmolLM2-135M-Instruct, CPU fp32, the first `--prompts` GSM8K train questions in the ReFT
prompt layout (`Question:\\n{q}\\nAnswer reasoning:\\n`, left-padded to a bucket) x `--samples`
completions of at most `--new-tokens` tokens, temperature 1, graded by the ReFT N-CoT grader
(`ReftGrader(cot="nl")`; reftjax through the jit io_callback, TRL through a Python reward
function calling the same grader).

reftjax iteration = `rollout` -> `trim_to_bucket` (as `train.run_rl`) -> `make_experience_fn` (policy + value and
frozen reference forward, grader callback, rewards/advantages) -> `make_ppo_step`, for (with
`--experience-from-rollout` the policy forward is skipped: logp_old and the values come from the rollout;
with `--share-prompt` every experience/update forward runs each prompt once for its samples, `PPOConfig.share_prompt`)
  * ppo:  ReFT (value head, GAE, minibatch 8, 2 epochs);
  * grpo: group_size = samples, minibatch 8, 1 epoch (the same training FLOPs as TRL's
          single step over the whole batch), k3 KL to the reference in the loss (`--grpo-kl`, 0.04 by
          default; 0 skips the reference forward, as TRL does at its default beta 0).
TRL iteration = one `GRPOTrainer` step with its defaults except the sizes (per-device batch
= prompts x samples completions, num_generations = samples, max_completion_length), beta
(`--trl-beta`, default 0.0 = TRL's default: no reference model), use_cpu, bf16=False.
TRL keeps its default gradient checkpointing (without it the 32-row step needs ~15 GB here).

Contenders alternate in one process: a TrainerCallback times each TRL step (on_step_begin ->
on_step_end: generation, reward, loss, backward, optimizer) and, after each timed one, runs one
timed iteration of every reftjax algorithm. The first iteration of each contender is warm-up
(compilation for reftjax) and is not in the medians.

    python bench/ppo_iteration.py                      # one JSON line
    python bench/ppo_iteration.py --no-trl --repeats 3 # reftjax only

Keys: per algo `<algo>_iter_s` (median), `<algo>_rollout_s`/`_experience_s`/`_update_s`,
`<algo>_tokens_per_s` (generated tokens, up to and incl. EOS, per second of iteration),
`<algo>_compile_s` (first iteration minus the steady median), `<algo>_mfu`; `trl_iter_s`,
`trl_tokens_per_s`, `trl_mfu`; `ratio_vs_trl` (ppo tokens/s over TRL's), `ratio_grpo_vs_trl`.
Whether 3x TRL is within reach at all (#6 point 5): `<algo>_update_floor_s`, the update's model FLOPs (median
iteration) at the measured GEMM peak, i.e. the update at MFU 1; `<algo>_iter_s_at_3x_trl`, the seconds an iteration
of the algorithm's (mean) generated tokens may take for 3x TRL's tokens/s. A floor above the budget rules 3x out
before the rollout and the experience are counted.
`<algo>_{rollout,experience,update}_sys_s` and `trl_sys_s`: median system (kernel) CPU seconds per phase
(page faults, zeroing and compacting memory; the phase after a switch pays for the other framework's freed memory).
MFU counts model FLOPs (`reftjax.metrics.model_flops`: the trunk on real prompt tokens, once per group of rows that
share the prompt, and trunk + vocabulary head on completion tokens): rollout 1x (each prompt prefilled once for its
samples), experience 2x (policy, reference; 1x with --experience-from-rollout), each update epoch 3x,
the last two with --share-prompt over each prompt once per group (TRL: generation 1x, every row's prompt,
training 3x + 1x for the gradient-checkpointing recompute is *not* counted), over the GEMM
peak `reftjax.metrics.measured_peak_flops()`.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import sys
import tempfile
import time

from reftjax.host import cpu_description, use_hugepage_malloc  # noqa: E402

HOST_ALLOCATOR = use_hugepage_malloc()  # re-executes once, before the heavy imports: reftjax/host.py

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from reftjax.metrics import model_flops, rl_iteration_flops  # noqa: E402

DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k" / "train.jsonl"


def read_problems(n: int, data: pathlib.Path = DATA) -> tuple[list[str], list[dict]]:
    """First `n` GSM8K train questions as ReFT prompts, and grader items with `answer_value`."""
    from reftjax.data.prompts import reft_prompt
    from reftjax.data.records import parse_number

    prompts, items = [], []
    with open(data) as f:
        for line_no, line in zip(range(1, n + 1), f):
            row = json.loads(line)
            gold = row["answer"].split("####")[-1]
            prompts.append(reft_prompt(row["question"]))
            items.append({"answer_value": parse_number(gold, f"{data}:{line_no}")})
    return prompts, items


def _sys_s() -> float:
    """System (kernel) CPU seconds of this process so far: page faults, zeroing and compacting memory."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


def iteration_record(model_cfg, wall: tuple, kernel: tuple, lengths_B, prompt_mask_BxP, *, samples: int, group: int,
                     fast: bool, epochs: int, reference: bool, reward: float, loss: float) -> dict:
    """One reftjax iteration's record from its phase boundaries: `wall`/`kernel` are the (start, after rollout,
    after experience, after update) clock readings, `lengths_B` each row's generated tokens (incl. EOS, no padding),
    `prompt_mask_BxP` the left-padded prompts' real tokens."""
    import numpy as np

    t0, t1, t2, t3 = wall
    c0, c1, c2, c3 = kernel
    gen = np.asarray(lengths_B)
    prompt = np.asarray(prompt_mask_BxP).sum(axis=1)
    # model FLOPs as executed: the rollout prefills each prompt once for its samples; with share_prompt the
    # experience and update forwards also run each prompt once per group
    return {"iter_s": t3 - t0, "rollout_s": t1 - t0, "experience_s": t2 - t1, "update_s": t3 - t2,
            "rollout_sys_s": c1 - c0, "experience_sys_s": c2 - c1, "update_sys_s": c3 - c2,
            "gen_tokens": int(gen.sum()),
            "flops": rl_iteration_flops(model_cfg, prompt, gen, samples, group, fast, epochs, reference=reference),
            "update_flops": model_flops(model_cfg, prompt, gen, group) * 3 * epochs,  # forward + backward an epoch
            "reward": reward, "loss": loss}


def trl_step_counts(model_cfg, prompt_lens, completion_ids) -> dict:
    """One TRL step's generated tokens (its completion ids: up to and incl. EOS) and model FLOPs (generation 1x,
    training 3x; the gradient-checkpointing recompute not counted)."""
    gens = [len(c) for c in completion_ids]
    return {"gen_tokens": sum(gens), "flops": model_flops(model_cfg, prompt_lens, gens) * (1 + 3)}


class ReftjaxRL:
    """One algorithm's state and jitted pieces; `iteration()` runs and times one RL iteration."""

    def __init__(self, algo: str, model, prompt_tokens, prompt_mask, reward_fn, args):
        import jax
        import jax.numpy as jnp

        from reftjax.models import init_value_head
        from reftjax.rollout import SamplingConfig
        from reftjax.steps import (OptimConfig, PPOConfig, init_state, make_experience_fn, make_optimizer,
                                   make_ppo_step)

        self.algo, self.cfg = algo, model.config
        fast, share = args.experience_from_rollout, args.share_prompt
        if algo == "ppo":
            rl = PPOConfig(algo="ppo", minibatch_size=args.minibatch or None, ppo_epochs=2,
                           experience_from_rollout=fast, group_size=args.samples if share else 1, share_prompt=share)
        else:
            rl = PPOConfig(algo=algo, group_size=args.samples, minibatch_size=8, ppo_epochs=1, kl_coef=args.grpo_kl,
                           experience_from_rollout=fast, share_prompt=share)
        self.epochs, self.fast, self.group, self.reference = rl.ppo_epochs, fast, rl.prompt_group, rl.kl_coef > 0
        self.samples = args.samples
        self.sampling = SamplingConfig(n=args.samples, max_new_tokens=args.new_tokens, temperature=1.0,
                                       eos_ids=(2,), pad_id=2)
        params = {"policy": jax.tree.map(jnp.copy, model.params)}
        if algo == "ppo":
            params["value_head"] = init_value_head(self.cfg, jax.random.key(1))
        tx = make_optimizer(OptimConfig(learning_rate=3e-6, schedule="constant", warmup_ratio=0.0), 1000)
        self.state = init_state(params, tx, jax.random.key(2))
        self.ref = model.params
        self.exp_fn = make_experience_fn(self.cfg, rl, reward_fn)
        self.ppo_step = make_ppo_step(self.cfg, tx, rl)
        self.prompt_tokens, self.prompt_mask = jnp.asarray(prompt_tokens), jnp.asarray(prompt_mask)
        self.idx = jnp.repeat(jnp.arange(prompt_tokens.shape[0], dtype=jnp.int32), args.samples)
        self.rng = jax.random.key(3)
        self.records: list[dict] = []

    def iteration(self) -> dict:
        import jax
        import numpy as np

        from reftjax.rollout import completion_buckets, rollout, trim_to_bucket

        self.rng, key = jax.random.split(self.rng)
        c0 = _sys_s()
        t0 = time.perf_counter()
        ro = rollout(self.state.params["policy"], self.prompt_tokens, self.prompt_mask, key,
                     model_cfg=self.cfg, cfg=self.sampling,
                     value_head=self.state.params.get("value_head") if self.fast else None)
        jax.block_until_ready(ro)
        ro = trim_to_bucket(ro, completion_buckets(self.sampling.max_new_tokens, 4))  # as the training loop does
        t1, c1 = time.perf_counter(), _sys_s()
        exp, em = self.exp_fn(self.state.params, self.ref, ro, self.idx)
        jax.block_until_ready(exp)
        t2, c2 = time.perf_counter(), _sys_s()
        self.state, m = self.ppo_step(self.state, exp)
        jax.block_until_ready(m)
        t3, c3 = time.perf_counter(), _sys_s()
        rec = iteration_record(self.cfg, (t0, t1, t2, t3), (c0, c1, c2, c3), np.asarray(ro.lengths_B),
                               np.asarray(ro.prompt_mask_BxP), samples=self.samples, group=self.group,
                               fast=self.fast, epochs=self.epochs, reference=self.reference,
                               reward=float(em["reward"]), loss=float(m["loss"]))
        self.records.append(rec)
        print(f"[{self.algo}] {json.dumps({k: round(v, 2) for k, v in rec.items()})}", file=sys.stderr)
        return rec


class TrlRunner:
    """TRL GRPOTrainer on the same model/data; each step timed by a callback that then calls `between`."""

    def __init__(self, prompts, items, grader, model_cfg, args, between):
        import torch
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
        from trl import GRPOConfig, GRPOTrainer

        from reftjax.hf import local_hf_dir

        hf_dir = local_hf_dir("default")
        tokenizer = AutoTokenizer.from_pretrained(hf_dir)
        tokenizer.padding_side = "left"
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        records, step = [], {}

        def reward(prompts, completions, completion_ids, answer_value, **_):
            grades = grader.grade_batch([{"answer_value": a} for a in answer_value], completions)
            prompt_lens = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
            step.update(trl_step_counts(model_cfg, prompt_lens, completion_ids))
            return [g.score for g in grades]

        class Timer(TrainerCallback):
            def on_step_begin(self, *_, **__):
                step.clear()
                self.t0, self.c0 = time.perf_counter(), _sys_s()

            def on_step_end(self, *_, **__):
                dt = time.perf_counter() - self.t0
                records.append({"iter_s": dt, "sys_s": _sys_s() - self.c0, **step})
                print(f"[trl] iter_s={dt:.2f} gen_tokens={step.get('gen_tokens')}", file=sys.stderr)
                if len(records) > 1:  # after TRL's warm-up step, straight to its first timed one
                    between()

        n_rows = args.prompts * args.samples
        cfg = GRPOConfig(
            output_dir=tempfile.mkdtemp(prefix="trl_bench_"), per_device_train_batch_size=n_rows,
            num_generations=args.samples, max_completion_length=args.new_tokens, temperature=1.0,
            beta=args.trl_beta, learning_rate=3e-6, use_cpu=True, bf16=False, max_steps=1 + args.repeats,
            logging_steps=1, report_to="none", save_strategy="no", shuffle_dataset=False, seed=0)
        ds = Dataset.from_list([{"prompt": p, "answer_value": it["answer_value"]} for p, it in zip(prompts, items)])
        self.trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=ds,
                                   processing_class=tokenizer, callbacks=[Timer()])
        self.records = records

    def run(self):
        self.trainer.train()


def _tokens_per_s(records: list[dict]) -> float:
    """Generated tokens over seconds, both summed over the steady iterations (the first is the warm-up)."""
    steady = records[1:]
    return sum(r["gen_tokens"] for r in steady) / sum(r["iter_s"] for r in steady)


def _summary(prefix: str, records: list[dict], peak: float, extra_keys=()) -> dict:
    steady = records[1:]
    med = lambda k: statistics.median(r[k] for r in steady)  # noqa: E731
    it = med("iter_s")
    out = {f"{prefix}_iter_s": round(it, 2), f"{prefix}_tokens_per_s": round(_tokens_per_s(records), 1),
           f"{prefix}_gen_tokens_mean": round(statistics.mean(r["gen_tokens"] for r in steady), 1),
           f"{prefix}_first_iter_s": round(records[0]["iter_s"], 1),
           f"{prefix}_mfu": round(statistics.median(r["flops"] / r["iter_s"] for r in steady) / peak, 3),
           f"{prefix}_iters": [round(r["iter_s"], 2) for r in steady]}
    for k in extra_keys:
        out[f"{prefix}_{k}"] = round(med(k), 2)
    return out


def _algo_figures(algo: str, records: list[dict], peak: float) -> dict:
    """A reftjax algorithm's keys: `_summary` with the phase times, `<algo>_compile_s`, `<algo>_reward_mean`."""
    phases = ("rollout", "experience", "update")
    out = _summary(algo, records, peak, [f"{p}_s" for p in phases] + [f"{p}_sys_s" for p in phases])
    # first iteration minus a steady one: compiling the rollout, experience and update programs
    out[f"{algo}_compile_s"] = round(records[0]["iter_s"] - statistics.median(r["iter_s"] for r in records[1:]), 1)
    out[f"{algo}_reward_mean"] = round(statistics.mean(r["reward"] for r in records), 3)
    # the update at MFU 1: no faster update is possible at this peak (the FLOP count of `model_flops`)
    out[f"{algo}_update_floor_s"] = round(statistics.median(r["update_flops"] for r in records[1:]) / peak, 2)
    return out


def _trl_ratios(records: dict[str, list[dict]], trl_records: list[dict]) -> dict:
    """`ratio_vs_trl` (ppo) and `ratio_<algo>_vs_trl`: each algorithm's tokens/s over TRL's, from the records (not
    the summary's tokens/s, which are rounded to 0.1: at 10 tokens/s that alone moves a ratio by up to 1%)."""
    trl = _tokens_per_s(trl_records)
    return {("ratio_vs_trl" if a == "ppo" else f"ratio_{a}_vs_trl"): round(_tokens_per_s(r) / trl, 2)
            for a, r in records.items()}


def _budgets_at_3x_trl(records: dict[str, list[dict]], trl_records: list[dict]) -> dict:
    """`<algo>_iter_s_at_3x_trl`: the seconds one iteration of the algorithm's mean steady generated tokens may
    take to run at 3x TRL's tokens/s (#6 point 5's target); compare with `<algo>_update_floor_s`."""
    trl = _tokens_per_s(trl_records)
    return {f"{a}_iter_s_at_3x_trl": round(statistics.mean(x["gen_tokens"] for x in r[1:]) / (3 * trl), 2)
            for a, r in records.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2, help="timed iterations per contender (after warm-up)")
    ap.add_argument("--algos", default="ppo,grpo")
    ap.add_argument("--no-trl", action="store_true")
    ap.add_argument("--experience-from-rollout", action="store_true",
                    help="PPOConfig.experience_from_rollout: logp_old/values from the rollout, no policy forward")
    ap.add_argument("--share-prompt", action="store_true",
                    help="PPOConfig.share_prompt: each prompt runs once per group of samples in experience/update")
    ap.add_argument("--minibatch", type=int, default=8,
                    help="PPO rows per optimizer update (0: the whole rollout batch, one update per epoch)")
    ap.add_argument("--trl-beta", type=float, default=0.0)
    ap.add_argument("--grpo-kl", type=float, default=0.04,
                    help="reftjax GRPO/RLOO's kl_coef (0: no reference forward, as TRL's default beta 0)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--data", type=pathlib.Path, default=DATA, help="GSM8K train.jsonl (default ../shared/data/gsm8k)")
    args = ap.parse_args()
    unknown = set(args.algos.split(",")) - {"ppo", "grpo", "rloo"}
    if unknown:  # (any other name ran GRPO under that name)
        ap.error(f"--algos: {sorted(unknown)} not among ppo, grpo, rloo")
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")

    import jax

    from reftjax.graders import ReftGrader
    from reftjax.graders.callback import make_reward_fn
    from reftjax.hf import load_model
    from reftjax.metrics import measured_peak_flops
    from reftjax.rollout import bucket, encode_prompts, left_pad

    prompts, items = read_problems(args.prompts, args.data)
    model = load_model("default")
    tok = model.tokenizer
    ids = encode_prompts(tok, prompts, chat=False)
    p_len = bucket(max(map(len, ids)), (64, 128, 256, 512))
    prompt_tokens, prompt_mask = left_pad(ids, p_len, pad_id=2)
    grader = ReftGrader(cot="nl")
    reward_fn = make_reward_fn(grader, items, tok)
    peak = measured_peak_flops()
    algos = [ReftjaxRL(a, model, prompt_tokens, prompt_mask, reward_fn, args) for a in args.algos.split(",")]
    for a in algos:
        a.iteration()  # compile + warm-up

    def reftjax_round():
        for a in algos:
            a.iteration()

    trl = None
    if args.no_trl:
        for _ in range(args.repeats):
            reftjax_round()
    else:
        import torch

        torch.set_num_threads(args.threads)
        trl = TrlRunner(prompts, items, grader, model.config, args, reftjax_round)
        trl.run()  # warm-up step, then `repeats` timed steps each followed by one round of reftjax iterations

    peak_first, peak = peak, measured_peak_flops(remeasure=True)  # the faster of before and after the contenders
    out = {"bench": "ppo_iteration", "host_allocator": HOST_ALLOCATOR, "model": "SmolLM2-135M-Instruct",
           "dtype": "float32", "device": "cpu",
           "prompts": args.prompts, "samples": args.samples, "max_new_tokens": args.new_tokens,
           "prompt_bucket": p_len, "peak_gflops": round(peak / 1e9, 1),
           "peak_gflops_first": round(peak_first / 1e9, 1),
           "experience_from_rollout": args.experience_from_rollout, "share_prompt": args.share_prompt,
           "grpo_kl": args.grpo_kl}
    for a in algos:
        out.update(_algo_figures(a.algo, a.records, peak))
    if trl is not None:
        out.update(_summary("trl", trl.records, peak, ("sys_s",)))
        out["trl_beta"] = args.trl_beta
        # TRL's default: it recomputes the forward in the backward (not counted in its MFU); reftjax runs remat "none"
        out["trl_gradient_checkpointing"] = bool(trl.trainer.args.gradient_checkpointing)
        out.update(_trl_ratios({a.algo: a.records for a in algos}, trl.records))
        out.update(_budgets_at_3x_trl({a.algo: a.records for a in algos}, trl.records))
    out["jax"] = jax.__version__
    out["load_avg_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps({**out, "cpu": cpu_description()}))


if __name__ == "__main__":
    main()
