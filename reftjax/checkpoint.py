"""Checkpointing: one Orbax `CheckpointManager` per run directory, three named items per step.

    <directory>/<step>/state    the TrainState pytree (params incl. value head, optimizer
                                state, step, skipped, rng as raw key data), PyTree handler
    <directory>/<step>/extras   JSON: data-loader position, RL round counters, ...
    <directory>/<step>/config   JSON: the experiment config
    <directory>/<step>/metrics  JSON: the validation metric, when given (written by Orbax)

Saves are asynchronous: `save` returns once the arrays are copied to host (so the
next step may donate the state buffers) and the files are written in a
background thread. Orbax writes each step into a temporary directory and renames
it when complete, then drops `commit_success.txt` into it; a step without that
marker (or one that fails to read) is skipped on restore with a warning, the
previous one is used, and the skipped ones move to `<directory>/unreadable/` (so the
resumed run can save those step numbers again).

Retention: the last `keep_last` steps plus the `keep_best` steps with the highest
validation metric (Orbax `LatestN` | `BestN`). A state whose params hold NaN/Inf is
never written (one on-device reduction decides).

Restores go onto an abstract state (`jax.eval_shape` leaves carrying `.sharding`),
so every restored array lands with the live run's shardings, whatever the mesh was
at save time. `restore_params` reads only `params/policy` (SFT -> PPO hand-off).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from reftjax.sharding import any_process, object_from_process_0

log = logging.getLogger(__name__)


class _MetriclessSaveFilter(logging.Filter):
    """Drops Orbax's "Requested `tracked_metric`; did not provide metrics." warning.

    With `best_fn` set (it makes Orbax persist the metrics that BestN needs after a restart)
    Orbax warns on every save without metrics, and reftjax makes those on purpose: SFT and
    verifier steps, RL iterations between validations; `LatestN` keeps them.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "did not provide metrics" not in record.getMessage()


logging.getLogger("absl").addFilter(_MetriclessSaveFilter())  # Orbax logs through absl's logger

COMMIT_MARKER = "commit_success.txt"
ITEMS = ("state", "extras", "config")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Where and how often to checkpoint, and what to keep.

    Attributes:
      directory: run checkpoint directory (created if absent).
      save_every: save when `step % save_every == 0` (a `force`d save ignores it).
      keep_last: how many of the most recent checkpoints to keep (>= 1).
      keep_best: how many checkpoints with the highest `best_metric` to keep as
        well (0: none); only saves given a metric take part.
      best_metric: name of the validation metric (higher is better).
      async_save: write files in a background thread.
    """

    directory: str
    save_every: int = 1
    keep_last: int = 2
    keep_best: int = 1
    best_metric: str = "accuracy"
    async_save: bool = True

    def __post_init__(self):
        if not self.directory:
            raise ValueError("CheckpointConfig.directory must be set")
        if self.save_every < 1 or self.keep_last < 1 or self.keep_best < 0:
            raise ValueError(f"need save_every >= 1, keep_last >= 1, keep_best >= 0; got {self}")


# ----------------------------------------------------------------------------- typed PRNG keys


def _is_key(x) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _key_impl(abstract_key):
    """The PRNG implementation of a (possibly abstract) typed key array."""
    impls = []
    jax.eval_shape(lambda k: impls.append(jax.random.key_impl(k)), abstract_key)
    return impls[0]


def _keys_to_data(tree):
    """Typed key arrays -> their uint32 data (what Orbax can store)."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _abstract_storable(abstract_tree):
    """Abstract tree as stored: typed keys replaced by key-data structs with a matching sharding."""
    def one(x):
        sharding = getattr(x, "sharding", None)
        if _is_key(x):
            data = jax.eval_shape(jax.random.key_data, x)
            return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(one, abstract_tree)


def _keys_from_data(tree, abstract_tree):
    return jax.tree.map(lambda x, a: jax.random.wrap_key_data(x, impl=_key_impl(a)) if _is_key(a) else x,
                        tree, abstract_tree)


def abstract_like(tree):
    """ShapeDtypeStructs (with `.sharding`; None for NumPy leaves) of a live pytree: the restore target when
    building the abstract state with `jax.eval_shape` is not possible (e.g. `init_state` reads shardings)."""
    def one(x):
        if hasattr(x, "sharding"):  # a jax.Array or a ShapeDtypeStruct
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        # NumPy arrays and scalars, Python numbers: the dtype placing them gives (float64 -> float32, int -> int32)
        return jax.ShapeDtypeStruct(np.shape(x), jax.dtypes.canonicalize_dtype(np.asarray(x).dtype))

    return jax.tree.map(one, tree)


