"""The bridge from jitted rollout code to the host graders.

Inside `jax.jit`, `grade_in_jit(host_fn, completion_ids_BxT, completion_mask_BxT, example_idx_B)`
returns `rewards_B` (float32). On the host, `HostRewardFn` decodes each row up to its mask,
looks up the reference item by `example_idx`, grades the batch (P-CoT in parallel in the sandbox
pool), applies the optional reward-hacking guards, and keeps a record of the batch for logging:

    reward_fn = make_reward_fn(grader, items, tokenizer, guards=GuardConfig())
    @jax.jit
    def step(...):
        ...
        rewards_B = grade_in_jit(reward_fn, ids_BxT, mask_BxT, idx_B)
    out = step(...)
    jax.block_until_ready(out)          # see the deadlock note below
    reward_fn.last.grades, reward_fn.last.counters, reward_fn.totals   # per-row info to log

Why `io_callback(ordered=True)` and not `pure_callback`: `pure_callback` declares the function
pure, so XLA may drop it, run it twice (e.g. under `jax.checkpoint`/rematerialisation) or hoist
it; grading is costly (it runs programs) and has effects the trainer relies on (the `last`
record and the guard counters), so a repeated call would double-count and a dropped one would
leave stale logs. `io_callback` is never dropped or duplicated. `ordered=True` threads JAX's
runtime token through consecutive steps, so step k+1's callback cannot start before step k's
finished. That is what avoids the known deadlock: on 8 CPU devices, dispatching 100 steps of a
jitted function with this callback and collectives without waiting deadlocked with
`ordered=False` (rendezvous timeout, exit 134, in `tests/graders_callback_test.py`'s scenario)
and completes with `ordered=True` (~3 s for 100-300 steps). Blocking on each step
(`jax.block_until_ready`) also avoids it and is what an RL loop does anyway. Costs: ordered
effects forbid `vmap` of the step (grade a batch instead) and add a fraction of a ms per call
(`bench/graders.py` reports the overhead per batch).

Sharding: the callback is given no `sharding` (a NamedSharding raises NotImplementedError), so
XLA gathers the whole batch to one device, calls the host once per step with the global
`B x T` array, and the result is constrained to `out_sharding` (e.g. the batch axis of the
mesh) with `with_sharding_constraint` (or `reshard` on Explicit-axis meshes). On a mesh
(`out_sharding`'s, or the active `reftjax.sharding.activation_mesh`) the operands and the
result are replicated explicitly on the way: the same gather, without XLA's warnings.
A `HostRewardFn` never raises into XLA (raising inside a callback is undefined): any failure scores the
whole batch 0 and is recorded in `last.error`. A custom reward callable is the caller's code: one that returns
the wrong number of rewards or a non-finite one raises there, which reaches the caller as XLA's
`JaxRuntimeError` ("CpuCallback error ...") carrying the message that names the callable (`_as_rewards`).
"""
from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from jax.experimental import io_callback

from reftjax.graders.base import Grade, Grader, Item, is_fault
from reftjax.graders.guards import GuardConfig, apply_guards
from reftjax.sharding import current_mesh, place

Decode = Callable[[list[list[int]]], list[str]]


@dataclasses.dataclass(frozen=True)
class BatchRecord:
    """What the host saw and decided for the last graded batch.

    Attributes:
      texts: decoded completions, one per row.
      grades: the final `Grade` per row (after guards; `details["guards"]` lists flags).
      counters: how many rows each guard flagged in this batch, plus "graded", "unanswered" (rows the grader found
        no answer in, or whose program failed: the model's doing, scored as the grader says) and "errors" (rows
        it could not grade: the whole batch when grading raised, rows without an item, rows whose grade is a
        grader fault: `base.faulted`).
      seconds: host time spent decoding and grading this batch.
      error: set when the whole batch failed (all rewards 0).
      example_idx: each row's index into the reference items (as the rollout passed it).
    """

    texts: tuple[str, ...] = ()
    grades: tuple[Grade, ...] = ()
    counters: dict = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None
    example_idx: tuple[int, ...] = ()


def answer_rows(ids_BxT: np.ndarray, mask_BxT: np.ndarray, stop_sequences=()) -> list[list[int]]:
    """Each row's ids up to (not including) the first position where the mask is 0, less a final stop
    sequence (`rollout.without_stop`: kept in the mask for PPO, but not answer text)."""
    from reftjax.rollout import without_stop

    mask = np.asarray(mask_BxT).astype(bool)
    lengths = np.where(mask.all(axis=1), mask.shape[1], np.argmin(mask, axis=1))
    return [without_stop(np.asarray(ids_BxT[b, :n]).tolist(), stop_sequences) for b, n in enumerate(lengths)]


