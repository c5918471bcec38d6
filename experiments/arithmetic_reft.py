"""ReFT vs continued SFT at laptop scale, on procedurally generated arithmetic word problems.

    python -m experiments.arithmetic_reft [--quick] [--out DIR] [--seeds 0 1 2]

Per seed, from one random-init tiny Llama (reftjax.models): an SFT warm-up that stops
at the first validation check reaching 80% (a modest accuracy, leaving headroom; every
seed starts its arms from about the same point), then from that same checkpoint and the
same training problems, with the same number of training samples each:

  * ``sft``:  more SFT (fresh AdamW, constant lr);
  * ``reft``: PPO against the ReFT answer grader (1 correct, 0.1 well-formed wrong,
    0 unextractable), temperature-1 sampling, KL 0.05 to the warm-up, gamma 1,
    clip 0.2, vf_coef 5, 2 PPO epochs, value head on the policy's last hidden state;
    scaled for a 115k-parameter model (chosen on validation, see BUILD_NOTES): GAE
    lambda 1.0 (ReFT 0.95), the critic's lr 30x the policy's, and its loss stopped at the
    shared backbone (ReFT lets it train the backbone);
  * ``grpo``: critic-free, group-relative advantages (4 samples per prompt).

The default task gives every training problem one gold CoT whose operations come in a
random valid order (``cot_order="random"``): several traces reach the answer, as in
GSM8K, which the ReFT paper credits for RL's gain over SFT.

Held-out accuracy (greedy) is measured on validation and test at fixed sample
counts; each arm's reported checkpoint is the one with the best *validation*
accuracy, whose test and harder-split (one more step) accuracies are reported.
Writes ``results.json``, ``results.md`` and ``curves.png`` to ``--out``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

from experiments import arithmetic_task as task

ARMS = ("sft", "reft", "grpo")


@dataclasses.dataclass(frozen=True)
class ExpConfig:
    """Everything one run of the experiment depends on.

    Attributes:
      hidden, layers, ffn, heads: the decoder's size (tied embeddings).
      n_train, n_val, n_test, n_hard: problems per split.
      warmup_samples, warmup_lr: SFT warm-up length (in samples) and peak lr (linear decay, 10% warm-up).
      warmup_target, warmup_check_every: if warmup_target > 0, the warm-up also checks validation accuracy
        every `warmup_check_every` samples and stops at the first check that reaches the target
        (`warmup_samples` is then the cap and sets the lr schedule), so every seed starts its arms
        from a similar accuracy ("a modest accuracy") instead of wherever a fixed budget left it.
      arm_samples: training samples given to every continuation arm.
      eval_every: evaluate held-out accuracy every this many samples.
      batch_size: SFT batch (small batches: many more updates per CPU second for a tiny model).
      rl_batch: RL rollout batch (prompts x samples per prompt).
      sft_lr, ppo_lr, grpo_lr: constant learning rates of the continuations (tuned on validation).
      minibatch_size: PPO/GRPO minibatch (rows).
      kl_coef: PPO k1 reward penalty / GRPO k3 loss weight.
      grpo_group: samples per prompt for GRPO.
      max_new_tokens: completion budget when sampling for RL (eval uses `eval_new_tokens`).
      arms: which continuations to run.
      guards: apply the reward-hacking guards to RL rewards.
      value_grad_to_backbone: PPO's value loss also trains the shared backbone (ReFT: true).
      value_lr_scale: the PPO value head's lr is ppo_lr times this (ReFT: 1).
      gae_lambda: PPO's GAE lambda (ReFT: 0.95).
      critic_warmup_samples: PPO's first samples train only the critic (policy frozen); they count
        towards `arm_samples` (ReFT: 0).
      critic: PPO's critic trunk, "shared" with the policy (ReFT) or "separate" (its own copy of the
        warm-up backbone, trained only by the value loss; `PPOConfig.critic`).
      max_steps, operand_digits, max_distractors, mul_prob, cot_order: task difficulty
        (`arithmetic_task.TaskConfig`; training problems have 2..max_steps operations,
        the hard split max_steps + 1; cot_order "random": several valid traces per problem).
    """

    hidden: int = 64
    layers: int = 2
    ffn: int = 192
    heads: int = 4
    n_train: int = 2000
    n_val: int = 500
    n_test: int = 400
    n_hard: int = 200
    warmup_samples: int = 57600
    warmup_lr: float = 3e-3
    warmup_target: float = 0.8
    warmup_check_every: int = 2400
    arm_samples: int = 24576
    eval_every: int = 3072
    batch_size: int = 16
    rl_batch: int = 128
    sft_lr: float = 1e-4
    ppo_lr: float = 1e-4
    grpo_lr: float = 1e-4
    minibatch_size: int = 32
    kl_coef: float = 0.05
    grpo_group: int = 4
    max_new_tokens: int = 48
    eval_new_tokens: int = 56
    arms: tuple[str, ...] = ARMS
    guards: bool = True
    value_grad_to_backbone: bool = False
    value_lr_scale: float = 30.0
    gae_lambda: float = 1.0
    critic_warmup_samples: int = 0
    critic: str = "shared"
    max_steps: int = 3
    operand_digits: int = 1
    max_distractors: int = 1
    mul_prob: float = 0.0
    cot_order: str = "random"

    def task_config(self) -> task.TaskConfig:
        return task.TaskConfig(min_steps=2, max_steps=self.max_steps, max_distractors=self.max_distractors,
                               mul_prob=self.mul_prob, operand_digits=self.operand_digits,
                               cot_order=self.cot_order)

    def __post_init__(self):
        if set(self.arms) - set(ARMS):
            raise ValueError(f"arms {self.arms} not all in {ARMS}")
        if self.arm_samples % self.eval_every or self.eval_every % self.batch_size or self.eval_every % self.rl_batch:
            raise ValueError("eval_every must divide arm_samples and be a multiple of batch_size and rl_batch")
        if self.warmup_target and (self.warmup_check_every <= 0 or self.warmup_check_every % self.batch_size):
            raise ValueError("warmup_check_every must be a positive multiple of batch_size")
        if self.critic_warmup_samples % self.rl_batch or self.critic_warmup_samples >= self.arm_samples:
            raise ValueError("critic_warmup_samples must be a multiple of rl_batch and below arm_samples")
        if self.rl_batch % self.minibatch_size or self.rl_batch % self.grpo_group:
            raise ValueError("rl_batch must be a multiple of minibatch_size and grpo_group")
        self.task_config()  # validates the task fields
        # the PPO/GRPO settings an RL arm builds (Runner.rl_steps), checked now: a typo (--critic sepraate,
        # --grpo-group 1) failed only when the arm started, after the warm-up and the SFT arm, with nothing saved
        from reftjax.steps import PPOConfig

        if "reft" in self.arms:
            PPOConfig(algo="ppo", kl_coef=self.kl_coef, minibatch_size=self.minibatch_size, gae_lambda=self.gae_lambda,
                      critic=self.critic, value_grad_to_backbone=self.value_grad_to_backbone)
        if set(self.arms) & {"grpo", "rloo"}:
            PPOConfig(algo="grpo", kl_coef=self.kl_coef, minibatch_size=self.minibatch_size,
                      group_size=self.grpo_group)


QUICK = dict(n_train=256, n_val=64, n_test=64, n_hard=64, warmup_samples=256, warmup_check_every=128,
             arm_samples=64, eval_every=32,
             batch_size=16, rl_batch=16, minibatch_size=8, hidden=32, layers=1, ffn=64)


@dataclasses.dataclass(frozen=True)
class Data:
    """Tokenized splits: RL/eval prompts (left-padded) and SFT rows (right-padded) as NumPy arrays."""

    problems: dict
    prompts: dict  # split -> (tokens [N, P], mask [N, P])
    sft: dict  # tokens / attn_mask / loss_mask [N_train, T]


def build_data(cfg: ExpConfig, tokenizer) -> Data:
    """Generates the splits (fixed generator seed: every model seed sees the same data) and encodes them."""
    problems = task.make_splits(cfg.task_config(), cfg.n_train, cfg.n_val, cfg.n_test, cfg.n_hard, seed=0)
    enc = {k: task.encode(tokenizer, [task.prompt_text(p) for p in v]) for k, v in problems.items()}
    p_len = -(-max(len(r) for v in enc.values() for r in v) // 8) * 8
    prompts = {}
    for k, rows in enc.items():
        tok, mask = np.zeros((len(rows), p_len), np.int32), np.zeros((len(rows), p_len), np.int32)
        for i, r in enumerate(rows):
            tok[i, p_len - len(r):], mask[i, p_len - len(r):] = r, 1
        prompts[k] = (tok, mask)
    targets = task.encode(tokenizer, [task.target_text(p) for p in problems["train"]])
    # the gold traces must fit the sampling budgets: --max-steps / --operand-digits lengthen them, and an answer
    # that cannot fit is scored 0 (RL: also flagged too_long) without a word
    for split, budget, name in (("train", cfg.max_new_tokens, "max_new_tokens"),
                                *((k, cfg.eval_new_tokens, "eval_new_tokens") for k in problems if k != "train")):
        gold = task.encode(tokenizer, [task.target_text(p) for p in problems[split]])
        longest = max(len(t) for t in gold) + 1  # + EOS
        if longest > budget:
            raise ValueError(f"the {split} split's longest gold trace is {longest} tokens (with EOS), over {name}="
                             f"{budget}: raise it for these task settings (--max-steps {cfg.max_steps}, "
                             f"--operand-digits {cfg.operand_digits})")
    seqs = [p + t + [tokenizer.eos_token_id] for p, t in zip(enc["train"], targets)]
    t_len = -(-max(len(s) for s in seqs) // 8) * 8
    sft = {k: np.zeros((len(seqs), t_len), np.int32) for k in ("tokens", "attn_mask", "loss_mask")}
    for i, (p, s) in enumerate(zip(enc["train"], seqs)):
        sft["tokens"][i, :len(s)], sft["attn_mask"][i, :len(s)], sft["loss_mask"][i, len(p):len(s)] = s, 1, 1
    return Data(problems, prompts, sft)


class Runner:
    """Holds the compiled steps shared by every seed and arm (one compile per shape per process)."""

    def __init__(self, cfg: ExpConfig, data: Data, tokenizer):
        import jax

        from reftjax.graders import ReftGrader
        from reftjax.graders.guards import GuardConfig
        from reftjax.models import ModelConfig
        from reftjax.rollout import SamplingConfig

        self.cfg, self.data, self.tok = cfg, data, tokenizer
        self.model_cfg = ModelConfig(
            vocab_size=len(tokenizer), hidden_size=cfg.hidden, intermediate_size=cfg.ffn, num_layers=cfg.layers,
            num_heads=cfg.heads, num_kv_heads=cfg.heads, max_position_embeddings=256, tie_word_embeddings=True,
            eos_token_ids=(tokenizer.eos_token_id,), pad_token_id=tokenizer.pad_token_id)
        eos, pad = (tokenizer.eos_token_id,), tokenizer.pad_token_id
        self.greedy = SamplingConfig(max_new_tokens=cfg.eval_new_tokens, greedy=True, eos_ids=eos, pad_id=pad)
        self.sample = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=1.0, eos_ids=eos, pad_id=pad)
        self.grader = ReftGrader(cot="nl")
        # The gold CoT of a 2-step problem has ~16 non-space characters before the marker: the
        # authors' 20 would zero correct answers, so only a bare answer (< 5) is flagged.
        self.guard_cfg = GuardConfig(max_tokens=cfg.max_new_tokens, min_reasoning_chars=5) if cfg.guards else None
        self.guard_totals: dict[str, int] = {}
        self._steps: dict = {}
        self.jax = jax

    # ------------------------------------------------------------------ evaluation
    def decode(self, tokens, lengths) -> list[str]:
        tokens, lengths = np.asarray(tokens), np.asarray(lengths)
        return self.tok.batch_decode([tokens[i, :lengths[i]].tolist() for i in range(len(lengths))],
                                     skip_special_tokens=True)

    def accuracy(self, policy, split: str, batch: int = 200) -> float:
        """Greedy top-1 accuracy on a split (rows padded to a fixed batch: one compile)."""
        from reftjax.rollout import rollout

        tok, mask = self.data.prompts[split]
        items, correct = self.data.problems[split], 0
        batch = min(batch, len(items))
        for s in range(0, len(items), batch):
            t, m = tok[s:s + batch], mask[s:s + batch]
            n = len(t)
            if n < batch:
                t = np.concatenate([t, np.repeat(t[:1], batch - n, 0)])
                m = np.concatenate([m, np.repeat(m[:1], batch - n, 0)])
            r = rollout(policy, t, m, self.jax.random.key(0), model_cfg=self.model_cfg, cfg=self.greedy)
            texts = self.decode(r.tokens_BxN, r.lengths_B)[:n]
            correct += sum(g.score >= 1.0 for g in self.grader.grade_batch(items[s:s + n], texts))
        return correct / len(items)

    # ------------------------------------------------------------------ rewards
    def scores(self, idx: np.ndarray, r) -> tuple[np.ndarray, dict]:
        """ReFT grader scores of a rollout (+ guards); also reward-hacking diagnostics."""
        from reftjax.graders.guards import apply_guards

        texts = self.decode(r.tokens_BxN, r.lengths_B)
        items = [self.data.problems["train"][i] for i in idx]
        grades = self.grader.grade_batch(items, texts)
        raw = np.array([g.score for g in grades], np.float32)
        if self.guard_cfg is not None:
            grades, counts = apply_guards(self.guard_cfg, texts, np.asarray(r.lengths_B), grades,
                                          answer_in_text=self.grader.answer_in_text)
            for k, v in counts.items():
                self.guard_totals[k] = self.guard_totals.get(k, 0) + v
        out = np.array([g.score for g in grades], np.float32)
        return out, {"reward_raw": float(raw.mean()), "correct": float((raw >= 1).mean()),
                     "extracted": float((raw > 0).mean()), "length": float(np.asarray(r.lengths_B).mean())}

    # ------------------------------------------------------------------ training
    def copy(self, tree):
        return self.jax.tree.map(lambda x: x.copy(), tree)

    def sft_step(self, lr: float, schedule: str, total: int):
        from reftjax.steps import OptimConfig, make_optimizer, make_sft_step

        key = ("sft", lr, schedule, total)
        if key not in self._steps:
            ocfg = OptimConfig(learning_rate=lr, schedule=schedule, warmup_ratio=0.1 if schedule != "constant" else 0.0)
            tx = make_optimizer(ocfg, total)
            self._steps[key] = (tx, make_sft_step(self.model_cfg, tx))
        return self._steps[key]

    def rl_steps(self, algo: str, lr: float, critic_only: bool = False):
        from reftjax.steps import OptimConfig, PPOConfig, make_experience_fn, make_optimizer, make_ppo_step

        key = (algo, lr, critic_only)
        if key not in self._steps:
            group = self.cfg.grpo_group if algo != "ppo" else 1
            pcfg = PPOConfig(algo=algo, kl_coef=self.cfg.kl_coef, minibatch_size=self.cfg.minibatch_size,
                             group_size=group, value_grad_to_backbone=self.cfg.value_grad_to_backbone,
                             gae_lambda=self.cfg.gae_lambda, critic_only=critic_only,
                             critic=self.cfg.critic if algo == "ppo" else "shared")
            tx = make_optimizer(OptimConfig(learning_rate=lr, schedule="constant", warmup_ratio=0.0,
                                            value_head_lr_scale=self.cfg.value_lr_scale), 1,
                                separate_critic_state=algo == "ppo" and self.cfg.critic_warmup_samples > 0)
            self._steps[key] = (tx, pcfg, make_experience_fn(self.model_cfg, pcfg),
                                make_ppo_step(self.model_cfg, tx, pcfg))
        return self._steps[key]


def sample_order(seed: int, n: int):
    """Endless stream of training-example indices, reshuffled every epoch."""
    rng = np.random.default_rng(seed)
    while True:
        yield from rng.permutation(n)


def take(stream, k: int) -> np.ndarray:
    return np.fromiter((next(stream) for _ in range(k)), np.int64, k)


class Tracker:
    """Held-out accuracy curve of one arm; keeps the parameters with the best validation accuracy."""

    def __init__(self, runner: Runner, start: dict, warm_params):
        self.runner, self.curve = runner, [start]
        self.best, self.best_params = start, warm_params

    def __call__(self, samples: int, policy, train_stats: dict):
        val, test = self.runner.accuracy(policy, "val"), self.runner.accuracy(policy, "test")
        point = {"samples": samples, "val": val, "test": test, **train_stats}
        self.curve.append(point)
        print(f"    {samples:6d} samples  val {val:.3f}  test {test:.3f}  "
              + "  ".join(f"{k} {v:.3f}" for k, v in train_stats.items()), flush=True)
        if val > self.best["val"]:  # ties keep the earlier checkpoint
            self.best, self.best_params = point, self.runner.copy(policy)


def train_sft(runner: Runner, policy, n_samples: int, lr: float, schedule: str, seed: int,
              on_eval=None, eval_every: int = 0):
    """SFT for `n_samples` samples from `policy`; returns (final policy params, samples trained).

    `on_eval(samples, policy, stats)` runs every `eval_every` samples; a truthy return stops training there.
    """
    import jax

    from reftjax.steps import init_state

    cfg, sft = runner.cfg, runner.data.sft
    steps = n_samples // cfg.batch_size
    tx, step = runner.sft_step(lr, schedule, steps)
    state = init_state({"policy": runner.copy(policy)}, tx, jax.random.key(seed))
    order, losses = sample_order(seed, len(sft["tokens"])), []
    for i in range(steps):
        rows = take(order, cfg.batch_size)
        state, m = step(state, {k: v[rows] for k, v in sft.items()})
        losses.append(m["loss"])
        done = (i + 1) * cfg.batch_size
        if on_eval is not None and done % eval_every == 0:
            stop = on_eval(done, state.params["policy"], {"loss": float(np.mean(jax.device_get(losses)))})
            losses = []
            if stop:
                return state.params["policy"], done
    return state.params["policy"], steps * cfg.batch_size


def train_rl(runner: Runner, warm, algo: str, lr: float, seed: int, on_eval):
    """PPO (ReFT) or GRPO from the warm-up for `cfg.arm_samples` sampled completions."""
    import jax

    from reftjax.rollout import rollout
    from reftjax.steps import init_rl_params, init_state

    cfg = runner.cfg
    tx, pcfg, exp_fn, ppo_step = runner.rl_steps(algo, lr)
    group = pcfg.group_size
    scfg = dataclasses.replace(runner.sample, n=group)
    params = init_rl_params(runner.copy(warm), runner.model_cfg, pcfg, jax.random.key(seed + 1000))
    state = init_state(params, tx, jax.random.key(seed))
    tok, mask = runner.data.prompts["train"]
    order, stats = sample_order(seed, len(tok)), []
    for it in range(cfg.arm_samples // cfg.rl_batch):
        prompts = take(order, cfg.rl_batch // group)
        r = rollout(state.params["policy"], tok[prompts], mask[prompts], jax.random.fold_in(state.rng, it),
                    model_cfg=runner.model_cfg, cfg=scfg)
        idx = np.repeat(prompts, group)
        scores, diag = runner.scores(idx, r)
        exp, em = exp_fn(state.params, warm, r, jax.numpy.asarray(idx, jax.numpy.int32), scores)
        if algo == "ppo" and (it + 1) * cfg.rl_batch <= cfg.critic_warmup_samples:  # same tx: one optimizer state
            state, m = runner.rl_steps(algo, lr, critic_only=True)[3](state, exp)
        else:
            state, m = ppo_step(state, exp)
        stats.append({**diag, "reward": float(em["reward"]), "kl": float(em["kl"]),
                      **({"value_ev": float(em["value_explained_variance"])} if algo == "ppo" else {})})
        done = (it + 1) * cfg.rl_batch
        if done % cfg.eval_every == 0:
            on_eval(done, state.params["policy"], {k: float(np.mean([s[k] for s in stats])) for k in stats[0]})
            stats = []


# The arms' data order and RL key: seed + 1 was the next seed's warm-up order and model-init key (correlated seeds).
ARM_SEED = 10_000


def run_seed(runner: Runner, seed: int) -> dict:
    """Warm-up, then every arm from the warm-up; per-arm curve and validation-selected accuracies."""
    import jax

    from reftjax.models import init_params

    cfg, out = runner.cfg, {}
    t0 = time.time()
    init = init_params(runner.model_cfg, jax.random.key(seed))

    def reached(samples, policy, stats):  # validation only: the test split is not read here
        val = runner.accuracy(policy, "val")
        print(f"    warm-up {samples:6d} samples  val {val:.3f}  loss {stats['loss']:.3f}", flush=True)
        return val >= cfg.warmup_target

    warm, used = train_sft(runner, init, cfg.warmup_samples, cfg.warmup_lr, "linear", seed,
                           reached if cfg.warmup_target > 0 else None, cfg.warmup_check_every)
    start = {"samples": 0, "val": runner.accuracy(warm, "val"), "test": runner.accuracy(warm, "test")}
    out["warmup"] = {**start, "hard": runner.accuracy(warm, "hard"), "seconds": time.time() - t0,
                     "warmup_samples": used}
    print(f"  seed {seed} warm-up ({used} samples): val {start['val']:.3f} test {start['test']:.3f} "
          f"hard {out['warmup']['hard']:.3f} ({out['warmup']['seconds']:.0f}s)", flush=True)
    for arm in cfg.arms:
        t0 = time.time()
        print(f"  seed {seed} arm {arm}", flush=True)
        track = Tracker(runner, start, warm)
        if arm == "sft":
            train_sft(runner, warm, cfg.arm_samples, cfg.sft_lr, "constant", ARM_SEED + seed, track, cfg.eval_every)
        else:
            lr = cfg.ppo_lr if arm == "reft" else cfg.grpo_lr
            train_rl(runner, warm, "ppo" if arm == "reft" else "grpo", lr, ARM_SEED + seed, track)
        out[arm] = {"val": track.best["val"], "test": track.best["test"], "samples": track.best["samples"],
                    "hard": runner.accuracy(track.best_params, "hard"), "curve": track.curve,
                    "seconds": time.time() - t0}
    return out


def summarize(per_seed: list[dict], cfg: ExpConfig) -> str:
    """The results table (mean ± std over seeds, per-seed values) as Markdown."""
    rows = [("warm-up (SFT)", "warmup")] + [(n, k) for n, k in (("+SFT", "sft"), ("+ReFT (PPO)", "reft"),
                                                                 ("+GRPO", "grpo")) if k in cfg.arms]
    lines = ["| model | val | test | hard (+1 step) | test per seed | samples (warm-up) / chosen at |",
             "|---|---|---|---|---|---|"]
    fmt = lambda v: f"{100 * np.mean(v):.1f} ± {100 * np.std(v):.1f}"  # noqa: E731
    for name, k in rows:
        vals = {m: [s[k][m] for s in per_seed] for m in ("val", "test", "hard")}
        chosen = ", ".join(str(s[k]["warmup_samples" if k == "warmup" else "samples"]) for s in per_seed)
        lines.append(f"| {name} | {fmt(vals['val'])} | {fmt(vals['test'])} | {fmt(vals['hard'])} | "
                     + ", ".join(f"{100 * v:.1f}" for v in vals["test"]) + f" | {chosen} |")
    lines.append("")
    lines.append("Accuracy in % (greedy), mean ± std (population) over seeds; each arm's checkpoint is the one "
                 "with the best validation accuracy (the warm-up itself included).")
    for arm, name in (("reft", "ReFT"), ("grpo", "GRPO")):
        if {"sft", arm} <= set(cfg.arms):
            diff = [100 * (s[arm]["test"] - s["sft"]["test"]) for s in per_seed]
            lines.append(f"{name} - SFT on test per seed: {', '.join(f'{d:+.1f}' for d in diff)} "
                         f"(mean {np.mean(diff):+.1f}).")
    return "\n".join(lines)


def plot(per_seed: list[dict], cfg: ExpConfig, path: pathlib.Path) -> None:
    """Held-out (validation and test) accuracy vs training samples, mean ± std band over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, split in zip(axes, ("val", "test")):
        for arm in cfg.arms:
            x = [p["samples"] for p in per_seed[0][arm]["curve"]]
            ys = np.array([[p[split] for p in s[arm]["curve"]] for s in per_seed]) * 100
            ax.plot(x, ys.mean(0), marker="o", label=arm)
            ax.fill_between(x, ys.mean(0) - ys.std(0), ys.mean(0) + ys.std(0), alpha=0.2)
        ax.set_title(f"{split} accuracy ({len(per_seed)} seeds)")
        ax.set_xlabel("training samples after warm-up")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("greedy accuracy (%)")
    axes[0].legend()
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=100), binary=True)
    plt.close(fig)


