"""The jit-compiled training steps: `sft_step`, `make_experience` and `ppo_step`.

State is one explicit pytree (`TrainState`); every step is a pure function
`(state, batch) -> (state, metrics)` compiled once per shape with the state
donated. The only host interaction inside any step is the grader callback in
`make_experience` (an ordered `io_callback`, see `reftjax.graders.callback`).

ReFT PPO (lqtrung1998/mwp_ReFT `train_rl_reft.py`, functions `rollout` and
`train_one_epoch`), per iteration:

    rollout (reftjax.rollout)        prompts -> completions (policy, temperature 1)
    make_experience                  one no-grad forward of policy+value and of the
                                     frozen reference; grader score on the EOS token;
                                     reward_t = score*[t=last] - beta*(logp_old - logp_ref);
                                     GAE(gamma=1, lambda=0.95); advantages whitened over
                                     the whole batch (global reduction across devices)
    ppo_step                         `ppo_epochs` x minibatches (lax.scan) of
                                     clipped-ratio policy loss + vf_coef x clipped value
                                     loss (0.5 inside), AdamW, grad clip 1.0

GRPO/RLOO (critic-free) share everything but the advantage (group-relative over
the n samples of each prompt: group-std-scaled, or leave-one-out) and put the KL
(k3) in the loss; see `PPOConfig` for how they differ from TRL's trainers.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from reftjax import losses
from reftjax.sharding import MeshJit, constrain_batch, mesh_of, replicated_like, to_auto
from reftjax.models import (ModelConfig, ValueHead, forward, init_value_head, lm_head_weight, lm_logits,
                            positions_from_mask)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with a schedule and global-norm clipping.

    Defaults: the ReFT SFT warm-up (lr 1e-5, linear decay, 10% warm-up, no weight decay, clip 1.0).

    Attributes:
      weight_decay: decoupled AdamW decay of the weight matrices and embeddings; norm scales and
        biases are not decayed (HF Trainer's grouping).
      grad_clip: global-norm clip; 0 (or less) turns clipping off, as HF's `max_grad_norm` does.
      value_head_lr_scale: multiplies the update of the critic: the `params["value_head"]`
        subtree and a separate critic trunk, `params["critic"]` (the critic's own lr is
        `learning_rate * value_head_lr_scale`; the shared backbone keeps `learning_rate`).
        PPO only: the SFT and verifier phases refuse another value. ReFT uses one lr for all
        (1.0). Under Adam a weight moves by about lr per step whatever its gradient, so a fresh
        critic at a policy-sized lr (1e-6..1e-4) needs thousands of updates to fit the returns;
        separate critic lrs are the norm in verl/OpenRLHF.
    """

    learning_rate: float = 1e-5
    schedule: str = "linear"  # "constant" | "linear" | "cosine"
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    value_head_lr_scale: float = 1.0

    def __post_init__(self):
        if self.value_head_lr_scale <= 0:
            raise ValueError(f"value_head_lr_scale must be > 0, got {self.value_head_lr_scale}")
        if self.schedule not in ("constant", "linear", "cosine"):
            raise ValueError(f"schedule={self.schedule!r}; expected constant, linear or cosine")
        if not 0 <= self.warmup_ratio < 1 or self.learning_rate <= 0:
            raise ValueError("need 0 <= warmup_ratio < 1 and learning_rate > 0")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1 and self.eps >= 0 and self.weight_decay >= 0):
            # (b2 = 1 freezes the second moment at its first value and Adam's bias correction divides by 0)
            raise ValueError(f"need 0 <= b1 < 1, 0 <= b2 < 1, eps >= 0 and weight_decay >= 0; got b1={self.b1}, "
                             f"b2={self.b2}, eps={self.eps}, weight_decay={self.weight_decay}")


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """RL update settings; defaults are the ReFT authors' (N-CoT, ~125M model).

    Attributes:
      algo: "ppo" (ReFT: critic + GAE), "grpo" or "rloo" (critic-free, group-relative). "rloo" is GRPO's loss
        (per-token clipped ratio, `loss_agg`, k3 KL in the loss) with the leave-one-out baseline as the advantage,
        not TRL's RLOOTrainer (a sequence-level ratio, a plain mean over sequences without length normalisation,
        and a k1 KL subtracted from the reward before the baseline).
      kl_coef: beta. PPO: per-token k1 penalty in the reward (0.05 N-CoT, 0.01 P-CoT);
        GRPO/RLOO: k3 KL term in the loss, DeepSeekMath's form, i.e. TRL's GRPOTrainer with
        `use_bias_correction_kl=False` (TRL 1.16 defaults to True, which multiplies k3 by the ratio: same
        value on-policy, another gradient; TRL's default beta is 0). 0 skips the reference forward in
        `make_experience` (as TRL does with beta 0); the KL metrics then read 0.
      gamma, gae_lambda: GAE (1.0, 0.95).
      clip_eps: policy ratio clip (0.2).
      clip_eps_high: the ratio's clip above 1 when it differs (DAPO's "clip-higher", TRL's `epsilon_high`, e.g.
        0.28), or None: `clip_eps` both ways (ReFT, DeepSeekMath).
      clip_range_value: value clip around the old value (0.2).
      vf_coef: value loss weight (5.0; the 0.5 sits inside the value loss).
      ppo_epochs: passes over each rollout batch (2).
      minibatch_size: rows per optimizer update (global, across devices). None: the whole rollout
        batch, one update per epoch, as the ReFT authors run it (lqtrung1998/mwp_ReFT: every
        `exps/` script sets `mini_batch_size` to the per-GPU `batch_size`, e.g. 4 x 8 GPUs for 7B,
        32 x 8 for the 125M models, and `train_rl_reft.py` draws minibatches per GPU, so each
        update sees the whole global batch). Smaller values make more, noisier updates per
        rollout (each also advances the learning-rate schedule) and cut activation memory.
      whiten_advantages: whiten PPO advantages over the whole batch (mean removed).
      loss_agg: "seq-mean-token-mean" (ReFT, DeepSeekMath; TRL "grpo") or "token-mean" (TRL "bnpo"; TRL's
        "dapo", its default, only when `minibatch_size` is None: dapo divides by the whole batch's tokens).
      group_size: samples per prompt for GRPO/RLOO (rows are prompt-major).
      scale_rewards: GRPO's advantage scaling, TRL's values: "group" (divide by the group's standard deviation:
        DeepSeekMath, TRL's default), "batch" (by the whole batch's) or "none" (Dr. GRPO: only the group mean
        removed).
      value_grad_to_backbone: let the value loss train the shared backbone (ReFT/trl: True).
        False stops its gradient at the final hidden states, so only the value head
        learns from it (useful when a fresh head's large early loss would disturb a
        small policy).
      experience_from_rollout: take `logp_old` (and PPO's old values) from the rollout
        instead of a second forward pass of the policy over the sampled sequences (saves
        one forward per iteration; the reference forward stays). Only valid when the
        rollout samples from the policy itself (temperature `temperature`, top_k 0, top_p 1), whose
        decode-path log-probs equal the teacher-forced ones (within 1e-4 in fp32; tested);
        PPO also needs `rollout(..., value_head=...)`. False recomputes them, as the ReFT
        authors' code does. In bfloat16 the decode path and the training forward round
        differently (SmolLM2-135M, 512 sampled tokens: up to 0.27 apart, mean 0.03; a tiny
        model: up to 0.02-0.075 since attention sums its scores in float32, 0.037-0.26 before;
        BUILD_NOTES sessions 21, 27), so
        with this option the first update's ratio is not exactly 1 and iteration 1's KL to an
        identical reference reads ~-6e-3; the training loop warns. Recomputing (the default)
        gives ratio 1 and KL 0 in bf16 too.
      critic_only: PPO only: train the critic alone (policy loss dropped, value gradient
        stopped at the shared backbone, so the policy does not move; a separate critic trunk
        trains with its head). A second step compiled with this
        set runs critic warm-up iterations before policy updates start (verl's `critic_warmup`);
        it needs `make_optimizer(..., separate_critic_state=True)` for both steps, so the
        warm-up leaves the policy's AdamW state (step count included) untouched.
      share_prompt: run each prompt once for its `group_size` samples in every forward and
        backward of the update and the experience (`completion_hidden`: the samples are packed
        behind their prompt in one row, attending to it and to themselves only). Same math as
        unpacked rows (equal up to float summation order); saves (g-1)/g of the prompt
        tokens' trunk compute. Rows must be prompt-major groups of `group_size` (as `rollout`
        returns n = group_size samples per prompt; PPO then needs sampling n = group_size too);
        minibatches are drawn as whole groups, and the mesh's batch axes (data x fsdp) should
        divide minibatch_size / group_size packed rows (otherwise XLA reshards them: still
        correct, tested on 8 devices with 4 packed rows, but slower). Attention runs in blocks (the
        prompt over itself, each completion over the prompt and itself: P^2 + g N (P + N) scores),
        never densely over the P + g*N packed slots.
      head_chunk_rows: rows (batch x positions) per chunk of the vocabulary head in the experience
        and update forwards (`losses.fused_token_logprobs`: no [B, N, V] logits, their softmax or
        gradient in memory; the backward recomputes each chunk's logits). 0 builds full logits.
        One GRPO/PPO minibatch update on SmolLM2 (8 rows, 128 + 128 tokens, shared prompts):
        ~10% faster and 250 MiB less XLA temp memory at 128 rows than full logits (BUILD_NOTES).
      temperature: the rollout's sampling temperature. Every log-prob of the update (old, new,
        reference) and the entropy are taken from logits / temperature, the distribution the
        samples were drawn from (as TRL does); `RLConfig` checks it equals `sampling.temperature`.
        1.0 in ReFT.
      critic: PPO only. "shared" (ReFT): the value head reads the policy's last hidden state.
        "separate": the critic has its own copy of the backbone (`params["critic"]`, initialised
        from the policy by `init_rl_params`, without the policy's untied `lm_head`, which it never
        reads) that only the value loss trains, as verl and OpenRLHF run PPO; costs one more
        forward (experience) and forward + backward (update).
    """

    algo: str = "ppo"
    kl_coef: float = 0.05
    gamma: float = 1.0
    gae_lambda: float = 0.95
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    clip_range_value: float = 0.2
    vf_coef: float = 5.0
    ppo_epochs: int = 2
    minibatch_size: int | None = None
    whiten_advantages: bool = True
    loss_agg: str = "seq-mean-token-mean"
    group_size: int = 1
    scale_rewards: str = "group"
    value_grad_to_backbone: bool = True
    experience_from_rollout: bool = False
    critic_only: bool = False
    critic: str = "shared"
    share_prompt: bool = False
    head_chunk_rows: int = 128
    temperature: float = 1.0

    @property
    def prompt_group(self) -> int:
        """Rows that share one prompt in the forward passes (1 = every row runs its own prompt)."""
        return self.group_size if self.share_prompt else 1

    def __post_init__(self):
        if self.ppo_epochs < 1:
            raise ValueError(f"ppo_epochs must be >= 1, got {self.ppo_epochs}")
        if self.minibatch_size is not None and self.minibatch_size < 1:
            raise ValueError(f"minibatch_size must be >= 1 or None (the whole rollout batch), "
                             f"got {self.minibatch_size}")
        if self.share_prompt and (self.group_size < 2 or (self.minibatch_size or 0) % self.group_size):
            raise ValueError(f"share_prompt needs group_size >= 2 dividing minibatch_size; got group_size="
                             f"{self.group_size}, minibatch_size={self.minibatch_size}")
        if self.algo not in ("ppo", "grpo", "rloo"):
            raise ValueError(f"algo={self.algo!r}; expected ppo, grpo or rloo")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.critic not in ("shared", "separate"):
            raise ValueError(f"critic={self.critic!r}; expected 'shared' or 'separate'")
        if self.critic == "separate" and (self.algo != "ppo" or self.experience_from_rollout):
            raise ValueError("critic='separate' needs algo='ppo' and experience_from_rollout=False (the rollout "
                             "reads values off the policy's hidden states)")
        if self.critic_only and self.algo != "ppo":
            raise ValueError("critic_only needs algo='ppo' (the critic-free algorithms have no value head)")
        if self.algo != "ppo" and self.group_size < 2:
            raise ValueError(f"{self.algo} needs group_size >= 2 samples per prompt")
        if self.loss_agg not in losses.LOSS_AGGREGATIONS:
            raise ValueError(f"loss_agg={self.loss_agg!r}; expected one of {losses.LOSS_AGGREGATIONS}")
        if self.scale_rewards not in losses.SCALE_REWARDS:
            raise ValueError(f"scale_rewards={self.scale_rewards!r}; expected one of {losses.SCALE_REWARDS}")
        if self.scale_rewards != "group" and self.algo != "grpo":  # (RLOO's baseline is unscaled, PPO whitens)
            raise ValueError(f"scale_rewards={self.scale_rewards!r} is GRPO's advantage scaling; algo={self.algo!r} "
                             f"does not scale by a standard deviation (leave it 'group')")
        if self.clip_eps_high is not None and not self.clip_eps_high > 0:
            raise ValueError(f"clip_eps_high must be > 0 or None (clip_eps both ways), got {self.clip_eps_high}")
        # a negative beta rewards drifting from the reference; a clip range <= 0 stops every update
        if not (self.kl_coef >= 0 and 0 <= self.gamma <= 1 and 0 <= self.gae_lambda <= 1 and self.clip_eps > 0
                and self.clip_range_value > 0 and self.vf_coef >= 0 and self.head_chunk_rows >= 0):
            raise ValueError(f"need kl_coef >= 0, gamma and gae_lambda in [0, 1], clip_eps > 0, clip_range_value > 0, "
                             f"vf_coef >= 0 and head_chunk_rows >= 0; got kl_coef={self.kl_coef}, gamma={self.gamma}, "
                             f"gae_lambda={self.gae_lambda}, clip_eps={self.clip_eps}, clip_range_value="
                             f"{self.clip_range_value}, vf_coef={self.vf_coef}, head_chunk_rows={self.head_chunk_rows}")


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    total = max(int(total_steps), 1)
    warm = int(cfg.warmup_ratio * total)
    if cfg.schedule == "constant":
        main = optax.constant_schedule(cfg.learning_rate)
    elif cfg.schedule == "linear":
        main = optax.linear_schedule(cfg.learning_rate, 0.0, max(total - warm, 1))
    else:
        main = optax.cosine_decay_schedule(cfg.learning_rate, max(total - warm, 1))
    if warm == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, warm), main], [warm])