def decode_rows(ids_BxT: np.ndarray, mask_BxT: np.ndarray, decode: Decode, stop_sequences=()) -> list[str]:
    """The texts of `answer_rows`."""
    return list(decode(answer_rows(ids_BxT, mask_BxT, stop_sequences)))


class HostRewardFn:
    """Host side of the reward callback; see the module docstring. Thread-safe."""

    def __init__(self, grader: Grader, items: Sequence[Item], decode: Decode,
                 guards: GuardConfig | None = None, stop_sequences=(), eos_ids=()):
        self.grader, self.items, self.decode = grader, list(items), decode
        self.stop_sequences = tuple(tuple(q) for q in stop_sequences)
        self.eos_ids = frozenset(int(e) for e in eos_ids)
        self.guards = guards if guards is not None and guards.enabled else None
        self.last = BatchRecord()
        self.totals: collections.Counter = collections.Counter()
        self._lock = threading.Lock()

    def __call__(self, ids_BxT, mask_BxT, idx_B) -> np.ndarray:
        start = time.perf_counter()
        ids, mask, idx = np.asarray(ids_BxT), np.asarray(mask_BxT), np.asarray(idx_B)
        with self._lock:
            try:
                texts, grades, counters = self._grade(ids, mask, idx)
                record = BatchRecord(tuple(texts), tuple(grades), counters, example_idx=tuple(idx.tolist()))
            except Exception as exc:  # noqa: BLE001 - raising inside a callback is undefined
                grades = [Grade(0.0, error="batch failed")] * ids.shape[0]
                record = BatchRecord(grades=tuple(grades), error=f"{type(exc).__name__}: {exc}",
                                     counters={"graded": len(grades), "unanswered": 0, "errors": len(grades)},
                                     example_idx=tuple(np.ravel(idx).tolist()))
            self.last = dataclasses.replace(record, seconds=time.perf_counter() - start)
            self.totals.update(record.counters)
        return np.asarray([g.score for g in grades], np.float32)

    def _grade(self, ids: np.ndarray, mask: np.ndarray, idx: np.ndarray):
        if ids.ndim != 2 or mask.shape != ids.shape or idx.shape != ids.shape[:1]:
            raise ValueError(f"bad shapes ids {ids.shape} mask {mask.shape} idx {idx.shape}")
        rows = answer_rows(ids, mask, self.stop_sequences)
        texts = list(self.decode(rows))
        # a row without an item (a padding row's -1) scores 0; the other rows are graded as usual
        known = [r for r, i in enumerate(idx.tolist()) if 0 <= i < len(self.items)]
        graded = self.grader.grade_batch([self.items[idx[r]] for r in known], [texts[r] for r in known])
        grades = [Grade(0.0, error=f"example_idx {int(i)} is not in [0, {len(self.items)})") for i in idx]
        for r, g in zip(known, graded):
            grades[r] = g
        # the model's side (no answer to extract, a program that failed: scored by design) apart from the grader's
        # (rows it could not grade); one count of both read as a broken grader on every run (helper review)
        faults = sum(is_fault(g) for g in graded)  # (a grader's code raising, the sandbox failing)
        counters = collections.Counter(graded=len(grades), unanswered=sum(g.error is not None for g in graded) - faults,
                                       errors=len(grades) - len(known) + faults)
        if self.guards is not None:
            # tokens before a final EOS or stop sequence: a reply that stopped exactly at the token cap is not
            # `too_long` (counting its EOS flagged it as if it had been cut off)
            n_tokens = [len(r) - (1 if r and r[-1] in self.eos_ids else 0) for r in rows]
            grades, flags = apply_guards(self.guards, texts, n_tokens, grades,
                                         answer_in_text=getattr(self.grader, "answer_in_text", False))
            counters.update(flags)
        return texts, grades, dict(counters)


def text_decoder(tokenizer) -> Decode:
    """Completion ids -> the texts a grader sees: special tokens dropped.

    The rollout's completion mask keeps the EOS token (it is a sampled action with a log-probability
    and the grader's score sits on it), so decoding up to the mask with special tokens kept would
    hand the grader `"... answer is: 42<|im_end|>"`: not a number, reward 0 for every finished
    completion. Evaluation decodes the same way (`rollout.decode_completions`)."""
    return lambda rows: tokenizer.batch_decode(rows, skip_special_tokens=True)