# Subtrees that states written by older reftjax versions hold and the current ones do not: a restore reads the
# rest and drops these (params and optimizer moments alike). ("critic", "lm_head"): a separate critic trunk's copy
# of the policy's untied vocabulary head, which the critic never read (`steps.CRITIC_DROPS`, session 41).
OBSOLETE = (("critic", "lm_head"),)


def obsolete_leaves(stored_metadata, abstract_storable) -> list[tuple]:
    """Paths (as Orbax names them) of the stored leaves under an `OBSOLETE` subtree that the abstract state lacks:
    the subtree at the params tree's root (`params/critic/lm_head/...`) or mirrored in an optimizer state (after a
    node that is not a params key, e.g. `opt_state/1/0/mu/critic/lm_head/...`), not one deeper in the params
    (`params/policy/critic/lm_head` would be a mismatch; helper review)."""
    wanted = ocp.tree.to_flat_dict(abstract_storable).keys()
    roots = {str(k[1]) for k in wanted if str(k[0]) == "params" and len(k) > 1}  # policy, value_head, critic

    def at_root(names, i):
        return names[:i] == ("params",) or (names[0] == "opt_state" and names[i - 1] not in roots)

    def old(k):
        names = tuple(str(p) for p in k)
        return any(names[i:i + len(o)] == o and at_root(names, i) for o in OBSOLETE for i in range(1, len(names)))

    return _params_first(k for k in ocp.tree.to_flat_dict(stored_metadata) if k not in wanted and old(k))


def _params_first(keys) -> list[tuple]:
    """Orbax paths sorted, params first: they say more than their optimizer moments."""
    return sorted(keys, key=lambda k: (str(k[0]) != "params", k))


def layout_mismatch(stored_metadata, abstract_storable, limit: int = 3) -> str | None:
    """How a stored state tree differs from the abstract one in structure or shapes, or None.

    Dtypes may differ (Orbax casts on restore); paths are compared as Orbax names them. Stored leaves that
    `obsolete_leaves` names are not a difference (a restore drops them).
    """
    dropped = set(obsolete_leaves(stored_metadata, abstract_storable))
    stored = {k: tuple(v.shape) for k, v in ocp.tree.to_flat_dict(stored_metadata).items() if k not in dropped}
    wanted = {k: tuple(v.shape) for k, v in ocp.tree.to_flat_dict(abstract_storable).items()}

    def name(k):
        return "/".join(str(p) for p in k)

    parts = []
    for label, keys in (("not in the checkpoint", _params_first(wanted.keys() - stored.keys())),
                        ("only in the checkpoint", _params_first(stored.keys() - wanted.keys()))):
        if keys:
            more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
            parts.append(f"{label}: {', '.join(name(k) for k in keys[:limit])}{more}")
    shapes = _params_first(k for k in wanted.keys() & stored.keys() if wanted[k] != stored[k])
    if shapes:
        more = f" and {len(shapes) - limit} more" if len(shapes) > limit else ""
        parts.append("shape differs: " + ", ".join(f"{name(k)} {stored[k]} stored vs {wanted[k]} here"
                                                    for k in shapes[:limit]) + more)
    return "; ".join(parts) or None


def _restore_args(abstract_storable, partial: bool = False) -> ocp.args.PyTreeRestore:
    """`partial`: stored leaves the target lacks are not read (Orbax raises on them otherwise)."""
    return ocp.args.PyTreeRestore(abstract_storable,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_storable),
                                  partial_restore=partial)


# ----------------------------------------------------------------------------- guards