def schedule_value(cfg: OptimConfig, total_steps: int, count: int) -> float:
    """`make_schedule(cfg, total_steps)(count)` in plain Python, for logging the learning rate on the host
    without dispatching (or compiling) anything; `tests/steps_test.py` checks it against optax."""
    total = max(int(total_steps), 1)
    warm = int(cfg.warmup_ratio * total)
    lr, count = float(cfg.learning_rate), int(count)
    if count < warm:
        return lr * count / warm
    t = count - warm
    if cfg.schedule == "constant":
        return lr
    frac = min(t, max(total - warm, 1)) / max(total - warm, 1)
    if cfg.schedule == "linear":
        return lr * (1.0 - frac)
    return lr * 0.5 * (1.0 + math.cos(math.pi * frac))


def _scale_subtrees(keys: tuple[str, ...], scale: float) -> optax.GradientTransformation:
    """Stateless: multiplies the updates under the top-level `keys` (those present) by `scale`."""

    def update(updates, state, params=None):
        del params
        if isinstance(updates, dict):
            updates = {k: jax.tree.map(lambda u: u * jnp.asarray(scale, u.dtype), v) if k in keys else v
                       for k, v in updates.items()}
        return updates, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _decay_mask(params):
    """True for the leaves AdamW's weight decay applies to: not norm scales and biases (HF Trainer's grouping;
    the stacked layers make those 2-D, so the leaf's name decides, not its rank)."""
    def decayed(path, _):
        name = getattr(path[-1], "key", getattr(path[-1], "name", ""))
        return name not in ("scale", "bias")

    return jax.tree_util.tree_map_with_path(decayed, params)


