"""`rollout`: batched sampling with a KV cache, entirely inside XLA.

    prompts [B, P] (left-padded) --prefill--> caches [L x (keys B*n,kv,hd,S; values B*n,kv,S,hd)]
    (the prefill's weight GEMMs run on the real prompt tokens only: `models.packed_prefill`)
    lax.while_loop per decode stretch (`decode_segments`; S = P + the stretch's last step,
    caches grown between stretches; each exits once every row is done):
        sample token_i from logits (greedy / temperature / top-k / top-p)
        record token_i, its log-prob and mask_i = not done_before_i
        done |= token_i in eos_ids or a stop sequence just completed
        decode_step(token_i) at slot P+i -> logits for token_{i+1}

Completion layout (right-padded, mask covers tokens up to and including EOS):

    tokens:  t0  t1  t2  EOS pad pad
    mask:     1   1   1   1   0   0

Static: model config, sampling config (incl. N = `max_new_tokens` and n
samples per prompt) and the input shapes. Prompt lengths come from a few
buckets and batch sizes are fixed by the caller, so a run compiles a handful of
times; `compile_count()` reports how many. The decode loop touches the host
never: no callbacks, no Python loop over tokens.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from reftjax import models
from reftjax.models import KVCache, ModelConfig, ValueHead, decode_step, unstack_layers
from reftjax.sharding import MeshJit, constrain_batch, current_mesh, logical_to_spec, mesh_of

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How completions are sampled (hashable: a static argument of `rollout`).

    Attributes:
      max_new_tokens: completion buffer length N (a bucket; the loop may stop earlier).
      temperature: softmax temperature (ReFT: 1.0).
      top_k: keep the k most likely tokens (0, or k >= the vocabulary: off; ReFT: 0).
      top_p: nucleus threshold (1.0: off; ReFT: 1.0).
      greedy: argmax decoding (evaluation top-1); overrides the three above.
      n: samples per prompt; rows come out prompt-major (p0s0, p0s1, ..., p1s0, ...).
      eos_ids: token ids that end a completion (included in it, mask 1).
      stop_sequences: token-id sequences that also end a completion (included).
      pad_id: written after the end of a completion.
      decode_segments: the decode loop runs as this many loops over consecutive stretches of
        the N steps, each attending over a KV cache only as long as its stretch needs
        (prompt + tokens so far, rounded up to the stretch's end) instead of the whole
        P + N: less attention memory traffic per step, one more compiled loop body each.
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    n: int = 1
    eos_ids: tuple[int, ...] = ()
    stop_sequences: tuple[tuple[int, ...], ...] = ()
    pad_id: int = 0
    decode_segments: int = 1

    def __post_init__(self):
        # tuples (a jit static argument must hash; lists from Python or JSON did not), and checked: an empty stop
        # sequence "matched" at every step (every completion one token long)
        object.__setattr__(self, "eos_ids", tuple(self.eos_ids))
        object.__setattr__(self, "stop_sequences", tuple(tuple(q) if isinstance(q, (list, tuple)) else q
                                                         for q in self.stop_sequences))
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in self.eos_ids):
            raise ValueError(f"eos_ids must be token ids (ints), got {self.eos_ids!r}")
        if not all(isinstance(q, tuple) and q and all(isinstance(i, int) for i in q) for q in self.stop_sequences):
            raise ValueError(f"stop_sequences must be non-empty sequences of token ids, e.g. ((198, 198),), got "
                             f"{self.stop_sequences!r}")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if not self.greedy and not 0 < self.temperature < float("inf"):  # (NaN passed `<= 0`: every token 0)
            raise ValueError(f"temperature must be > 0 and finite (use greedy=True for argmax), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0 or self.n < 1:
            raise ValueError("top_k must be >= 0 and n >= 1")
        if not 1 <= self.decode_segments <= self.max_new_tokens:
            raise ValueError(f"decode_segments must be in [1, max_new_tokens], got {self.decode_segments}")

    def segment_ends(self) -> tuple[int, ...]:
        """Step counts at which each decode stretch ends (the last is max_new_tokens)."""
        n, k = self.max_new_tokens, self.decode_segments
        return tuple(-(-n * (j + 1) // k) for j in range(k))


@flax.struct.dataclass
class Rollout:
    """Sampled completions; rows are prompt-major (`prompt_index` says which prompt).

    Attributes:
      prompt_tokens_BxP, prompt_mask_BxP: the (repeated) left-padded prompts.
      tokens_BxN: completion tokens, right-padded with pad_id.
      logprobs_BxN: log-prob of each sampled token under the sampling
        distribution (softmax of logits / temperature; top-k/top-p truncation is
        not renormalised in, as in vLLM/TRL). At temperature 1 this equals the
        policy's teacher-forced log-prob, which PPO uses as `logp_old`.
      mask_BxN: 1 for completion tokens up to and including the stop token.
      lengths_B: number of completion tokens (sum of mask).
      finished_B: True when the row stopped on EOS / a stop sequence.
      prompt_index_B: index of the prompt (0..B/n-1) each row was sampled from.
      values_BxN: the critic's value before each completion token (0 after the stop), when
        `rollout` was given a `value_head`; else None. Same hidden states as a
        teacher-forced forward, so PPO can take its old values from here
        (`PPOConfig.experience_from_rollout`) instead of a second forward pass.
      sampling: the `SamplingConfig` it was drawn with (static, not an array): `make_experience` checks it
        against the update's settings (temperature, group size); None for a Rollout built by hand.
    """

    prompt_tokens_BxP: jax.Array
    prompt_mask_BxP: jax.Array
    tokens_BxN: jax.Array
    logprobs_BxN: jax.Array
    mask_BxN: jax.Array
    lengths_B: jax.Array
    finished_B: jax.Array
    prompt_index_B: jax.Array
    values_BxN: Any = None
    sampling: Any = flax.struct.field(pytree_node=False, default=None)


def _token_logprob(scaled_BxV: jax.Array, tok_B: jax.Array) -> jax.Array:
    """log softmax(scaled)[tok] without materialising the [B, V] log-probs (same formula as log_softmax)."""
    m = jnp.max(scaled_BxV, axis=-1, keepdims=True)
    lse = jnp.log(jnp.sum(jnp.exp(scaled_BxV - m), axis=-1))
    return (jnp.take_along_axis(scaled_BxV, tok_B[:, None], axis=-1) - m)[:, 0] - lse


def _argmax(x_BxV: jax.Array) -> jax.Array:
    """First index of the row maximum (as jnp.argmax) via two plain reductions.

    XLA:CPU lowers argmax to a variadic (value, index) reduce that does not
    vectorise; max + masked min over an iota does, ~5x faster over a 49k vocab.
    """
    m = jnp.max(x_BxV, axis=-1, keepdims=True)
    iota = jax.lax.broadcasted_iota(jnp.int32, x_BxV.shape, 1)
    return jnp.min(jnp.where(x_BxV == m, iota, x_BxV.shape[-1]), axis=-1)


def sample_logits(logits_BxV: jax.Array, rng: jax.Array, cfg: SamplingConfig):
    """Draw one token per row; return (tokens_B, logprobs_B)."""
    logits = logits_BxV.astype(jnp.float32)
    if cfg.greedy:
        tok = _argmax(logits)
        return tok, _token_logprob(logits, tok)
    scaled = logits / cfg.temperature
    masked = scaled
    if 0 < cfg.top_k < scaled.shape[-1]:  # k >= the vocabulary keeps every token (as transformers clamps it)
        kth = jax.lax.top_k(scaled, cfg.top_k)[0][:, -1:]
        masked = jnp.where(scaled < kth, -jnp.inf, masked)
    if cfg.top_p < 1.0:
        # Smallest set of tokens whose probability reaches top_p (the first always kept), cut by sorted
        # position: of tokens tied at the boundary only those the stable sort puts first are kept (HF, vLLM).
        order = jnp.argsort(-masked, axis=-1, stable=True)
        probs = jax.nn.softmax(jnp.take_along_axis(masked, order, axis=-1), axis=-1)
        keep_sorted = jnp.cumsum(probs, axis=-1) - probs < cfg.top_p
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(masked.shape[0])[:, None], order].set(keep_sorted)
        masked = jnp.where(keep, masked, -jnp.inf)
    tok = jax.random.categorical(rng, masked, axis=-1).astype(jnp.int32)
    return tok, _token_logprob(scaled, tok)


def _stopped(tokens_BxN, step, tok_B, cfg: SamplingConfig):
    hit = jnp.isin(tok_B, jnp.asarray(cfg.eos_ids, jnp.int32)) if cfg.eos_ids else jnp.zeros_like(tok_B, bool)
    for seq in cfg.stop_sequences:
        n = len(seq)
        start = jnp.maximum(step - n + 1, 0)
        window = jax.lax.dynamic_slice_in_dim(tokens_BxN, start, n, axis=1) if n <= tokens_BxN.shape[1] else None
        if window is None:
            continue
        hit |= jnp.all(window == jnp.asarray(seq, jnp.int32)[None, :], axis=1) & (step >= n - 1)
    return hit


@flax.struct.dataclass
class _LoopState:
    step: jax.Array
    done_B: jax.Array
    logits_BxV: jax.Array
    hidden_BxD: jax.Array
    tokens_BxN: jax.Array
    logprobs_BxN: jax.Array
    values_BxN: jax.Array
    mask_BxN: jax.Array
    key_valid_BxS: jax.Array
    caches: list
    rng: jax.Array


def _rollout(params, prompt_tokens_BxP, prompt_mask_BxP, rng, value_head, model_cfg: ModelConfig,
             cfg: SamplingConfig, packed_prefill: bool):
    n_new = cfg.max_new_tokens
    ends = cfg.segment_ends()
    rep = lambda x: jnp.repeat(x, cfg.n, axis=0)  # noqa: E731  prompt-major rows: prompt i -> rows i*n .. i*n+n-1
    tokens, pmask = rep(prompt_tokens_BxP), rep(prompt_mask_BxP.astype(jnp.int32))
    b, p = tokens.shape
    # One weight copy per rollout; the barrier stops XLA from sinking the slices
    # into the loop body (which would copy every layer's weights every step).
    layer_params = jax.lax.optimization_barrier(unstack_layers(params, model_cfg))
    # The n samples of a prompt share its prefill: run it once per prompt and repeat the rows
    # (last logits, last hidden state, KV caches), n-fold fewer prefill FLOPs than prefilling
    # the repeated prompts. The caches start as long as the first decode stretch needs.
    if packed_prefill:
        logits, last_hidden, caches = models.packed_prefill(
            params, layer_params, model_cfg, prompt_tokens_BxP, prompt_mask_BxP.astype(jnp.int32), p + ends[0])
    else:
        logits, hidden, caches = models.prefill(params, model_cfg, prompt_tokens_BxP,
                                                prompt_mask_BxP.astype(jnp.int32), cache_len=p + ends[0])
        last_hidden = hidden[:, -1, :]
    # n-fold rows over the mesh's batch axes: prompts sliced for a voting rollout arrive whole on every device,
    # and without this every device held the whole n-fold KV cache (7B voting@100: ~150 GiB a device)
    tokens, pmask = constrain_batch(tokens), constrain_batch(pmask)
    logits, last_hidden, caches = jax.tree.map(lambda x: constrain_batch(rep(x)), (logits, last_hidden, caches))
    value_of = (lambda h: ValueHead().apply({"params": value_head}, h)) if value_head is not None else None
    prompt_len = jnp.sum(pmask, axis=1)
    key_valid = jnp.concatenate([pmask.astype(bool), jnp.zeros((b, ends[0]), bool)], axis=1)

    def body(st: _LoopState):
        rng, sub = jax.random.split(st.rng)
        tok, logp = sample_logits(st.logits_BxV, sub, cfg)
        tok = jnp.where(st.done_B, cfg.pad_id, tok)
        col = lambda buf, val: jax.lax.dynamic_update_slice_in_dim(buf, val[:, None], st.step, axis=1)  # noqa: E731
        out_tokens = col(st.tokens_BxN, tok)
        out_logp = col(st.logprobs_BxN, jnp.where(st.done_B, 0.0, logp))
        out_values = st.values_BxN
        if value_of is not None:  # the value before this token, from the hidden state that gave its logits
            out_values = col(out_values, jnp.where(st.done_B, 0.0, value_of(st.hidden_BxD)))
        out_mask = col(st.mask_BxN, (~st.done_B).astype(jnp.int32))
        done = st.done_B | _stopped(out_tokens, st.step, tok, cfg)
        slot = p + st.step
        key_valid = jax.lax.dynamic_update_slice_in_dim(st.key_valid_BxS, jnp.ones((b, 1), bool), slot, axis=1)
        logits, hidden, caches = decode_step(params, layer_params, model_cfg, tok, prompt_len + st.step,
                                             st.caches, slot, key_valid)
        hidden = hidden if value_of is not None else st.hidden_BxD  # carried only for the critic
        return _LoopState(st.step + 1, done, logits, hidden, out_tokens, out_logp, out_values, out_mask, key_valid,
                          caches, rng)

    init = _LoopState(
        step=jnp.zeros((), jnp.int32), done_B=jnp.zeros((b,), bool), logits_BxV=logits,
        hidden_BxD=last_hidden if value_of is not None else jnp.zeros((b, 0), last_hidden.dtype),
        tokens_BxN=jnp.full((b, n_new), cfg.pad_id, jnp.int32), logprobs_BxN=jnp.zeros((b, n_new), jnp.float32),
        values_BxN=jnp.zeros((b, n_new if value_of is not None else 0), jnp.float32),
        mask_BxN=jnp.zeros((b, n_new), jnp.int32), key_valid_BxS=key_valid, caches=caches, rng=rng)
    final = init
    for j, end in enumerate(ends):  # stretch j attends over a cache of P + end slots
        if j:
            grow = end - ends[j - 1]
            final = final.replace(
                key_valid_BxS=jnp.pad(final.key_valid_BxS, ((0, 0), (0, grow))),
                caches=[KVCache(jnp.pad(c.k, ((0, 0), (0, 0), (0, 0), (0, grow))),
                                jnp.pad(c.v, ((0, 0), (0, 0), (0, grow), (0, 0)))) for c in final.caches])
        final = jax.lax.while_loop(lambda st, end=end: (st.step < end) & ~jnp.all(st.done_B), body, final)
    return Rollout(
        prompt_tokens_BxP=tokens, prompt_mask_BxP=pmask, tokens_BxN=final.tokens_BxN,
        logprobs_BxN=final.logprobs_BxN, mask_BxN=final.mask_BxN, lengths_B=jnp.sum(final.mask_BxN, axis=1),
        finished_B=final.done_B, prompt_index_B=jnp.repeat(jnp.arange(prompt_tokens_BxP.shape[0]), cfg.n),
        values_BxN=final.values_BxN if value_of is not None else None, sampling=cfg)


_UNSTOPPED: list = []  # (warned once: a rollout without any EOS id for a model that has some)
_rollout_jit = MeshJit(_rollout, static_argnames=("model_cfg", "cfg", "packed_prefill"))  # traced under the mesh


def _split_across_devices(x) -> bool:
    return (isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and len(x.sharding.device_set) > 1
            and not x.sharding.is_fully_replicated)


def _rows_split(params, prompts_BxP) -> bool:
    """Whether the prompt rows are (or will be, `constrain_batch`) split over the devices of a mesh's batch axes. The
    packed prefill gathers tokens across rows, so it ran whole on every device for prompts given whole (NumPy, as
    `left_pad` returns them): 4.7x the padded, split prefill's time on a data=8 CPU mesh (tunix-migrant review,
    session 38)."""
    if _split_across_devices(prompts_BxP):
        return True
    mesh = mesh_of(params) or current_mesh()  # (inside a caller's jax.jit: its activation mesh)
    return mesh is not None and mesh.size > 1 and logical_to_spec(P("batch"), prompts_BxP.shape[:1], mesh) != P()


def rollout(params, prompt_tokens_BxP, prompt_mask_BxP, rng, *, model_cfg: ModelConfig,
            cfg: SamplingConfig, value_head=None) -> Rollout:
    """Sample `cfg.n` completions for each left-padded prompt (jit-compiled, sharding-agnostic).

    Params and prompts may be sharded (NamedSharding over a mesh: batch rows
    over the data axes); the n-fold rows, their KV caches and the outputs are split
    over the mesh's batch axes (also when the prompts arrive whole on every device).
    With `value_head` (the PPO critic's params) the rollout also returns the
    critic's values of every completion position (`Rollout.values_BxN`): one
    [B, D] x [D] product per step, instead of a second full forward later.
    Prompts on one device are prefilled without their padding (`models.packed_prefill`:
    it gathers tokens across rows); on a mesh whose batch axes split the prompt rows
    (whether the prompts arrive split, whole or as NumPy) the padded prefill runs,
    each device on its own rows.
    """
    if isinstance(params, dict) and "policy" in params and "layers" not in params:
        raise ValueError("rollout samples from the policy's params: pass state.params['policy'], not the trainable "
                         f"tree (keys {sorted(params)})")
    _check_left_padded(prompt_mask_BxP)
    if not (cfg.eos_ids or cfg.stop_sequences or _UNSTOPPED) and model_cfg.eos_token_ids:
        _UNSTOPPED.append(True)  # (once per process)
        log.warning("rollout: SamplingConfig has no eos_ids (nor stop_sequences): every completion runs the whole "
                    "%d tokens, on past the model's EOS %s, and is graded and trained on so; pass "
                    "eos_ids=model_cfg.eos_token_ids (generate and the training loop do), or keep them empty on "
                    "purpose to force the length", cfg.max_new_tokens, tuple(model_cfg.eos_token_ids))
    packed = not _rows_split(params, prompt_tokens_BxP)
    return _rollout_jit(params, prompt_tokens_BxP, prompt_mask_BxP, rng, value_head, model_cfg=model_cfg, cfg=cfg,
                        packed_prefill=packed)


def _check_left_padded(mask_BxP) -> None:
    """Refuses a concrete prompt mask with padding after a real token (right padding, a tokenizer's default):
    those rows would decode on from pad positions, silently. A traced mask (inside jit) is the caller's to check;
    a mask split over several processes is checked where it is built (the loader left-pads). A mask still being
    computed on the device is waited for: skipping those made the check depend on timing (a right-padded mask
    raised on one call and decoded silently on the next; regression review, session 34)."""
    if isinstance(mask_BxP, jax.core.Tracer) or not getattr(mask_BxP, "is_fully_addressable", True):
        return
    m = np.asarray(mask_BxP).astype(bool)
    bad = np.flatnonzero((m[:, :-1] & ~m[:, 1:]).any(axis=1)) if m.ndim == 2 else []
    if len(bad):
        raise ValueError(f"rollout: prompt rows {bad[:5].tolist()} are not left-padded (padding after a real token): "
                         f"set tokenizer.padding_side = 'left' or build the batch with rollout.left_pad")


def compile_count() -> int:
    """How many programs `rollout` holds in this process: JAX's dispatch-cache entries, at least the programs
    compiled and now and then one more for the same program (`MeshJit`); `xla_cache.CompileStats` counts compiles
    exactly (the training loop's `iteration_programs`)."""
    return _rollout_jit._cache_size()


def completion_buckets(max_new_tokens: int, count: int) -> tuple[int, ...]:
    """`count` completion lengths up to `max_new_tokens`, evenly spaced, rounded up to multiples of 8."""
    if count < 1:
        raise ValueError(f"completion bucket count must be >= 1, got {count}")
    return tuple(sorted({min(max_new_tokens, -(-max_new_tokens * k // count) + 7 & ~7) for k in range(1, count + 1)}))


def trim_to_bucket(ro: Rollout, buckets: Sequence[int]) -> Rollout:
    """`ro` with its completion axis cut to the smallest bucket that holds every row's completion.

    The rollout's arrays are [B, max_new_tokens] however early the rows stopped; whatever
    runs on them next (experience forwards, PPO epochs) then pays for the padding. After the
    cut it runs on [B, bucket] (one compiled program per bucket). Only masked slots are
    dropped (after every row's stop token), so losses, GAE and whitening are unchanged.
    Reads the longest completion on the host: one scalar, between programs.
    """
    n = ro.tokens_BxN.shape[1]
    longest = int(jax.device_get(jnp.max(ro.lengths_B)))
    length = bucket(max(longest, 1), [b for b in buckets if b < n] + [n])
    if length == n:
        return ro
    # (static bounds: `x[:, :length]` sent the bound to the device and ran a dynamic slice, an implicit transfer
    # that `jax.transfer_guard("disallow")` refuses; recompile/host-sync audit, session 35)
    cut = lambda x: None if x is None else jax.lax.slice_in_dim(x, 0, length, axis=1)  # noqa: E731
    return ro.replace(tokens_BxN=cut(ro.tokens_BxN), logprobs_BxN=cut(ro.logprobs_BxN), mask_BxN=cut(ro.mask_BxN),
                      values_BxN=cut(ro.values_BxN))


# ----------------------------------------------------------------------------- host-side convenience


def bucket(length: int, buckets: Sequence[int]) -> int:
    """The smallest of `buckets` that holds `length`: pad prompts (or sequences) to it, so a jitted function
    compiles once per bucket rather than once per length."""
    for b in sorted(buckets):
        if length <= b:
            return b
    raise ValueError(f"length {length} exceeds the largest bucket {max(buckets)}")


def left_pad(rows: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists to [len(rows), length] with a 0/1 mask."""
    tokens = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        if len(r) > length:
            raise ValueError(f"row {i} has {len(r)} tokens > {length}")
        if len(r):
            tokens[i, length - len(r):] = r
            mask[i, length - len(r):] = 1
    return tokens, mask


def encode_prompts(tokenizer, texts: Sequence[str], chat: bool, bos: bool | None = None,
                   chat_template_kwargs: dict | None = None) -> list[list[int]]:
    """Token ids of prompts: one user turn of the chat template (with `chat_template_kwargs`, the run's
    `data.prompt.chat_template_kwargs`), as training encodes it, or the plain text after the BOS when `bos` says so
    (`PromptConfig.bos`: None, when the tokenizer's own encoding adds one). Plain text that spells a special token
    stays a control token here, deliberately (a template typed by hand); training keeps such text text."""
    from reftjax.data.prompts import PromptConfig, prompt_bos, render_chat

    if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, dict):
        raise ValueError(f"chat_template_kwargs: expected a dict such as {{'enable_thinking': False}}, "
                         f"got {chat_template_kwargs!r}")
    if chat_template_kwargs and not chat:
        raise ValueError("chat_template_kwargs are the chat template's variables: chat=False renders no template")
    if chat:
        kwargs = PromptConfig("chat", chat_template_kwargs=dict(chat_template_kwargs or {})).template_kwargs  # checked
        return [list(render_chat(tokenizer, [{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True,
                                 return_dict=False, **kwargs)) for t in texts]
    first = prompt_bos(tokenizer, PromptConfig(bos=bos))
    return [([first] if first is not None else []) + list(tokenizer(t, add_special_tokens=False)["input_ids"])
            for t in texts]


def decode_completions(tokenizer, r: Rollout, skip_special_tokens: bool = True, stop_sequences=()) -> list[str]:
    from reftjax.sharding import to_host

    tokens, lengths = to_host((r.tokens_BxN, r.lengths_B))  # whole batch, also across processes
    return decode_tokens(tokenizer, tokens, lengths, skip_special_tokens, stop_sequences)


def without_stop(ids: list[int], stop_sequences=()) -> list[int]:
    """`ids` without a configured stop sequence it ends with. The rollout keeps the stop tokens (sampled actions,
    mask 1), but its text is not part of the answer: a grader reading `"... is: 42\n\nQuestion:"` found no number.
    When several end it (`"Question:"` and `"\n\nQuestion:"`), the longest goes, whatever order they are listed in."""
    for q in sorted(stop_sequences, key=len, reverse=True):
        if len(q) <= len(ids) and tuple(ids[len(ids) - len(q):]) == tuple(q):
            return ids[:len(ids) - len(q)]
    return ids


def decode_tokens(tokenizer, tokens_BxN: np.ndarray, lengths_B: np.ndarray,
                  skip_special_tokens: bool = True, stop_sequences=()) -> list[str]:
    """Texts of completions already on the host: row i's first `lengths_B[i]` tokens, less a final stop sequence."""
    return tokenizer.batch_decode([without_stop(tokens_BxN[i, :lengths_B[i]].tolist(), stop_sequences)
                                   for i in range(len(lengths_B))], skip_special_tokens=skip_special_tokens)


_GENERATE_CALLS = itertools.count()  # generate()'s default keys: fold_in(key(0), call number)


def generate(params, model_cfg: ModelConfig, tokenizer, texts: Sequence[str], *, cfg: SamplingConfig | None = None,
             chat: bool = True, rng: jax.Array | None = None, prompt_buckets: Sequence[int] = (64, 128, 256, 512),
             batch_size: int | None = None, mesh=None, bos: bool | None = None,
             chat_template_kwargs: dict | None = None) -> list[str]:
    """Text in, text out: tokenize (chat template or raw), bucket, `rollout`, detokenize.

    `chat=False` encodes the text as the plain prompt styles do, after a BOS per `bos` (`PromptConfig.bos`: None
    when the tokenizer's own encoding adds one; pass the run's `data.prompt.bos` for a policy trained with another).
    `chat_template_kwargs`: the chat template's variables (`data.prompt.chat_template_kwargs`, e.g.
    ``{"enable_thinking": False}`` for Qwen3).

    Texts run `batch_size` at a time (default: all at once), each batch padded to `batch_size` rows, so one compiled
    program serves every batch and every call with the same sizes (more texts than `batch_size` ran as one batch
    of all of them: a new program per count). Returns len(texts) * cfg.n strings.
    Without `rng`, call k of this process samples with `fold_in(key(0), k)`: a script's calls draw
    fresh samples each time and the same ones on a rerun (one fixed key repeated every sample).
    `cfg` defaults to greedy decoding; a `cfg` without `eos_ids` gets the model's EOS ids and the
    tokenizer's pad id (to generate past the EOS, call `rollout` directly). A final stop sequence
    (`cfg.stop_sequences`) is not in the returned text, as graders and evaluation read it. With `mesh`, rows are
    padded to a multiple of the devices of its batch axes, and each process places its own shards of them (every
    process passes the same texts).
    """
    eos = tuple(model_cfg.eos_token_ids) or ((tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ())
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    cfg = cfg or SamplingConfig(greedy=True)
    if not cfg.eos_ids:
        cfg = dataclasses.replace(cfg, eos_ids=eos, pad_id=pad)
    if len(texts) == 0:  # (`not texts` raised for a NumPy array or a pandas Series of texts)
        return []
    ids = encode_prompts(tokenizer, texts, chat, bos, chat_template_kwargs)
    if empty := [i for i, r in enumerate(ids) if not r]:  # nothing to condition on: the first token's log-prob
        raise ValueError(f"generate: texts {empty[:5]} encode to no tokens (chat=False adds no template)")  # undefined
    length = bucket(max(len(r) for r in ids), prompt_buckets)
    bsz = batch_size or len(ids)
    if mesh is not None:  # whole rows per device of the batch axes (fewer texts than devices failed to shard)
        from reftjax.sharding import batch_devices

        shards = batch_devices(mesh)
        bsz = -(-bsz // shards) * shards
    if rng is None:
        rng = jax.random.fold_in(jax.random.key(0), next(_GENERATE_CALLS))
    texts_out = []
    for c, start in enumerate(range(0, len(ids), bsz)):
        part = ids[start:start + bsz]
        tokens, mask = left_pad(list(part) + [part[0]] * (bsz - len(part)), length, pad)
        if mesh is not None:  # global rows: `shard_batch` reads its input as this process's rows (N copies on N)
            from reftjax.sharding import batch_sharding, put

            tokens, mask = put((tokens, mask), (batch_sharding(mesh, 2),) * 2)
        out = rollout(params, tokens, mask, rng if c == 0 else jax.random.fold_in(rng, c), model_cfg=model_cfg,
                      cfg=cfg)
        texts_out += decode_completions(tokenizer, out, stop_sequences=cfg.stop_sequences)[: len(part) * cfg.n]
    return texts_out