def write_atomic(path: pathlib.Path, write, binary: bool = False) -> None:
    """Write through a temp file in the same folder, then rename (never leaves half a file)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "wb" if binary else "w") as f:
        write(f)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600
    os.replace(tmp, path)


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def seed_arg(text: str) -> int:
    """argparse type of the experiments' --seed / --seeds: an integer from 0 to 2**31 - 1. They add offsets to it
    (`ARM_SEED`, 1000, 100, 200, an epoch) and `jax.random.key` keeps a seed's low 32 bits, so 2**32 + 5 ran as 5
    (session 55's list); NumPy's generators refuse a negative one after the warm-up."""
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= seed < 2**31:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to 2**31 - 1 (the experiments add offsets to it "
                                         f"and a JAX key keeps 32 bits), got {seed}")
    return seed


def parse_args(argv=None) -> tuple[ExpConfig, argparse.Namespace]:
    ap = argparse.ArgumentParser(prog="python -m experiments.arithmetic_reft", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny CI version (pipeline check, not the result)")
    ap.add_argument("--out", default="runs/arithmetic_reft")
    ap.add_argument("--seeds", type=seed_arg, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", choices=ARMS)
    for f in dataclasses.fields(ExpConfig):
        if f.type in ("int", "float", "bool", "str"):
            kind = {"int": int, "float": float, "bool": _bool, "str": str}[f.type]
            ap.add_argument("--" + f.name.replace("_", "-"), type=kind, metavar=f.type.upper(),
                            help=f"default {getattr(ExpConfig, f.name)}"
                            + (f" ({QUICK[f.name]} with --quick)" if f.name in QUICK else ""))
    args = ap.parse_args(argv)
    overrides = dict(QUICK) if args.quick else {}
    overrides.update({f.name: getattr(args, f.name) for f in dataclasses.fields(ExpConfig)
                      if f.type in ("int", "float", "bool", "str") and getattr(args, f.name) is not None})
    if args.arms:
        overrides["arms"] = tuple(args.arms)
    return ExpConfig(**overrides), args


def main(argv=None) -> dict:
    cfg, args = parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    load = os.getloadavg()[0]
    tokenizer = task.build_tokenizer()
    runner = Runner(cfg, build_data(cfg, tokenizer), tokenizer)
    print(f"model {runner.model_cfg.num_params} params, vocab {len(tokenizer)}, "
          f"prompt {runner.data.prompts['train'][0].shape[1]}, sft length {runner.data.sft['tokens'].shape[1]}",
          flush=True)
    per_seed = [run_seed(runner, s) for s in args.seeds]
    table = summarize(per_seed, cfg)
    wall = time.time() - t0
    footer = (f"\nWall time {wall / 60:.1f} min on {os.cpu_count()} CPU cores; load average "
              f"{load:.1f} at start, {os.getloadavg()[0]:.1f} at end. Guard flags (RL rewards zeroed): "
              f"{runner.guard_totals}.")
    print(table + footer, flush=True)
    result = {"config": dataclasses.asdict(cfg), "seeds": args.seeds, "per_seed": per_seed,
              "guard_totals": runner.guard_totals, "wall_seconds": wall}
    write_atomic(out / "results.json", lambda f: json.dump(result, f, indent=1))
    write_atomic(out / "results.md", lambda f: f.write(table + footer + "\n"))
    plot(per_seed, cfg, out / "curves.png")
    print(f"wrote {out}/results.json, results.md, curves.png", flush=True)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