def _critic_part(tree: Any) -> dict | None:
    """The critic's part of an RL params (or gradient) tree that has a separate critic trunk (`PPOConfig.critic=
    "separate"`: a "critic" subtree, with the "value_head"), else None."""
    if isinstance(tree, dict) and "critic" in tree:
        return {k: v for k, v in tree.items() if k != "policy"}
    return None


def clip_by_part_norm(max_norm: float) -> optax.GradientTransformation:
    """`optax.clip_by_global_norm`, except that with a separate critic trunk (`_critic_part`) the policy and the
    critic are clipped each by its own norm, as verl's and OpenRLHF's separate actor and critic optimizers clip them:
    one norm over both let the critic's gradient (the value loss, weighted by vf_coef 5) shrink every policy update
    (a tiny model at the default clip 1.0: combined norm ~10, the policy's ~1.7; review, session 37). The shared
    critic (ReFT) keeps one norm over the whole model, as the authors clip it. Stateless, like optax's: the
    optimizer state's tree is the same."""
    whole = optax.clip_by_global_norm(max_norm)

    def update(updates, state, params=None):
        critic = _critic_part(updates)
        if critic is None:
            return whole.update(updates, state, params)
        policy = {"policy": updates["policy"]}
        return {**whole.update(policy, state)[0], **whole.update(critic, state)[0]}, state

    return optax.GradientTransformation(whole.init, update)


def make_optimizer(cfg: OptimConfig, total_steps: int, *, separate_critic_state: bool = False
                   ) -> optax.GradientTransformation:
    """Global-norm clipping (`clip_by_part_norm`: policy and a separate critic each by its own), then AdamW with
    `cfg`'s schedule.

    `separate_critic_state`: the policy and the critic (value head, plus a separate critic trunk)
    get their own AdamW state (moments, step count, schedule position). Required by `PPOConfig.critic_only`
    (critic warm-up), which leaves the policy's state untouched: with one shared count the warm-up would
    advance the policy's bias correction while its moments stay zero, making its first updates
    after the warm-up several times Adam's normal step.
    """
    adamw = lambda: optax.adamw(make_schedule(cfg, total_steps), cfg.b1, cfg.b2, cfg.eps,  # noqa: E731
                                weight_decay=cfg.weight_decay, mask=_decay_mask)
    clip = clip_by_part_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity()
    if separate_critic_state:
        labels = lambda params: {k: jax.tree.map(lambda _: "policy" if k == "policy" else "critic", v)  # noqa: E731
                                 for k, v in params.items()}
        parts = [clip, optax.multi_transform({"policy": adamw(), "critic": adamw()}, labels)]
    else:
        parts = [clip, adamw()]
    if cfg.value_head_lr_scale != 1.0:  # only then: keeps the optimizer-state tree of existing checkpoints
        # the whole critic: a separate critic trunk trained at the policy's lr while its head had the critic's
        parts.append(_scale_subtrees(("value_head", "critic"), cfg.value_head_lr_scale))
    return optax.chain(*parts)


# ----------------------------------------------------------------------------- state


