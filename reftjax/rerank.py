"""Reranking: a verifier that scores sampled solutions, and rerank@k ("ReFT + reranking").

The ReFT authors (lqtrung1998/mwp_ReFT `train_reward_model.py`, `exps/paper_exps/Rerank`)
train an outcome classifier to pick one of the k = 100 solutions sampled per test question:

    data        k samples at temperature 1 from the warm-up model on every *training*
                question, deduplicated per question, labelled correct / incorrect by the
                answer grader (gold answers only: no human labels)
    model       the SFT checkpoint with a fresh classification head on the final hidden
                state of the last token (transformers' `...ForSequenceClassification`)
    training    cross-entropy, 3 epochs, AdamW lr 1e-6, grad clip 1.0
    rerank@k    among a question's samples with an extractable answer, take the one the
                verifier scores highest; accuracy = how often that one is correct

Here the head is one logit (`sigmoid` = P(correct)), which is their two-class softmax
up to parameterisation. The verifier's parameters are `{"backbone": <policy tree>,
"score": {"kernel": [D], "bias": []}}`, so the policy's sharding rules apply unchanged.
The pipeline phase (sampling, training with checkpoints) is `reftjax.train.run_rerank`;
`reftjax.evaluate.evaluate(..., verifier=...)` reports rerank@k next to voting@k on
the same samples.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import pathlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from reftjax import losses
from reftjax.checkpoint import abstract_like
from reftjax.graders.base import GraderFailure, every_one_faulted, failure_message, has_answer
from reftjax.models import ModelConfig, forward
from reftjax.sharding import MeshJit, batch_devices, replicated_like
from reftjax.steps import OptimConfig, TrainState, _apply_update

log = logging.getLogger(__name__)

CORRECT = 1.0 - 1e-6  # a grade at or above this counts as a correct answer (graders score in [0, 1])


@dataclasses.dataclass(frozen=True)
class RerankConfig:
    """The verifier phase; `epochs` 0 turns it off. Defaults: the ReFT authors' reranker.

    Deviations from their `train_reward_model.py` (a bias-free 2-class `LlamaForSequenceClassification` head on
    the re-tokenized decoded text): one logit with a bias, trained with binary cross-entropy (the same family of
    functions, but AdamW moves their two rows' difference ~2x as far per step as this kernel, and the bias moves
    too); the score is read at the row's last token, the EOS when it stopped on one (theirs decodes without
    special tokens: the last text token).

    Attributes:
      epochs: passes over the sampled training solutions (ReFT: 3). 0: no verifier, no rerank@k.
      samples_per_question: solutions sampled per training question (ReFT: 100).
      temperature: sampling temperature for those solutions (ReFT: 1.0).
      max_new_tokens: completion bucket for them; at least `eval.max_new_tokens` (`ExperimentConfig` checks),
        so the verifier trains on solutions as long as those it scores (the ReFT authors use one length).
      prompts_per_batch: training questions per sampling call (each yields `samples_per_question` rows), rounded
        up to a multiple of the mesh's batch devices (data x fsdp): 1, the default, samples one question a device.
      batch_size: verifier rows per update (global; ReFT: 3 per device x 8 GPUs).
      optim: AdamW settings (ReFT: lr 1e-6, linear decay, grad clip 1.0).
      n_questions: sample from the first n training questions only (None: all).
      dedup: drop repeated completions of a question (ReFT does).
      token_level: train the head on every completion slot, each predicting the solution's label
        (Cobbe et al. 2021's GSM8K verifiers) instead of on the last slot only (ReFT); the score used
        for reranking is the last slot's either way.
      seed: sampling and shuffling seed.
    """

    epochs: int = 0
    samples_per_question: int = 100
    temperature: float = 1.0
    max_new_tokens: int = 256
    prompts_per_batch: int = 1
    batch_size: int = 24
    optim: OptimConfig = OptimConfig(learning_rate=1e-6)
    n_questions: int | None = None
    dedup: bool = True
    token_level: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.epochs < 0 or self.samples_per_question < 1 or self.batch_size < 1 or self.prompts_per_batch < 1:
            raise ValueError("rerank: need epochs >= 0 and samples_per_question, batch_size, prompts_per_batch >= 1")
        if not 0 < self.temperature < float("inf"):
            raise ValueError(f"rerank.temperature must be > 0 and finite, got {self.temperature}")
        # (each failed after the warm-up and the evaluations before the verifier; helper review)
        if (self.n_questions is not None and self.n_questions < 1) or self.max_new_tokens < 1 or self.seed < 0:
            raise ValueError(f"rerank: need n_questions >= 1 or null, max_new_tokens >= 1 and seed >= 0; got "
                             f"{self.n_questions}, {self.max_new_tokens}, {self.seed}")
        if self.seed >= 2**32:  # (`config.check_key_seed`'s reason: jax.random.key keeps the low 32 bits)
            raise ValueError(f"rerank.seed must be < 2**32 (a JAX PRNG key keeps its low 32 bits: {self.seed} would "
                             f"sample as {self.seed % 2**32}), got {self.seed}")
        if self.optim.value_head_lr_scale != 1.0:
            raise ValueError("rerank.optim.value_head_lr_scale: the verifier trains at rerank.optim.learning_rate "
                             "throughout; leave it at 1")


# ----------------------------------------------------------------------------- the model


def init_score_head(model_cfg: ModelConfig, rng: jax.Array) -> dict:
    """A fresh score head: kernel N(0, 0.02) [D] and a zero bias, float32."""
    return {"kernel": 0.02 * jax.random.normal(rng, (model_cfg.hidden_size,), jnp.float32),
            "bias": jnp.zeros((), jnp.float32)}


def init_verifier(policy_params, model_cfg: ModelConfig, rng: jax.Array) -> dict:
    """The verifier's parameters: a copy of `policy_params` plus a fresh score head, replicated over the policy's
    mesh when it has one (left on one device, the first step on a multi-device mesh failed: incompatible devices)."""
    return {"backbone": jax.tree.map(jnp.copy, policy_params),
            "score": replicated_like(init_score_head(model_cfg, rng), policy_params)}


def abstract_verifier(policy_params, model_cfg: ModelConfig, rng: jax.Array) -> dict:
    """`init_verifier`'s shapes, dtypes and shardings without copying the backbone: what a checkpoint restores
    onto."""
    return {"backbone": abstract_like(policy_params),
            "score": abstract_like(replicated_like(init_score_head(model_cfg, rng), policy_params))}


def _joined(prompt_tokens_BxP, prompt_mask_BxP, tokens_BxN, mask_BxN):
    return (jnp.concatenate([prompt_tokens_BxP, tokens_BxN], axis=1),
            jnp.concatenate([prompt_mask_BxP.astype(bool), mask_BxN.astype(bool)], axis=1))


def completion_logits(params: dict, model_cfg: ModelConfig, prompt_tokens_BxP, prompt_mask_BxP, tokens_BxN,
                      mask_BxN) -> jax.Array:
    """The score head on the final (normed) hidden state of every completion slot: [B, N] float32 logits.

    Slot t has seen the prompt and completion tokens 0..t (causal attention), so its logit is a
    prediction of the solution's correctness from that prefix.
    """
    tokens, mask = _joined(prompt_tokens_BxP, prompt_mask_BxP, tokens_BxN, mask_BxN)
    _, hidden = forward(params["backbone"], model_cfg, tokens, mask, return_logits=False)
    h = hidden[:, prompt_tokens_BxP.shape[1]:].astype(jnp.float32)
    return h @ params["score"]["kernel"] + params["score"]["bias"]


def verifier_logits(params: dict, model_cfg: ModelConfig, prompt_tokens_BxP, prompt_mask_BxP, tokens_BxN,
                    mask_BxN) -> jax.Array:
    """Logit of P(correct) for each (left-padded prompt, right-padded completion) row: [B] float32.

    Read from the final (normed) hidden state of the row's last valid token: the EOS, or the
    last completion token when there is none (transformers' sequence classifiers do the same).
    """
    z = completion_logits(params, model_cfg, prompt_tokens_BxP, prompt_mask_BxP, tokens_BxN, mask_BxN)
    return (z * losses.last_valid_onehot(mask_BxN)).sum(axis=1)


def verifier_loss(logits_B, labels_B, weights_B) -> tuple[jax.Array, jax.Array]:
    """(weighted mean binary cross-entropy, weighted accuracy at threshold 0.5)."""
    w = weights_B.astype(jnp.float32)
    denom = jnp.maximum(w.sum(), 1.0)
    bce = optax.sigmoid_binary_cross_entropy(logits_B, labels_B.astype(jnp.float32))
    acc = ((logits_B > 0) == (labels_B > 0.5)).astype(jnp.float32)
    return (bce * w).sum() / denom, (acc * w).sum() / denom


def token_level_loss(logits_BxN, mask_BxN, labels_B, weights_B) -> jax.Array:
    """Every completion slot predicts the solution's label; BCE averaged over a row's slots, then over rows."""
    bce = optax.sigmoid_binary_cross_entropy(logits_BxN, jnp.broadcast_to(labels_B[:, None], logits_BxN.shape))
    per_row = losses.masked_mean(bce, mask_BxN, axis=1)
    w = weights_B.astype(jnp.float32)
    return (per_row * w).sum() / jnp.maximum(w.sum(), 1.0)


def verifier_step(state: TrainState, batch: dict, *, model_cfg: ModelConfig, tx: optax.GradientTransformation,
                  token_level: bool = False) -> tuple[TrainState, dict]:
    """One AdamW update of `state.params["verifier"]` on a batch of labelled solutions.

    `batch`: prompt_tokens/prompt_mask [B, P], tokens/mask [B, N], labels [B] (1 correct),
    weights [B] (0 for padding rows). A non-finite loss or gradient skips the update.
    `token_level`: train every completion slot on the label (`token_level_loss`) instead of
    the last one only; the reported accuracy is the last slot's either way.
    """
    def loss_fn(params):
        z = completion_logits(params["verifier"], model_cfg, batch["prompt_tokens"], batch["prompt_mask"],
                              batch["tokens"], batch["mask"])
        last = (z * losses.last_valid_onehot(batch["mask"])).sum(axis=1)
        loss, acc = verifier_loss(last, batch["labels"], batch["weights"])
        if token_level:
            loss = token_level_loss(z, batch["mask"], batch["labels"], batch["weights"])
        return loss, acc

    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state, m = _apply_update(state, grads, tx, loss)
    return state, {"loss": loss, "accuracy": acc, **m}


def make_verifier_step(model_cfg: ModelConfig, tx: optax.GradientTransformation, token_level: bool = False):
    """`verifier_step` jit-compiled once per batch shape, the state donated (`sharding.MeshJit`)."""
    return MeshJit(functools.partial(verifier_step, model_cfg=model_cfg, tx=tx, token_level=token_level),
                   state_step=True)


def _verifier_scores(params: dict, prompt_tokens_BxP, prompt_mask_BxP, tokens_BxN, mask_BxN, *,
                    model_cfg: ModelConfig, chunk_rows: int = 0) -> jax.Array:
    """P(correct) for each row, [B] float32 (jit-compiled once per shape).

    `chunk_rows` > 0 scores the rows in sequential chunks of gcd(B, chunk_rows) (a `lax.map`
    inside the one program), bounding the forward's activations (the training-style forward keeps
    a [rows, heads, L, L] attention matrix per layer: at voting@100 x 64 prompts that is the whole
    batch of 6,400 rows at once). Chunk c takes rows c, c + n, c + 2n, ... so every chunk spans
    all the batch's devices.
    """
    b = tokens_BxN.shape[0]
    score = lambda pt, pm, t, m: jax.nn.sigmoid(verifier_logits(params, model_cfg, pt, pm, t, m))  # noqa: E731
    rows = math.gcd(b, chunk_rows) if chunk_rows else b
    if rows == b:
        return score(prompt_tokens_BxP, prompt_mask_BxP, tokens_BxN, mask_BxN)
    n = b // rows
    split = lambda x: x.reshape(rows, n, *x.shape[1:]).swapaxes(0, 1)  # noqa: E731  [B, ...] -> [n, rows, ...]
    out = jax.lax.map(lambda xs: score(*xs), tuple(map(split, (prompt_tokens_BxP, prompt_mask_BxP, tokens_BxN,
                                                              mask_BxN))))
    return out.swapaxes(0, 1).reshape(b)


verifier_scores = MeshJit(_verifier_scores, static_argnames=("model_cfg", "chunk_rows"))


# ----------------------------------------------------------------------------- selection (host)


def pick(scores: Sequence[float], answerable: Sequence[bool]) -> int | None:
    """Index of the highest-scoring sample among those with an extractable answer (first on ties), or None."""
    best, best_i = -np.inf, None
    for i, (s, ok) in enumerate(zip(scores, answerable)):
        if ok and s > best:
            best, best_i = s, i
    return best_i


def rerank_correct(scores: Sequence[float], grades, letters_only: bool = False) -> bool:
    """Whether the verifier's pick among one question's graded samples is correct (ReFT's rerank@k).

    `letters_only` (MathQA): only a one-letter answer may be picked, as the authors' `evaluate_rerank` keeps
    (their voting, and `majority_correct`, let any one-character answer vote)."""
    i = pick(scores, [has_answer(g) and (not letters_only or str(g.extracted).isalpha()) for g in grades])
    return i is not None and grades[i].score >= CORRECT


def any_correct(grades) -> bool:
    """The reranking upper bound for one question (pass@k): some sample is correct."""
    return any(g.score >= CORRECT for g in grades)


# ----------------------------------------------------------------------------- training data


@dataclasses.dataclass
class VerifierData:
    """Labelled solutions as host arrays: prompts left-padded to one length, completions right-padded."""

    prompt_tokens: np.ndarray  # [M, P] int32
    prompt_mask: np.ndarray    # [M, P] bool
    tokens: np.ndarray         # [M, N] int32
    mask: np.ndarray           # [M, N] bool
    labels: np.ndarray         # [M] float32 (1 correct)
    example_idx: np.ndarray    # [M] int32

    def __len__(self) -> int:
        return len(self.labels)

    def save(self, path) -> None:
        """Write atomically (a temporary file renamed into place)."""
        path = pathlib.Path(path)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **dataclasses.asdict(self))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path) -> "VerifierData":
        with np.load(path) as z:
            return cls(**{f.name: z[f.name] for f in dataclasses.fields(cls)})

    def batches(self, batch_size: int, seed: int):
        """One shuffled epoch of fixed-size batches; the last is padded with weight-0 rows."""
        order = np.random.default_rng(seed).permutation(len(self))
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            n = len(idx)
            full = np.concatenate([idx, np.full(batch_size - n, idx[0])])
            yield {"prompt_tokens": self.prompt_tokens[full], "prompt_mask": self.prompt_mask[full],
                   "tokens": self.tokens[full], "mask": self.mask[full], "labels": self.labels[full],
                   "weights": (np.arange(batch_size) < n).astype(np.float32)}


def collect(rows: list[dict], pad_id: int) -> VerifierData:
    """Stack per-call rollout rows (dicts of prompt/completion arrays) into one `VerifierData`.

    Prompts come from different length buckets: each is left-padded to the longest.
    """
    if not rows:
        raise ValueError("no verifier training rows were sampled")
    p = max(r["prompt_tokens"].shape[1] for r in rows)

    def left(x, fill):
        return np.pad(x, ((0, 0), (p - x.shape[1], 0)), constant_values=fill)

    cat = lambda key, fn=lambda x: x: np.concatenate([fn(r[key]) for r in rows])  # noqa: E731
    return VerifierData(prompt_tokens=cat("prompt_tokens", lambda x: left(x, pad_id)).astype(np.int32),
                        prompt_mask=cat("prompt_mask", lambda x: left(x, 0)).astype(bool),
                        tokens=cat("tokens").astype(np.int32), mask=cat("mask").astype(bool),
                        labels=cat("labels").astype(np.float32), example_idx=cat("example_idx").astype(np.int32))


def dedup_rows(texts: Sequence[str], groups: Sequence[int]) -> list[int]:
    """Indices of the first occurrence of each (group, text) pair, in order."""
    seen, keep = set(), []
    for i, (t, g) in enumerate(zip(texts, groups)):
        if (g, t) not in seen:
            seen.add((g, t))
            keep.append(i)
    return keep


def sample_verifier_data(policy_params, model_cfg: ModelConfig, tokenizer, ds, items: Sequence[dict], grader,
                         cfg: RerankConfig, *, mesh=None, eos_ids=(), pad_id: int = 0, progress=None,
                         stop_sequences=()) -> VerifierData:
    """`cfg.samples_per_question` solutions per question of `ds` from `policy_params`, graded and labelled.

    Prompts are batched by the prompt loader (its length buckets; a padded last batch is dropped
    from the result), so sampling compiles `rollout` once per prompt bucket.
    """
    from reftjax.data import Loader, LoaderConfig
    from reftjax.rollout import SamplingConfig, decode_tokens, rollout
    from reftjax.sharding import object_from_process_0, to_host

    # whole rows on each device of the batch axes (a prompts_per_batch they did not divide was refused: on a mesh the
    # default 1 had to be raised by hand; helper review, session 42)
    shards = batch_devices(mesh)
    per_call = -(-cfg.prompts_per_batch // shards) * shards
    if per_call != cfg.prompts_per_batch:
        log.info("rerank: %d questions per sampling call (rerank.prompts_per_batch %d rounded up to a multiple of the "
                 "%d devices of the mesh's batch axes)", per_call, cfg.prompts_per_batch, shards)
    loader = Loader(ds, LoaderConfig(batch_size=per_call, kind="prompt", shuffle=False,
                                     drop_last=False, num_epochs=1), mesh=mesh)
    k = cfg.samples_per_question
    samp = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, n=k,
                          eos_ids=tuple(eos_ids) or tuple(model_cfg.eos_token_ids), pad_id=pad_id,
                          stop_sequences=stop_sequences)
    rows, n_seen = [], 0
    for i, batch in enumerate(loader):
        if cfg.n_questions is not None and n_seen >= cfg.n_questions:
            break
        out = rollout(policy_params, batch["prompt_tokens"], batch["prompt_mask"],
                      jax.random.fold_in(jax.random.key(cfg.seed), i), model_cfg=model_cfg, cfg=samp)
        valid, idx = to_host((batch["valid"], batch["example_idx"]))
        host = to_host({"prompt_tokens": out.prompt_tokens_BxP, "prompt_mask": out.prompt_mask_BxP,
                        "tokens": out.tokens_BxN, "mask": out.mask_BxN, "lengths": out.lengths_B})
        texts = decode_tokens(tokenizer, host["tokens"], host.pop("lengths"),  # one copy to the host, not two
                              stop_sequences=samp.stop_sequences)
        keep = [j for j in range(len(texts)) if valid[j // k]]
        if cfg.n_questions is not None:
            keep = [j for j in keep if n_seen + j // k < cfg.n_questions]
        n_seen += len({j // k for j in keep})
        if cfg.dedup:
            keep = [keep[t] for t in dedup_rows([texts[j] for j in keep], [j // k for j in keep])]
        # graded in process 0 alone, its grades on every process (each feeds its share of every verifier batch;
        # a judge got every process's requests)
        grades = object_from_process_0(lambda: grader.grade_batch([items[idx[j // k]] for j in keep],
                                                                  [texts[j] for j in keep]))
        broken = every_one_faulted(grades)
        if broken is not None:
            # labels of 0 for every sample of a batch (a judge down): the verifier would learn them, and the data is
            # saved once for good (session 43)
            raise GraderFailure(failure_message(
                f"verifier data, prompt batch {i + 1}", f"{len(grades)} samples", broken,
                "stopped before the data is saved, which would have labelled them all wrong",
                "the run resumes and samples the verifier data again"))
        rows.append({**{key: v[keep] for key, v in host.items()},
                     "labels": np.array([g.score >= CORRECT for g in grades], np.float32),
                     "example_idx": np.array([idx[j // k] for j in keep], np.int32)})
        if progress is not None:
            progress.update(len({j // k for j in keep}))
    return collect(rows, pad_id)