@jax.jit
def all_finite(tree) -> jax.Array:
    """True iff every floating leaf of `tree` is finite (one device reduction)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def is_committed(step_dir: str | os.PathLike) -> bool:
    """Whether Orbax finished writing this step (its commit marker exists)."""
    return os.path.exists(os.path.join(os.fspath(step_dir), COMMIT_MARKER))


# ----------------------------------------------------------------------------- checkpointer


class Checkpointer:
    """Async save / fallback-safe restore of a run's TrainState, extras and config."""

    def __init__(self, cfg: CheckpointConfig, config: dict | None = None):
        """Args:
          cfg: checkpoint settings.
          config: JSON-serialisable experiment config stored with every checkpoint.
        """
        self.cfg = cfg
        self.config = dict(config or {})
        _set_aside_unreadable_metrics(os.path.abspath(cfg.directory))
        policies: list[pp.PreservationPolicy] = [pp.LatestN(n=cfg.keep_last)]
        if cfg.keep_best:
            policies.append(pp.BestN(get_metric_fn=self._rank, n=cfg.keep_best,
                                     keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=pp.AnyPreservationPolicy(policies),
            # best_fn makes Orbax persist the metrics, so BestN still knows them after a restart.
            best_fn=self._rank, best_mode="max",
            enable_async_checkpointing=cfg.async_save, cleanup_tmp_directories=True, create=True)
        handlers = {"state": ocp.PyTreeCheckpointHandler(), "extras": ocp.JsonCheckpointHandler(),
                    "config": ocp.JsonCheckpointHandler()}
        self.directory = os.path.abspath(cfg.directory)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS,
                                              item_handlers=handlers)
        self._closed = False

    def _metric(self, metrics: dict) -> float:
        """The step's metric; NaN (an evaluation gone wrong: a library caller's figure) as -inf, below every real one:
        NaN compared false with everything, so Orbax kept, and `_ranked` picked, such a step arbitrarily."""
        value = float(metrics[self.cfg.best_metric])
        return -math.inf if math.isnan(value) else value

    def _rank(self, metrics: dict) -> tuple[float, int]:
        """Orbax's ranking (which steps `BestN` keeps): the metric, then the earlier step among ties, as the training
        loops' strict `>` (Orbax alone kept and read back the later: an exported best that was not the step the run's
        summary and early stopping counted from). Steps saved before the step was stored rank as Orbax ranked them
        (their ties: the later kept); `_ranked`, which picks the best, reads the step from the directory."""
        return self._metric(metrics), -int(metrics.get("step", 0))

    def _ranked(self, above: float | None = None) -> list[int]:
        """Kept steps with a real metric (higher than `above`), best first: by metric, then the earlier step; after
        the pending saves (a step being saved asynchronously was no candidate yet: regression review, session 34;
        none after `close`, which finished them). A NaN `above` is no floor, as a NaN metric is none."""
        if not self._closed:
            self.wait()
        floor = -math.inf if above is None or math.isnan(above) else above
        scored = [(v, -s) for s in self.all_steps() if (m := self._metrics_of(s)) and (v := self._metric(m)) > floor]
        return [-s for _, s in sorted(scored, reverse=True)]

    def _metrics_of(self, step: int) -> dict | None:
        """The step's metrics, or None (none saved; unreadable: damaged on disk during this run, with a warning;
        a later opening sets such a file aside, `_set_aside_unreadable_metrics`)."""
        try:
            return self._manager.metrics(step)
        except Exception as e:  # noqa: BLE001 -- Orbax re-reads the file: a damaged one is no candidate
            log.warning("checkpoint: step %d in %s has unreadable metrics (%s: %s); not a best candidate", step,
                        self.directory, type(e).__name__, e)
            return None

    def should_save(self, step: int) -> bool:
        return int(step) % self.cfg.save_every == 0

    def save(self, step: int, state, extras: dict | None = None, metric: float | None = None,
             force: bool = False) -> bool:
        """Start saving `state` (a TrainState) and `extras` (JSON dict) as `step`.

        Returns whether a save was started: not when `step` is off the `save_every`
        grid (unless `force`), already saved, or when the params are not finite.
        """
        self._check_open("save")
        step = int(step)
        if not (force or self.should_save(step)) or step in self._manager.all_steps():
            return False
        if not bool(all_finite(state.params)):
            log.warning("checkpoint: step %d NOT saved: params contain NaN/Inf", step)
            return False
        metrics = None if metric is None else {self.cfg.best_metric: float(metric), "step": step}
        args = ocp.args.Composite(state=ocp.args.PyTreeSave(_keys_to_data(state)),
                                  extras=ocp.args.JsonSave(dict(extras or {})),
                                  config=ocp.args.JsonSave(self.config))
        # (the metrics twice: Orbax's own file, and a copy in the step's metadata to mend it from if it is damaged)
        return bool(self._manager.save(step, args=args, metrics=metrics, force=True,
                                       custom_metadata={"metrics": metrics} if metrics else None))

    def all_steps(self) -> list[int]:
        """Committed steps on disk, ascending."""
        return [s for s in sorted(self._manager.all_steps()) if is_committed(self.step_dir(s))]

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def best_step(self) -> int | None:
        """The kept step with the highest metric; of tied steps, the earliest (`_ranked`).
        None if no save had a real (not NaN) metric, or with `keep_best=0` (no best is tracked: the latest steps are
        kept by recency only, and the best of those is not "the best")."""
        ranked = self._ranked() if self.cfg.keep_best else []
        return ranked[0] if ranked else None

    def restore_best_params(self, abstract_params, above: float | None = None):
        """(policy params, step) of the best readable kept step, or (None, None) when there is no best; with
        `above`, only a step whose metric is higher counts (the warm-up's figure: a damaged best step fell back to
        the next best whatever it scored).

        A best step that cannot be read (damaged on disk since it was saved) used to fail the run at its very end;
        it is now skipped with a warning for the next best (`_ranked`: by metric, then the earlier), like
        `restore_latest` does. With several processes every one tries process 0's candidates (each reading the
        metrics alone, one that failed to read a file tried fewer steps and the others hung: regression review)."""
        ranked = _process_0s(self._ranked(above)) if self.cfg.keep_best else []
        if not ranked:  # (no best, or all at or below `above`: nothing to read)
            if above is not None and self.best_step() is not None:
                log.info("checkpoint: no kept step in %s scores above %s", self.directory, above)
            return None, None
        for step in ranked:
            params = None
            try:
                params = self.restore_params(step, abstract_params)
            except Exception as e:  # noqa: BLE001 -- a damaged kept step: the next best one
                log.warning("checkpoint: best step %d in %s is unreadable (%s: %s); trying the next best", step,
                            self.directory, type(e).__name__, e)
                _meet_restore_barrier()
            if not _unreadable_anywhere(params is None, step, self.directory):
                return params, step
        log.error("checkpoint: none of the kept best steps in %s could be read; no best policy", self.directory)
        return None, None

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(int(step)))

    def restore_latest(self, abstract_state) -> tuple[Any, dict, int] | None:
        """Restore the newest readable checkpoint onto `abstract_state` (shapes, dtypes, shardings).

        Returns (state, extras, step), or None when the directory holds no checkpoint.
        Uncommitted or unreadable steps are skipped with a warning (newest first).
        """
        self.wait()
        steps = sorted(self._manager.all_steps(), reverse=True)
        if not steps:
            return None
        storable = _abstract_storable(abstract_state)
        for i, step in enumerate(steps):
            if not is_committed(self.step_dir(step)):  # (Orbax's own listing, the same on every process)
                log.warning("checkpoint: step %d in %s has no %s (half-written); trying the previous one",
                            step, self.directory, COMMIT_MARKER)
                continue
            stored = self._state_metadata(step)
            if _unreadable_anywhere(stored is None, step, self.directory):
                continue
            mismatch = layout_mismatch(stored, storable)
            if mismatch:  # not damage: the run's settings changed; an older step would not fit either
                raise ValueError(
                    f"{self.step_dir(step)}: this checkpoint holds a different training state than this run "
                    f"builds ({mismatch}). The model, the value head or the optimizer layout (e.g. "
                    f"make_optimizer(separate_critic_state=...)) differs from the run that wrote it: resume "
                    f"with the same settings, or use a fresh output directory (restore_params() reads only "
                    f"the policy params).")
            dropped = obsolete_leaves(stored, storable)
            if dropped:
                log.info("checkpoint: step %d in %s holds %d leaves this version no longer keeps (%s%s); restoring "
                         "without them", step, self.directory, len(dropped), "/".join(map(str, dropped[0])),
                         ", ..." if len(dropped) > 1 else "")
            out = None
            try:
                out = self._manager.restore(step, args=ocp.args.Composite(
                    state=_restore_args(storable, partial=bool(dropped)), extras=ocp.args.JsonRestore()))
            except Exception as e:  # noqa: BLE001 -- any unreadable step falls back to the previous one
                log.warning("checkpoint: step %d in %s is unreadable (%s: %s); trying the previous one",
                            step, self.directory, type(e).__name__, e)
                _meet_restore_barrier()
            if _unreadable_anywhere(out is None, step, self.directory):
                continue
            self._set_aside(steps[:i])
            return _keys_from_data(out.state, abstract_state), dict(out.extras or {}), step
        raise RuntimeError(f"{self.directory}: none of the checkpoints {steps} could be restored (see warnings)")

    def _state_metadata(self, step: int):
        """The stored state's tree metadata, or None (unreadable: a damaged step, with a warning)."""
        try:
            return self._manager.item_metadata(step)["state"]
        except Exception as e:  # noqa: BLE001 -- unreadable metadata: a damaged step, fall back
            log.warning("checkpoint: step %d in %s has unreadable metadata (%s: %s); trying the previous one",
                        step, self.directory, type(e).__name__, e)
            return None

    def _set_aside(self, steps: list[int]) -> None:
        """Moves the unreadable steps newer than the restored one to `<directory>/unreadable/`, so the resumed
        run can save those step numbers again (Orbax refuses an existing step) and nothing reads them later
        (e.g. a finished phase's marker naming that step). Kept, not deleted: they are evidence."""
        if not steps:
            return
        from reftjax.sharding import is_primary

        if is_primary():
            for step in steps:
                dest = _move_aside(self.directory, self.step_dir(step), str(step))
                log.warning("checkpoint: moved unreadable step %d to %s; the run resumes from an older step", step,
                            dest)
        _barrier("reftjax_checkpoint_set_aside")
        self._manager.reload()

    def restore_params(self, path_or_step, abstract_params):
        """Only the policy params of a checkpoint (this run's step, or any step/run directory)."""
        path = self.step_dir(path_or_step) if isinstance(path_or_step, int) else path_or_step
        return restore_params(path, abstract_params)

    def keep_only(self, step: int) -> None:
        """Deletes every other step of this directory (a finished phase: the next phases read `step`'s params only,
        so the `keep_last` older full states, optimizer moments included, were dead weight: ~84 GB each for a 7B
        model in float32). All processes call it (Orbax deletes on the primary and syncs); `step` itself stays,
        so a crash in between leaves a resumable directory."""
        self._check_open("keep_only")
        self.wait()
        if step not in self.all_steps():  # (its save was refused: keep what there is)
            log.warning("checkpoint: step %d is not in %s; no older step deleted", step, self.directory)
            return
        for s in self._manager.all_steps():
            if s != step:
                self._manager.delete(s)

    def wait(self) -> None:
        """Block until pending saves are on disk."""
        self._check_open("wait")
        self._manager.wait_until_finished()

    def _check_open(self, what: str) -> None:
        """Writes need an open manager: after `close` Orbax's async save returned True, failed in the background
        and left the manager's step list short of the disk's (a later keep_only left a full state behind;
        regression review, session 30). Reads (all_steps, the restores) still work after close."""
        if self._closed:
            raise RuntimeError(f"{what}: this Checkpointer of {self.directory} is closed (open a new one)")

    def close(self) -> None:
        """Finish pending saves and release the manager's resources (a second call does nothing; `all_steps` and
        the restores still read the directory afterwards)."""
        if self._closed:
            return
        self._manager.wait_until_finished()
        self._manager.close()
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        """Closes on every way out: an exception (a second Ctrl-C in a notebook) left an async save writing behind
        the caller, which a re-run of the cell then raced on the same directory."""
        if exc_type is not None and not self._closed and self._manager.is_saving_in_progress():
            log.warning("checkpoint: waiting for the save in progress in %s before stopping", self.directory)
        self.close()