@flax.struct.dataclass
class TrainState:
    """Everything a step changes. `params` = {"policy": ...} for SFT, {"policy", "value_head"[, "critic"]} for PPO
    (`init_rl_params`; "critic" with `PPOConfig(critic="separate")`), {"verifier": ...} for the reranking verifier.

    Attributes:
      step: number of optimizer updates applied (skipped ones not counted).
      params: trainable parameters.
      opt_state: optax state for `params`.
      rng: PRNG key for rollouts and minibatch shuffling.
      skipped: updates skipped because the loss or gradient was not finite.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    skipped: jax.Array


def init_state(params: dict, tx: optax.GradientTransformation, rng: jax.Array, abstract: bool = False) -> TrainState:
    """A fresh state; the optimizer state inherits each parameter's sharding.

    `abstract`: its shapes, dtypes and shardings (`jax.ShapeDtypeStruct`s; `params` may be abstract too) without
    allocating the optimizer state: the target a checkpoint restores onto. A resume built the whole fresh state
    first, so the restore ran beside a second one (the optimizer's two moments and, in RL, a policy copy: 7 model
    sizes at the restore where a fresh RL phase holds 4).

    Params stored in bfloat16 are warned about (once a process): an AdamW update below half the spacing of a
    weight's bf16 value (about 0.4% of it) rounds away, so at ReFT's learning rates most weights never change.
    Params (arrays or abstract) placed on a mesh with Explicit axes move to its Auto twin (`sharding.to_auto`)."""
    _warn_low_precision(params)
    params = to_auto(params)  # (placed on a mesh with Explicit axes: its Auto twin, as the steps run them)
    mesh = mesh_of(params)
    opt_shardings = _opt_state_shardings(tx, params, mesh) if mesh is not None else None
    init = jax.jit(tx.init, out_shardings=opt_shardings)
    if abstract:  # no program compiled (the counters and key built below compiled a scalar program or two here)
        rep = (jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()) if mesh is not None
               else jax.device_put(np.zeros((), np.int32)).sharding)  # (the default device: where fresh ones live)

        def spec(x, sh=None):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh or getattr(x, "sharding", None) or rep)

        counter = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
        return TrainState(step=counter, params=jax.tree.map(spec, params),
                          opt_state=jax.tree.map(spec, jax.eval_shape(init, params)),
                          rng=spec(rng, rep if mesh is not None else None), skipped=counter)
    opt_state = init(params)
    step, skipped = jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)
    if mesh is not None:  # counters and key replicated on the mesh too: a restore commits every leaf to the
        # sharding recorded here, and one left on a single device would clash with the mesh in the next step
        from reftjax.sharding import put

        rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        impl = jax.random.key_impl(rng)
        zero = np.zeros((), np.int32)
        step, skipped, key_data = put((zero, zero, np.asarray(jax.random.key_data(rng))), (rep, rep, rep))
        rng = jax.jit(lambda d: jax.random.wrap_key_data(d, impl=impl), out_shardings=rep)(key_data)
    state = TrainState(step=step, params=params, opt_state=opt_state, rng=rng, skipped=skipped)
    if mesh is None:  # committed to their device, as a checkpoint restores them: a step compiled for uncommitted
        # arrays compiled again (once per jitted step) for the same shapes after a resume; NumPy params too (their
        # first step returned committed ones, so every RL program compiled twice: library-user review, session 28)
        # (on JAX's default device, where the counters and optimizer state are: `with jax.default_device(...)`)
        state = jax.tree.map(lambda x: jax.device_put(x, jnp.asarray(x).sharding), state)
    return state


_LOW_PRECISION_WARNED: set = set()


def _warn_low_precision(params) -> None:
    """Trainable params in a float type of fewer than 10 mantissa bits (bfloat16) are warned about: 5 SFT updates
    at lr 1e-6 changed 1% of a tiny model's bf16 weights and 95% of its float32 ones (tunix-migrant review, session
    38; the presets keep float32 weights for it since session 19)."""
    low = sorted({str(x.dtype) for x in jax.tree.leaves(params)
                  if jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).nmant < 10})
    if low and tuple(low) not in _LOW_PRECISION_WARNED:  # (once: every phase builds an abstract and a fresh state)
        _LOW_PRECISION_WARNED.add(tuple(low))
        log.warning("trainable params stored in %s: an optimizer update smaller than half the spacing between a "
                    "weight's neighbouring %s values (about 0.4%% of the weight) rounds away, so at fine-tuning "
                    "learning rates (ReFT: 3e-7 to 1e-5) most weights never change; keep them in float32 and compute "
                    "in bfloat16 (ModelConfig param_dtype='float32', dtype='bfloat16', as the gpu/tpu/paper presets)",
                    "/".join(low), "/".join(low))


def _opt_state_shardings(tx, params, mesh):
    """Each optimizer-state leaf gets the sharding of the parameter it shadows, found by key path.

    A moment's key path ends with its parameter's path (`...mu['policy']['layers']...['kernel']`),
    also inside `optax.multi_transform`'s masked partitions, where `optax.tree_map_params` cannot
    follow the tree; counts and other scalars are replicated.
    """
    by_path = {tuple(map(str, path)): (leaf.shape, leaf.sharding)
               for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    longest = max(map(len, by_path), default=0)
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def pick(path, leaf):
        keys = tuple(map(str, path))
        for n in range(min(longest, len(keys)), 0, -1):
            hit = by_path.get(keys[-n:])
            if hit is not None and hit[0] == leaf.shape:
                return hit[1]
        return rep

    return jax.tree_util.tree_map_with_path(pick, jax.eval_shape(tx.init, params))


def _apply_update(state: TrainState, grads, tx, loss) -> tuple[TrainState, dict]:
    """AdamW update, skipped entirely (params, opt state, step) if loss or grads are non-finite.

    A `lax.cond` rather than per-leaf `where` selects: the selects read and wrote
    params and both Adam moments once more (SmolLM2-135M on 2 CPU cores: 0.62-0.80 s
    per update with selects, 0.33 s with the cond, 0.31 s unguarded; torch AdamW 0.67 s).
    """
    critic = _critic_part(grads)  # with a separate critic: each part's norm, as `clip_by_part_norm` clips them
    norms = ({"grad_norm": optax.tree.norm(grads)} if critic is None else
             {"grad_norm": optax.tree.norm(grads["policy"]), "critic_grad_norm": optax.tree.norm(critic)})
    finite = jnp.isfinite(loss) & functools.reduce(jnp.logical_and, [jnp.isfinite(n) for n in norms.values()])

    def apply(operands):
        st, g = operands
        updates, new_opt = tx.update(g, st.opt_state, st.params)
        return st.replace(params=optax.apply_updates(st.params, updates), opt_state=new_opt, step=st.step + 1)

    def skip(operands):
        st, _ = operands
        return st.replace(skipped=st.skipped + 1)

    new_state = jax.lax.cond(finite, apply, skip, (state, grads))
    return new_state, {**norms, "skipped": (~finite).astype(jnp.int32)}


# ----------------------------------------------------------------------------- SFT


def accumulate_grads(grad_fn, params, micro_batches):
    """Sums `grad_fn(params, mb) -> (grads, aux)` over the leading axis of `micro_batches` (a `lax.scan`); returns
    (the sum in each parameter's dtype, the stacked aux). The running sum is kept in f32 whatever the params' dtype:
    with bf16 params each addition rounded it to bf16, so small micro-batch gradients were lost next to a large one."""
    def body(acc, mb):
        g, aux = grad_fn(params, mb)
        return jax.tree.map(lambda a, b: a + b.astype(a.dtype), acc, g), aux

    zeros = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=jnp.promote_types(p.dtype, jnp.float32)), params)
    total, aux = jax.lax.scan(body, zeros, micro_batches)
    return jax.tree.map(lambda g, p: g.astype(p.dtype), total, params), aux


def _micro(batch: dict, accum: int) -> dict:
    return jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)


def sft_step(state: TrainState, batch: dict, *, model_cfg: ModelConfig, tx: optax.GradientTransformation,
             accum_steps: int = 1, head_chunk_rows: int = 512) -> tuple[TrainState, dict]:
    """One SFT update: masked next-token cross-entropy on the answer tokens.

    Args:
      batch: tokens_BxT, attn_mask_BxT, loss_mask_BxT (right-padded prompt+target+EOS,
        `reftjax.data.collate_sft` layout: keys "tokens", "attn_mask", "loss_mask").
      accum_steps: gradient accumulation: the batch is split into this many
        micro-batches (scan), gradients summed, normalised by the total token count.
      head_chunk_rows: rows (batch x positions) per chunk of the fused vocabulary
        head + cross-entropy (`losses.fused_sft_loss`: no [B, T, V] logits); 0 computes
        the logits and `losses.sft_loss` instead.
    """
    batch = {k: batch[k] for k in ("tokens", "attn_mask", "loss_mask")}
    rows = batch["tokens"].shape[0]
    if accum_steps < 1 or rows % accum_steps:
        raise ValueError(f"sft accum_steps={accum_steps} must divide the batch of {rows} rows")
    n_tokens = jnp.sum(batch["loss_mask"][:, 1:].astype(jnp.float32))
    total_tokens = jnp.maximum(n_tokens, 1.0)

    def loss_fn(params, mb):
        _, hidden = forward(params["policy"], model_cfg, mb["tokens"], mb["attn_mask"], return_logits=False)
        if head_chunk_rows > 0:  # position t predicts token t+1; the last position predicts nothing
            shift = lambda x: jnp.pad(x[:, 1:], ((0, 0), (0, 1)))  # noqa: E731
            w, vocab_major = lm_head_weight(params["policy"], model_cfg)
            mean, m = losses.fused_sft_loss(hidden, w, shift(mb["tokens"]), shift(mb["loss_mask"]),
                                            vocab_major=vocab_major, chunk_rows=head_chunk_rows,
                                            logit_softcap=model_cfg.final_logit_softcap)
        else:
            # the head runs on hidden[:, :-1]: slicing [B, T, V] logits instead costs a full-size
            # copy forward and a zero-padded one backward (0.3 s of an 8 x 256 step on 2 cores)
            logits = lm_logits(params["policy"], model_cfg, hidden[:, :-1])
            mean, m = losses.sft_loss(logits, mb["tokens"][:, 1:], mb["loss_mask"][:, 1:])
        return mean * m["n_tokens"] / total_tokens, m

    def grad_fn(params, mb):
        (loss, m), g = jax.value_and_grad(loss_fn, has_aux=True)(params, mb)
        return g, (loss, m["token_accuracy"] * m["n_tokens"])

    if accum_steps == 1:  # no zero-filled accumulator and extra pass over the gradients
        grads, (loss, correct) = grad_fn(state.params, batch)
    else:
        grads, (loss_parts, correct) = accumulate_grads(grad_fn, state.params, _micro(batch, accum_steps))
        loss = jnp.sum(loss_parts)
    new_state, upd = _apply_update(state, grads, tx, loss)
    return new_state, {"loss": loss, "token_accuracy": jnp.sum(correct) / total_tokens,
                       "tokens": n_tokens, "input_tokens": jnp.sum(batch["attn_mask"].astype(jnp.float32)), **upd}


def make_sft_step(model_cfg: ModelConfig, tx: optax.GradientTransformation, accum_steps: int = 1,
                  head_chunk_rows: int = 512):
    """`sft_step` jitted with the state donated (static config bound by partial); on a mesh its activations are
    split over the batch axes and the new state keeps the old one's shardings (`sharding.MeshJit`)."""
    return MeshJit(functools.partial(sft_step, model_cfg=model_cfg, tx=tx, accum_steps=accum_steps,
                                     head_chunk_rows=head_chunk_rows), state_step=True)


# ----------------------------------------------------------------------------- RL experience


@flax.struct.dataclass
class Experience:
    """A graded rollout ready for `ppo_step` (B rows; N completion slots).

    `tokens_BxL`/`attn_mask_BxL` are prompt (left-padded, P slots) + completion
    (right-padded, N slots); completion token i sits at slot P+i and is predicted
    from slot P-1+i, where its value is read too.
    """

    tokens_BxL: jax.Array
    attn_mask_BxL: jax.Array
    mask_BxN: jax.Array
    logp_old_BxN: jax.Array
    logp_ref_BxN: jax.Array
    values_old_BxN: jax.Array
    advantages_BxN: jax.Array
    returns_BxN: jax.Array
    scores_B: jax.Array
    # the PPOConfig.algo whose advantages these are ("ppo": GAE over the critic's values; "grpo"/"rloo": group
    # baselines); `ppo_step` refuses another algorithm's (None: built by hand, not checked). Static: no device data.
    algo: str | None = flax.struct.field(pytree_node=False, default=None)


def completion_hidden(trunk: dict, model_cfg: ModelConfig, tokens_BxL, attn_mask_BxL, n_completion: int,
                      share_prompt: int = 1):
    """[B, N, D] final hidden states that predict the N completion tokens (slot P-1+i for token i).

    `share_prompt` = g > 1 runs each prompt once for its g samples: rows must be prompt-major
    (rows g*k .. g*k+g-1 share one prompt, as `rollout` returns them). The g completions are
    packed behind their prompt in one row, [prompt | c_1 | ... | c_g], each attending to the
    prompt and to itself only (`llama.prefix_group_masks`), at the positions the unpacked rows
    would have.
    Same math as the unpacked forward (equal up to float summation order) for (g-1)/g fewer
    prompt tokens through the trunk, forward and backward.
    """
    b, l = tokens_BxL.shape
    p, n, g = l - n_completion, n_completion, share_prompt
    if g <= 1:
        _, hidden = forward(trunk, model_cfg, tokens_BxL, attn_mask_BxL, return_logits=False)
        return hidden[:, p - 1:-1]
    if b % g:
        raise ValueError(f"share_prompt={g} does not divide the {b} rows")
    pos = positions_from_mask(attn_mask_BxL)  # the unpacked rows' positions, packed like the tokens
    pack = lambda x: jnp.concatenate([x[::g, :p], x[:, p:].reshape(b // g, g * n)], axis=1)  # noqa: E731
    _, hidden = forward(trunk, model_cfg, pack(tokens_BxL), pack(attn_mask_BxL), pack(pos), return_logits=False,
                        shared_prefix=(p, g))
    # completion j's token 0 is predicted from the shared prompt's last slot, token i > 0 from its own slot i-1
    idx = np.array([[p - 1] + [p + j * n + i - 1 for i in range(1, n)] for j in range(g)], np.int32)
    return hidden[:, idx].reshape(b, n, hidden.shape[-1])


def policy_outputs(params: dict, model_cfg: ModelConfig, tokens_BxL, attn_mask_BxL, n_completion: int,
                   with_value: bool, with_entropy: bool = False, value_grad_to_backbone: bool = True,
                   share_prompt: int = 1, head_chunk_rows: int = 0, temperature: float = 1.0):
    """(logp_BxN, values_BxN | None, entropy_BxN | None) of the completion tokens.

    Values come from `params["critic"]`'s own hidden states when that trunk is present
    (PPOConfig.critic="separate"), else from the policy's (`value_grad_to_backbone` decides
    whether the value gradient enters the shared backbone). `share_prompt`: see `completion_hidden`.
    `head_chunk_rows` > 0 runs the vocabulary head in chunks of about that many rows without
    the [B, N, V] logits (`losses.fused_token_logprobs`); 0 builds the full logits. Log-probs and
    entropy are those of logits / `temperature` (the sampling distribution).
    """
    h = completion_hidden(params["policy"], model_cfg, tokens_BxL, attn_mask_BxL, n_completion, share_prompt)
    p = tokens_BxL.shape[1] - n_completion
    # logits / T in float32, as the rollout samples: dividing bf16 hidden states by T rounded them first
    if head_chunk_rows > 0:
        w, vocab_major = lm_head_weight(params["policy"], model_cfg)
        logp, entropy = losses.fused_token_logprobs(h.astype(model_cfg.jnp_dtype), w, tokens_BxL[:, p:],
                                                    vocab_major=vocab_major, chunk_rows=head_chunk_rows,
                                                    logit_scale=1.0 / temperature,
                                                    logit_softcap=model_cfg.final_logit_softcap)
    else:
        logits = lm_logits(params["policy"], model_cfg, h)  # (at least) float32 already
        logits = logits if temperature == 1.0 else logits / temperature
        logp = losses.token_logprobs(logits, tokens_BxL[:, p:])
        entropy = losses.token_entropy(logits) if with_entropy else None
    values = None
    if with_value:
        if "critic" in params:
            h_value = completion_hidden(params["critic"], model_cfg, tokens_BxL, attn_mask_BxL, n_completion,
                                        share_prompt)
        else:
            h_value = h if value_grad_to_backbone else jax.lax.stop_gradient(h)
        values = ValueHead().apply({"params": params["value_head"]}, h_value)
    return logp, values, (entropy if with_entropy else None)


CRITIC_DROPS = ("lm_head",)  # policy subtrees a separate critic trunk leaves out (`init_rl_params`)


def init_rl_params(policy: dict, model_cfg: ModelConfig, cfg: PPOConfig, rng: jax.Array) -> dict:
    """The trainable tree for `cfg`: {"policy"} (+ a fresh "value_head" for PPO, + a "critic" trunk copied
    from the policy when cfg.critic == "separate"). The policy is used as given (copy it yourself if it
    must survive donation); an abstract one (`jax.ShapeDtypeStruct`s) gives an abstract critic.

    The critic trunk is the policy without its untied `lm_head` (`CRITIC_DROPS`): the value head reads the last
    hidden state, so the vocabulary head would be stored, checkpointed and given AdamW moments for nothing
    (~0.5B parameters at 7-8B). Runs begun with it in the critic resume without it (`checkpoint.restore_latest`)."""
    params = {"policy": policy}
    if cfg.algo == "ppo":
        params["value_head"] = replicated_like(init_value_head(model_cfg, rng), policy)
        if cfg.critic == "separate":
            trunk = {k: v for k, v in policy.items() if k not in CRITIC_DROPS}
            params["critic"] = jax.tree.map(lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else jnp.copy(x), trunk)
    return params


def _check_critic(params: dict, cfg: PPOConfig) -> None:
    """The trainable tree fits the algorithm (a bare KeyError deep in the step otherwise: library-user review)."""
    if "policy" not in params:
        raise ValueError(f"params must be the trainable tree {{'policy': ..., ...}} (steps.init_rl_params builds it), "
                         f"got one with keys {sorted(params)[:5]}")
    if cfg.algo == "ppo" and "value_head" not in params:
        raise ValueError("PPO needs a value head: params lack 'value_head' (steps.init_rl_params with a PPO config "
                         "adds it; these look built for GRPO/RLOO)")
    if cfg.algo == "ppo" and ("critic" in params) != (cfg.critic == "separate"):
        raise ValueError(f"PPOConfig.critic={cfg.critic!r} but params {'has' if 'critic' in params else 'lacks'} a "
                         "'critic' trunk: build params with steps.init_rl_params")


def check_shared_prompts(prompt_tokens_BxP, prompt_mask_BxP, group: int) -> None:
    """Raises ValueError unless every run of `group` consecutive rows holds one prompt (tokens and mask):
    what `PPOConfig.share_prompt` assumes (it runs each group's first prompt for the whole group)."""
    tokens, mask = np.asarray(prompt_tokens_BxP), np.asarray(prompt_mask_BxP)
    b = tokens.shape[0]
    if b % group:
        raise ValueError(f"share_prompt groups of {group} rows do not divide the {b} rows")
    for x in (np.where(mask > 0, tokens, -1), mask):
        grouped = x.reshape(b // group, group, -1)
        bad = np.nonzero(np.any(grouped != grouped[:, :1], axis=(1, 2)))[0]
        if bad.size:
            first = int(bad[0]) * group
            raise ValueError(f"share_prompt: rows {first}..{first + group - 1} do not share "
                             f"one prompt; rows must be prompt-major groups of {group} (rollout with n={group})")


def check_sampling(sampling, cfg: PPOConfig) -> None:
    """The rollout's `SamplingConfig` (`Rollout.sampling`, None: not known) against the update's settings, which
    `RLConfig` checks for the CLI and a library user sets apart: another temperature trains against another
    policy than the one sampled, and a GRPO/RLOO group that is not one prompt's n samples compares different
    prompts' rewards (advantages for a prompt's difficulty, not a sample's quality)."""
    if sampling is None:
        return
    if sampling.greedy:
        raise ValueError("make_experience: the rollout was greedy; RL needs sampled rollouts (set a temperature)")
    if sampling.temperature != cfg.temperature:
        raise ValueError(f"make_experience: the rollout sampled at temperature {sampling.temperature} but "
                         f"PPOConfig.temperature={cfg.temperature}: the log-probs must be those of the distribution "
                         f"sampled from; set them equal")
    if cfg.algo != "ppo" and sampling.n != cfg.group_size:
        raise ValueError(f"make_experience: {cfg.algo} groups PPOConfig.group_size={cfg.group_size} rows, but the "
                         f"rollout drew n={sampling.n} samples per prompt: set them equal")
    if cfg.experience_from_rollout and (sampling.top_k or sampling.top_p < 1.0):
        raise ValueError("make_experience: PPOConfig.experience_from_rollout needs the rollout to sample from the "
                         f"policy itself (top_k 0, top_p 1); got top_k={sampling.top_k}, top_p={sampling.top_p}")


def make_experience(params: dict, ref_params: dict, rollout, scores_B, *, model_cfg: ModelConfig,
                    cfg: PPOConfig) -> Experience:
    """Score a rollout: old/ref log-probs and values, KL-shaped rewards, GAE or group advantages.

    With `cfg.share_prompt`, concrete (not traced) inputs are checked to hold one prompt per group
    (`check_shared_prompts`); under `jax.jit` that check is the caller's.
    """
    check_sampling(rollout.sampling, cfg)
    _check_critic(params, cfg)
    if scores_B.shape != rollout.tokens_BxN.shape[:1]:
        raise ValueError(f"scores_B has shape {scores_B.shape}; one score per rollout row: "
                         f"{rollout.tokens_BxN.shape[:1]}")
    if cfg.prompt_group > 1 and not isinstance(rollout.prompt_tokens_BxP, jax.core.Tracer):
        check_shared_prompts(rollout.prompt_tokens_BxP, rollout.prompt_mask_BxP, cfg.prompt_group)
    tokens = jnp.concatenate([rollout.prompt_tokens_BxP, rollout.tokens_BxN], axis=1)
    mask_n = rollout.mask_BxN.astype(jnp.int32)
    attn = jnp.concatenate([rollout.prompt_mask_BxP.astype(jnp.int32), mask_n], axis=1)
    n = rollout.tokens_BxN.shape[1]
    with_value = cfg.algo == "ppo"
    if cfg.experience_from_rollout:
        if with_value and rollout.values_BxN is None:
            raise ValueError("PPOConfig.experience_from_rollout with algo='ppo' needs the rollout's values: "
                             "call rollout(..., value_head=params['value_head'])")
        logp_old, values = rollout.logprobs_BxN, rollout.values_BxN if with_value else None
    else:
        logp_old, values, _ = policy_outputs(params, model_cfg, tokens, attn, n, with_value,
                                             share_prompt=cfg.prompt_group, head_chunk_rows=cfg.head_chunk_rows,
                                             temperature=cfg.temperature)
    logp_old = jax.lax.stop_gradient(logp_old)
    if cfg.kl_coef == 0:  # no KL term anywhere: skip the reference forward (KL metrics then read 0)
        logp_ref = logp_old
    else:
        logp_ref = jax.lax.stop_gradient(
            policy_outputs({"policy": ref_params}, model_cfg, tokens, attn, n, False,
                           share_prompt=cfg.prompt_group, head_chunk_rows=cfg.head_chunk_rows,
                           temperature=cfg.temperature)[0])
    scores_B = scores_B.astype(jnp.float32)
    if with_value:
        rewards, _ = losses.kl_shaped_rewards(scores_B, logp_old, logp_ref, mask_n, cfg.kl_coef)
        adv, returns = losses.gae(rewards, values, mask_n, cfg.gamma, cfg.gae_lambda)
        if cfg.whiten_advantages:
            adv = losses.masked_whiten(adv, mask_n)
        values = jnp.where(mask_n > 0, values, 0.0)
    else:
        group = (losses.grpo_advantages(scores_B, cfg.group_size, cfg.scale_rewards) if cfg.algo == "grpo"
                 else losses.rloo_advantages(scores_B, cfg.group_size))
        adv = jnp.broadcast_to(group[:, None], mask_n.shape)
        returns = values = jnp.zeros_like(adv)
    return Experience(tokens, attn, mask_n, logp_old, logp_ref, values, jnp.where(mask_n > 0, adv, 0.0),
                      returns, scores_B, algo=cfg.algo)


def experience_metrics(exp: Experience, rollout, logp_recomputed: bool = True, with_value: bool = False,
                       group_size: int = 1) -> dict:
    """Per-batch RL metrics computed on device (read them one step late).

    `reward_std`: the scores' standard deviation over the batch (Bessel-corrected, TRL's `reward_std`). With
    `group_size` >= 2 (prompt-major groups of samples), `frac_reward_zero_std`: the share of groups whose samples
    all scored the same (TRL's name), which give GRPO/RLOO no advantage to learn from.

    `rollout_logp_maxdiff` (decode-path vs teacher-forced log-probs of the sampled tokens) is
    reported only when `logp_old` was recomputed (`logp_recomputed`); with
    `PPOConfig.experience_from_rollout` both are the same array and the check would read 0.
    `value_explained_variance` (PPO, `with_value`): how well the critic's values at experience
    time predict the GAE returns, over the whole rollout batch (the per-minibatch
    `explained_variance` of `ppo_step` is computed during the update, on fewer tokens).
    """
    mask = exp.mask_BxN
    kl_seq = jnp.sum(jnp.where(mask > 0, exp.logp_old_BxN - exp.logp_ref_BxN, 0.0), axis=1)
    out = {"reward": jnp.mean(exp.scores_B), "accuracy": jnp.mean((exp.scores_B >= 1.0 - 1e-6).astype(jnp.float32)),
           "kl": jnp.mean(kl_seq), "response_length": jnp.mean(jnp.sum(mask, axis=1).astype(jnp.float32)),
           "finished": jnp.mean(rollout.finished_B.astype(jnp.float32)),
           "reward_std": jnp.std(exp.scores_B, ddof=1) if exp.scores_B.shape[0] > 1 else jnp.float32(0.0)}
    if group_size > 1:
        groups = exp.scores_B.reshape(-1, group_size)
        out["frac_reward_zero_std"] = jnp.mean((jnp.max(groups, 1) - jnp.min(groups, 1) <= 1e-6).astype(jnp.float32))
    if with_value:
        out["value_explained_variance"] = losses.explained_variance(exp.values_old_BxN, exp.returns_BxN, mask)
    if logp_recomputed:
        out["rollout_logp_maxdiff"] = jnp.max(jnp.where(mask > 0, jnp.abs(rollout.logprobs_BxN - exp.logp_old_BxN),
                                                        0.0))
    return out


# ----------------------------------------------------------------------------- PPO / GRPO update


def _rl_loss(params, mb: Experience, model_cfg: ModelConfig, cfg: PPOConfig):
    n = mb.mask_BxN.shape[1]
    logp, values, entropy = policy_outputs(params, model_cfg, mb.tokens_BxL, mb.attn_mask_BxL, n,
                                           cfg.algo == "ppo", with_entropy=True,
                                           value_grad_to_backbone=cfg.value_grad_to_backbone and not cfg.critic_only,
                                           share_prompt=cfg.prompt_group, head_chunk_rows=cfg.head_chunk_rows,
                                           temperature=cfg.temperature)
    m = {"entropy": losses.masked_mean(entropy, mb.mask_BxN)}
    if cfg.algo == "ppo":
        pg, pm = losses.ppo_policy_loss(logp, mb.logp_old_BxN, mb.advantages_BxN, mb.mask_BxN, cfg.clip_eps,
                                        cfg.loss_agg, cfg.clip_eps_high)
        vf, vm = losses.ppo_value_loss(values, mb.values_old_BxN, mb.returns_BxN, mb.mask_BxN,
                                       cfg.clip_range_value, cfg.loss_agg)
        m.update(pm, **vm, pg_loss=pg, vf_loss=vf,
                 explained_variance=losses.explained_variance(values, mb.returns_BxN, mb.mask_BxN))
        if cfg.critic_only:  # the metrics still report the policy loss it would have had
            return cfg.vf_coef * vf, m
        return pg + cfg.vf_coef * vf, m
    loss, gm = losses.grpo_loss(logp, mb.logp_old_BxN, mb.logp_ref_BxN, mb.advantages_BxN[:, 0], mb.mask_BxN,
                                cfg.clip_eps, cfg.kl_coef, cfg.loss_agg, cfg.clip_eps_high)
    m.update(gm)  # (pg_loss: the surrogate alone; the loss adds the KL term)
    if cfg.kl_coef == 0:  # the reference stood in by logp_old: k3 read KL(new || old), not to the reference, and
        m["kl_k3"] = jnp.zeros((), jnp.float32)  # grew with the epochs under a name that says KL (review, session 30)
    return loss, m


def _policy_states(opt_state) -> list[int]:
    """Positions in an optax.chain state of the multi_transform with a "policy" partition."""
    return [i for i, st in enumerate(opt_state) if isinstance(st, optax.MultiTransformState)
            and isinstance(st.inner_states, dict) and "policy" in st.inner_states]


def _with_policy_state(new, old):
    """`new` optimizer state with the policy partition's inner state taken from `old`."""
    out = list(new)
    for i in _policy_states(new):
        out[i] = new[i]._replace(inner_states={**new[i].inner_states, "policy": old[i].inner_states["policy"]})
    return tuple(out)


def minibatch_rows(cfg: PPOConfig, rows: int) -> int:
    """Rows per update for a rollout batch of `rows`: `cfg.minibatch_size`, or all of them when None."""
    return rows if cfg.minibatch_size is None else cfg.minibatch_size


def ppo_updates_per_step(cfg: PPOConfig, rows: int) -> int:
    """Optimizer updates one `ppo_step` makes on a batch of `rows` sequences: `ppo_epochs` x minibatches.

    Size an RL learning-rate schedule with it (iterations x this), not with the iteration count: optax
    advances the schedule on every minibatch update."""
    if rows % minibatch_rows(cfg, rows):
        raise ValueError(f"rollout batch {rows} is not a multiple of minibatch_size {cfg.minibatch_size}")
    return cfg.ppo_epochs * (rows // minibatch_rows(cfg, rows))


def ppo_step(state: TrainState, exp: Experience, *, model_cfg: ModelConfig, tx: optax.GradientTransformation,
             cfg: PPOConfig) -> tuple[TrainState, dict]:
    """`cfg.ppo_epochs` passes of shuffled minibatch updates over one experience batch (one lax.scan)."""
    _check_critic(state.params, cfg)
    if exp.algo is not None and exp.algo != cfg.algo:  # (GAE advantages in a GRPO update, zero values as PPO's)
        raise ValueError(f"ppo_step: the experience was built for algo={exp.algo!r} (its advantages and values), "
                         f"this step runs algo={cfg.algo!r}: build it with make_experience under the same PPOConfig")
    if cfg.critic_only and not (isinstance(state.opt_state, tuple) and _policy_states(state.opt_state)):
        raise ValueError("PPOConfig.critic_only needs make_optimizer(..., separate_critic_state=True): with one "
                         "shared AdamW state the critic warm-up would advance the policy's step count")
    b = exp.scores_B.shape[0]
    n_updates = ppo_updates_per_step(cfg, b)
    g = cfg.prompt_group
    if b % g:
        raise ValueError(f"rollout batch {b} is not a multiple of group_size {g} (share_prompt)")
    rng, *keys = jax.random.split(state.rng, cfg.ppo_epochs + 1)
    if g == 1:
        order = jnp.concatenate([jax.random.permutation(k, b) for k in keys])
    else:  # whole prompt groups, so each minibatch holds complete groups for the packed forward
        order = jnp.concatenate([(jax.random.permutation(k, b // g)[:, None] * g + jnp.arange(g)[None, :]).ravel()
                                 for k in keys])
    order = order.reshape(n_updates, minibatch_rows(cfg, b))
    state = state.replace(rng=rng)
    loss_fn = functools.partial(_rl_loss, model_cfg=model_cfg, cfg=cfg)

    def update(st: TrainState, rows):
        mb = jax.tree.map(lambda x: constrain_batch(x[rows]), exp)  # (the gather's rows came out whole per device)
        (loss, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(st.params, mb)
        new, upd = _apply_update(st, grads, tx, loss)
        if cfg.critic_only:  # the policy and its AdamW state (count, moments, schedule) stay as they were
            # (the params too: with weight decay AdamW would shrink the policy on a zero gradient)
            new = new.replace(opt_state=_with_policy_state(new.opt_state, st.opt_state),
                              params={**new.params, "policy": st.params["policy"]})
        return new, {"loss": loss, **m, **upd}

    state, per_mb = jax.lax.scan(update, state, order)
    # means over the minibatches that were applied: one skipped as non-finite made every mean NaN (logged as null),
    # losing the applied ones' figures; with all skipped, the plain (NaN) means say so
    ok = per_mb["skipped"] == 0
    n_ok = jnp.sum(ok)

    def mean_applied(x):
        w = ok.reshape(ok.shape + (1,) * (x.ndim - 1))
        return jnp.where(n_ok > 0, jnp.sum(jnp.where(w, x, 0), axis=0) / jnp.maximum(n_ok, 1), jnp.mean(x, axis=0))

    metrics = jax.tree.map(mean_applied, per_mb)
    metrics["skipped"] = jnp.sum(per_mb["skipped"])
    metrics["updates"] = jnp.asarray(order.shape[0], jnp.int32)
    return state, metrics


_LONGROPE_WARNED: set = set()


def _warn_unpinned_longrope(model_cfg: ModelConfig) -> None:
    """RL with LongRoPE on transformers' per-call rule (`RopeScaling.factors="auto"`): said once per process."""
    sc = model_cfg.rope_scaling
    if sc.kind == "longrope" and sc.factors == "auto" and not _LONGROPE_WARNED:  # (as _LOW_PRECISION_WARNED)
        _LONGROPE_WARNED.add(True)
        log.warning("LongRoPE with factors='auto' (transformers' rule: the long factors for a forward whose batch "
                    "passes the original context of %d): a rollout crossing it samples from other log-probs than the "
                    "update recomputes, and a row's log-probs depend on its batch-mates. Pin one set for RL: "
                    "model_cfg.replace(rope_scaling=dataclasses.replace(model_cfg.rope_scaling, factors='long' or "
                    "'short')), as train.pin_longrope does", sc.original_max_position_embeddings)


def make_ppo_step(model_cfg: ModelConfig, tx: optax.GradientTransformation, cfg: PPOConfig):
    """`ppo_step` jitted with the state donated, as `make_sft_step`'s (`sharding.MeshJit`)."""
    _warn_unpinned_longrope(model_cfg)
    return MeshJit(functools.partial(ppo_step, model_cfg=model_cfg, tx=tx, cfg=cfg), state_step=True)


def make_experience_fn(model_cfg: ModelConfig, cfg: PPOConfig, reward_fn: Callable | None = None,
                       out_sharding=None, samples_per_prompt: int | None = None):
    """Jitted (params, ref_params, rollout, example_idx_B) -> (Experience, metrics); `example_idx_B` holds one item
    index per rollout row (with n samples per prompt, `jnp.repeat(prompt_idx, n)`).

    `samples_per_prompt`: the rollout's n (its rows prompt-major groups of n), for the metrics' per-group figures
    (`frac_reward_zero_std`); None: GRPO/RLOO's `group_size`, PPO's with `share_prompt`, else 1. PPO sampling several
    completions per prompt without `share_prompt` logged none (session 37's Known limits): the training loop passes
    its n.

    With `reward_fn` (a `reftjax.graders.callback.HostRewardFn`) the grader runs
    inside the program through the ordered io_callback; without it, pass
    `scores_B` yourself via the returned function's `scores_B` argument.
    """
    from reftjax.graders.callback import grade_in_jit

    _warn_unpinned_longrope(model_cfg)
    # (PPO's group_size counts with share_prompt alone)
    group = samples_per_prompt or (cfg.group_size if cfg.algo != "ppo" else cfg.prompt_group)

    def experience(params, ref_params, rollout, example_idx_B, scores_B=None):
        if scores_B is None:
            if reward_fn is None:  # (failed at run time inside XLA: "'NoneType' object is not callable")
                raise ValueError("make_experience_fn was built without a reward_fn: pass scores_B")
            scores_B = grade_in_jit(reward_fn, rollout.tokens_BxN, rollout.mask_BxN, example_idx_B,
                                    out_sharding=out_sharding)
        exp = make_experience(params, ref_params, rollout, scores_B, model_cfg=model_cfg, cfg=cfg)
        return exp, experience_metrics(exp, rollout, logp_recomputed=not cfg.experience_from_rollout,
                                       with_value=cfg.algo == "ppo", group_size=group)

    return MeshJit(experience)