def make_reward_fn(grader: Grader, items: Sequence[Item], decode,
                   guards: GuardConfig | None = None, validate: bool = True, stop_sequences=(),
                   eos_ids=()) -> HostRewardFn:
    """Builds the host reward function; checks the grader against the first item up front.

    `decode`: the model's tokenizer (anything with `batch_decode`; decoded through `text_decoder`, so
    special tokens such as the EOS are dropped), its bound `batch_decode` (the same), or any
    `rows -> texts` function, used as given. `stop_sequences` (the rollout's): a final one is not decoded;
    `eos_ids` (the rollout's): the guards' token count leaves a final one out, as it does a final stop sequence."""
    if hasattr(decode, "batch_decode"):
        decode = text_decoder(decode)
    elif getattr(decode, "__name__", "") == "batch_decode" and hasattr(decode, "__self__"):
        decode = text_decoder(decode.__self__)
    if validate and items:
        grader.validate(items[0])
    return HostRewardFn(grader, items, decode, guards, stop_sequences, eos_ids)


def _as_rewards(fn):
    """A custom reward callable may return any sequence of numbers: the callback must return float32 [B], finite.
    A NaN spread through the batch's whitening to every advantage and skipped every update, silently, and a
    wrong length failed as XLA's "CpuCallback error"; both now name the callable and what it returned."""
    name = getattr(fn, "__qualname__", None) or type(fn).__name__

    def call(ids, mask, idx):
        out = np.asarray(fn(ids, mask, idx), np.float32)
        if out.shape != idx.shape:
            raise ValueError(f"reward function {name} returned shape {out.shape} for {idx.shape[0]} completion rows; "
                             f"it must return one number per row")
        if not np.isfinite(out).all():
            bad = np.flatnonzero(~np.isfinite(out))
            raise ValueError(f"reward function {name} returned non-finite rewards at rows {bad[:8].tolist()} "
                             f"({out[bad[:8]].tolist()}); rewards must be finite")
        return out
    return call


def grade_in_jit(host_fn: HostRewardFn, completion_ids_BxT: jax.Array, completion_mask_BxT: jax.Array,
                 example_idx_B: jax.Array, out_sharding: jax.sharding.Sharding | None = None) -> jax.Array:
    """Grades completions from inside `jax.jit`; returns float32 rewards of shape [B].

    Args:
      host_fn: a `HostRewardFn` (any callable with the same signature works).
      completion_ids_BxT: int32 generated tokens.
      completion_mask_BxT: 1 for real tokens, 0 after EOS / padding (decoding stops at the first 0).
      example_idx_B: int32 index of each row's reference item in `host_fn.items`: one per completion row
        (with n samples per prompt, `jnp.repeat(prompt_idx, n)`); a row whose index is out of range (-1 for a
        padding row) scores 0.
      out_sharding: optional sharding for the rewards (e.g. `NamedSharding(mesh, P("data"))`).
    """
    example_idx_B = jnp.asarray(example_idx_B)  # (a list of indices failed: no .shape)
    if completion_ids_BxT.ndim != 2 or completion_mask_BxT.shape != completion_ids_BxT.shape or \
            example_idx_B.shape != completion_ids_BxT.shape[:1]:
        # found when tracing: on the host it would score the whole batch 0 every step (one index per prompt with
        # n samples per prompt, say), a run that learns nothing without an error
        raise ValueError(f"grade_in_jit: completion ids {completion_ids_BxT.shape}, mask {completion_mask_BxT.shape} "
                         f"and example_idx {example_idx_B.shape} must be [B, T], [B, T] and [B]: one item index per "
                         f"completion row (with n samples per prompt, jnp.repeat(prompt_idx, n))")
    shape = jax.ShapeDtypeStruct(completion_ids_BxT.shape[:1], jnp.float32)
    host = host_fn if isinstance(host_fn, HostRewardFn) else _as_rewards(host_fn)
    # On a multi-device mesh the callback's operands go to one device: gathered explicitly (replicated) rather
    # than left to the partitioner, which did the same gather but printed four "Involuntary full
    # rematerialization" warnings per compile (8 CPU devices; session 29's list)
    mesh = getattr(out_sharding, "mesh", None) or current_mesh()
    whole = NamedSharding(mesh, P()) if mesh is not None and mesh.size > 1 else None
    args = [x.astype(jnp.int32) for x in (completion_ids_BxT, completion_mask_BxT, example_idx_B)]
    rewards_B = io_callback(host, shape, *(place(x, whole) for x in args), ordered=True)
    return place(place(rewards_B, whole), out_sharding)