def _move_aside(directory: str, path: str, label: str) -> str:
    """Moves `path` to `<directory>/unreadable/<label>.N` (N: the folder's count so far, so nothing is overwritten)
    and returns where it went: unreadable checkpoint parts are kept as evidence, out of Orbax's sight."""
    aside = os.path.join(directory, "unreadable")
    os.makedirs(aside, exist_ok=True)
    dest = os.path.join(aside, f"{label}.{len(os.listdir(aside))}")
    os.replace(path, dest)
    return dest


def _set_aside_unreadable_metrics(directory: str) -> None:
    """Moves a step's unreadable metrics (`<step>/metrics`: damaged on disk since the step was committed) to
    `<directory>/unreadable/<step>.metrics.N` with a warning: Orbax reads every step's metrics when it opens the
    directory, so one such file made every later run of the phase fail (a JSONDecodeError) before it could resume.
    The metrics are written again from the copy `save` keeps in the step's own metadata (`_CHECKPOINT_METADATA`):
    without a metric the step was no best candidate, and the next save deleted it (a step kept as the best only),
    so a worse step became the best (regression review, session 34). Without that copy (steps saved before it, or
    it damaged too) the step stays without a metric: a resume point while among the last kept."""
    from reftjax.sharding import is_primary

    if is_primary() and os.path.isdir(directory):
        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name, "metrics", "metrics")
            if not (name.isdigit() and os.path.isdir(os.path.join(directory, name))):
                continue
            error = dest = None
            if os.path.isfile(path):
                try:
                    with open(path) as f:
                        json.load(f)
                    continue
                except (OSError, ValueError) as e:
                    error = e
                dest = _move_aside(directory, os.path.dirname(path), f"{name}.metrics")
            kept = _metrics_copy(os.path.join(directory, name))
            if kept is not None:  # (also a file missing beside a copy: a mend cut short by a crash, regression review)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path + ".tmp", "w") as f:
                    json.dump(kept, f)
                os.replace(path + ".tmp", path)
            if error is None and kept is None:  # (no metric saved)
                continue
            log.warning("checkpoint: step %s in %s has %s; %s", name, directory,
                        f"unreadable metrics ({type(error).__name__}: {error}), moved to {dest}" if error is not None
                        else "no metrics file",
                        f"written again from the step's metadata: {kept}" if kept is not None else
                        "no copy in the step's metadata: the step stays without a metric (no best candidate, kept "
                        "while among the last saved)")
    _barrier("reftjax_checkpoint_metrics_aside")


def _metrics_copy(step_dir: str) -> dict | None:
    """The metrics `Checkpointer.save` kept in the step's metadata, or None."""
    try:
        with open(os.path.join(step_dir, "_CHECKPOINT_METADATA")) as f:
            kept = (json.load(f).get("custom_metadata") or {}).get("metrics")
    except (OSError, ValueError, AttributeError):
        return None
    return kept if isinstance(kept, dict) else None


def _unreadable_anywhere(unreadable_here: bool, step: int, directory: str) -> bool:
    """Whether `step` failed to read on any process (a collective): every process falls back from the same step.
    Each deciding alone, one that could not read its shards fell back while the others kept the step: a resume hung
    (the fallback's set-aside waited at a barrier the others never reached) and a best policy mixed two steps'
    shards (regression review, session 34)."""
    if not any_process(unreadable_here):
        return False
    if not unreadable_here:
        log.warning("checkpoint: step %d in %s is unreadable on another process; falling back with it", step,
                    directory)
    return True


def _process_0s(steps: list[int]) -> list[int]:
    """Process 0's list of steps, on every process (the list itself with one process)."""
    return object_from_process_0(lambda: [int(s) for s in steps])


def _meet_restore_barrier() -> None:
    """A process whose Orbax restore raised takes the barrier that ends every Orbax restore (`Checkpointer.restore`
    syncs all processes after reading), which it skipped: the processes that read their shards wait there, and
    would never reach the agreement of `_unreadable_anywhere` (both hung, regression review, session 34)."""
    if jax.process_count() > 1:
        try:
            ocp.multihost.sync_global_processes(ocp.multihost.unique_barrier_key("Checkpointer:restore"))
        except Exception as e:  # noqa: BLE001 -- e.g. every process failed at another point: the agreement decides
            log.warning("checkpoint: the restore barrier after a failed read: %s: %s", type(e).__name__, e)


def _barrier(name: str) -> None:
    """All processes wait here (multi-process runs; a no-op in one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def restore_params(path: str | os.PathLike, abstract_params, key: str = "policy"):
    """Partial restore of `params[key]` from a step directory or a run directory (its latest
    committed step) onto `abstract_params`; the value head and optimizer state are not read."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(os.path.join(path, "state")):
        steps = sorted((int(n) for n in os.listdir(path) if n.isdigit() and is_committed(os.path.join(path, n))),
                       reverse=True) if os.path.isdir(path) else []
        if not steps:
            raise FileNotFoundError(f"{path}: no committed checkpoint step found")
        path = os.path.join(path, str(steps[0]))
    args = _restore_args({"params": {key: _abstract_storable(abstract_params)}}, partial=True)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
        return ckptr.restore(os.path.join(path, "state"), args=args)["params"][key]
