"""Metrics out: JSONL (always), TensorBoard event files (tensorboardX), MFU helpers.

Device metrics are fetched one step late by the loop (`jax.device_get` of the
previous step's dict after the next step has been dispatched), so logging
never stalls the accelerator.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import time

import numpy as np


def _scalar(v):
    a = np.asarray(v)
    if a.size != 1:
        return None
    x = a.item()
    return x if isinstance(x, (int, float, bool)) else None


class _EventFile:
    """TensorBoard scalars written synchronously to one event file (tensorboardX's record format and protos).
    tensorboardX's `SummaryWriter` writes from a background thread through a 10-slot queue: one failed write (a
    full disk, even briefly) killed the thread, and the next `add_scalar` blocked for good, SIGTERM included
    (helper review). Here a write error raises in the caller, and each `log` call flushes its rows."""

    def __init__(self, logdir: pathlib.Path):
        from tensorboardX.event_file_writer import EventsWriter

        logdir.mkdir(parents=True, exist_ok=True)
        self._w = EventsWriter(str(logdir / "events"))

    def add_scalar(self, tag: str, value: float, step: int, walltime: float | None = None):
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        self._w.write_event(Event(summary=scalar(tag, value), step=int(step),
                                  wall_time=time.time() if walltime is None else walltime))

    def flush(self):
        self._w.flush()

    def close(self):
        self._w.close()


class MetricsLogger:
    """Appends `{"phase", "step", "time", **metrics}` lines to `metrics.jsonl` and writes TensorBoard scalars."""

    def __init__(self, out_dir: str | os.PathLike, tensorboard: bool = True, enabled: bool | None = None):
        """`enabled` (default: this is JAX process 0) writes the files; other processes of a
        multi-process run only return the rows, so the log holds each step once."""
        if enabled is None:
            import jax

            enabled = jax.process_index() == 0
        self.dir = pathlib.Path(out_dir)
        self._jsonl = self._tb = None
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / "metrics.jsonl"
        if path.is_file() and path.stat().st_size:  # a line cut by a crash would swallow the next row: end it
            with open(path, "rb+") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
        # TensorBoard buffers its events (flushed every ~2 min), so a killed run's last rows may be in the JSONL only:
        # the first rewind of a process that found rows rebuilds the event files from them
        self._tb_synced = not (path.is_file() and path.stat().st_size)
        self._jsonl = open(path, "a", buffering=1)
        if tensorboard:
            try:
                self._tb = _EventFile(self.dir / "tensorboard")
            except ImportError:  # optional: JSONL stays the source of truth
                self._tb = None
            except OSError as e:
                self._tb_failed(e)

    def log(self, phase: str, step: int, metrics: dict) -> dict:
        row = {k: s for k, v in metrics.items() if (s := _scalar(v)) is not None}
        row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        if self._jsonl is None:
            return row
        now = time.time()
        self._jsonl.write(json.dumps({"phase": phase, "step": int(step), "time": now, **row}) + "\n")
        self._tb_write(phase, step, row, now)
        if self._tb is not None:
            try:
                self._tb.flush()
            except OSError as e:
                self._tb_failed(e)
        return row

    def _tb_write(self, phase, step, row, walltime=None):
        if self._tb is not None:
            try:
                for k, v in row.items():
                    if isinstance(v, (int, float)) and v is not None:
                        self._tb.add_scalar(f"{phase}/{k}", v, int(step), walltime=walltime)
            except OSError as e:
                self._tb_failed(e)

    def _tb_failed(self, e: OSError):
        """TensorBoard is a mirror of metrics.jsonl: a failed write turns it off for this process, with a warning,
        and the next process to resume rebuilds the event files from the JSONL."""
        import logging

        logging.getLogger(__name__).warning("%s: TensorBoard write failed (%s); TensorBoard is off until the run is "
                                             "resumed (metrics.jsonl keeps every row)", self.dir / "tensorboard", e)
        if self._tb is not None:
            try:
                self._tb.close()
            except OSError:
                pass
        self._tb = None

    def rewind(self, last_steps: dict[str, int]) -> int:
        """Drops the `metrics.jsonl` rows of phase p with a step above `last_steps[p]` (and lines a crash cut):
        a resumed phase calls it with the step of the checkpoint it restored, so the steps it redoes are logged
        once, not once per attempt. Returns the number of rows dropped. TensorBoard's event files are append-only
        and buffered, so they are rewritten from the kept rows when rows are dropped (a redone step showed twice
        there) and at the first rewind after a restart (rows a SIGKILL caught in the buffer were lost for good)."""
        if self._jsonl is None:
            return 0
        path = self.dir / "metrics.jsonl"
        self._jsonl.close()
        kept, dropped = [], 0
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                dropped += 1
                continue
            if row.get("phase") in last_steps and row.get("step", 0) > last_steps[row["phase"]]:
                dropped += 1
            else:
                kept.append(line + "\n")
        if dropped:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, path)
        if dropped or not self._tb_synced:
            self._tb_synced = True
            if self._tb is not None:  # the event files mirror metrics.jsonl: rebuilt from the kept rows
                import shutil

                try:
                    self._tb.close()
                    shutil.rmtree(self.dir / "tensorboard", ignore_errors=True)
                    self._tb = _EventFile(self.dir / "tensorboard")
                    for line in kept:
                        row = json.loads(line)
                        phase, step = row.pop("phase"), row.pop("step", 0)
                        self._tb_write(phase, step, row, row.pop("time", None))  # at the time it was logged
                    if self._tb is not None:
                        self._tb.flush()
                except OSError as e:
                    self._tb_failed(e)
        self._jsonl = open(path, "a", buffering=1)
        return dropped

    def close(self):
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(out_dir: str | os.PathLike) -> list[dict]:
    path = pathlib.Path(out_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut by a crash
            continue
    return rows


_PEAK_CACHE: dict[tuple[str, str], float] = {}  # (platform, dtype) -> FLOP/s


def _wall_times(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of `repeats` calls of `fn()` (the caller blocks on device work inside `fn`)."""
    return float(np.median(_wall_times(fn, repeats)))


def min_seconds(fn, repeats: int) -> float:
    """Fastest of `repeats` calls of `fn()` (micro-benchmarks: the least-disturbed run)."""
    return float(min(_wall_times(fn, repeats)))


def measured_peak_flops(n: int | None = None, repeats: int = 5, remeasure: bool = False,
                        dtype: str = "float32") -> float:
    """The dense matmul rate of the devices in `dtype` (FLOP/s): the fastest of `repeats` jitted n x n products,
    measured once per process and dtype, times the accelerator count, or on CPU the process count: a process's CPU
    devices (one per core, `host.use_core_devices`, or the test suite's 8 fake ones) share its cores, and one
    product already runs on all of them (multiplying by the CPU device count read MFU 2-8x low). `remeasure=True`
    measures again and keeps the faster of the two (a benchmark calls it again at its end: one measurement right
    after loading a model read 130 GFLOP/s on a ~180 GFLOP/s host and made an MFU of 1.03, BUILD_NOTES session 19).

    `dtype` is the model's compute dtype (`ModelConfig.dtype`): an MFU is against the rate of the dtype the model
    computes in. A float32 product at JAX's default precision runs as TF32 on recent NVIDIA GPUs, about half their
    bf16 rate, so a bf16 run measured against it would read its MFU ~2x high.

    `n` defaults to 2048 on CPU and 8192 on accelerators. The former default, one 1024^3 product timed 3 times,
    was too short to reach the rate when anything else stirred: `bench/sft_step.py` measured 79 GFLOP/s after its
    torch steps on a 115 GFLOP/s host and reported an MFU of 1.015 (BUILD_NOTES, session 16); on a GPU it would
    mostly time the launch.
    """
    import jax
    import jax.numpy as jnp

    platform = jax.devices()[0].platform
    key = (platform, jnp.dtype(dtype).name)
    if key not in _PEAK_CACHE or remeasure:
        n = n or (2048 if platform == "cpu" else 8192)
        # random operands: constant ones may run faster than real data (zeros ran a bf16 product 13% faster than
        # random data on an H200, one measurement), which would read the peak high and the MFU low
        a = jax.random.normal(jax.random.key(0), (n, n), dtype)
        f = jax.jit(lambda x: x @ x)
        f(a).block_until_ready()
        best = min_seconds(lambda: f(a).block_until_ready(), repeats)
        units = jax.process_count() if platform == "cpu" else jax.device_count()
        _PEAK_CACHE[key] = max(_PEAK_CACHE.get(key, 0.0), 2 * n ** 3 / best * units)
    return _PEAK_CACHE[key]


def model_flops(model_cfg, prompt_lengths, gen_lengths, group: int = 1, head: bool = True) -> float:
    """Model FLOPs of one forward over prompt + completion rows: the trunk on each distinct prompt's real tokens
    (once per `group` consecutive rows that share it), the trunk and the vocabulary head on every completion token
    (attending to its prompt and itself). The head runs on completion positions only: a rollout takes one prompt
    position's logits (which yield the first new token), the RL forwards and TRL's training take logits there only.
    `head=False`: no vocabulary head at all (a separate critic's trunk).
    """
    prompts, gens = [int(x) for x in prompt_lengths], [int(x) for x in gen_lengths]
    shared = sum(p * model_cfg.flops_per_token(p // 2, head=False) for p in prompts[::group])
    completions = sum(c * model_cfg.flops_per_token(p + c // 2, head=head) for p, c in zip(prompts, gens))
    return float(shared + completions)


def rl_iteration_flops(model_cfg, prompt_lengths, gen_lengths, samples: int, group: int, experience_from_rollout: bool,
                       ppo_epochs: int, reference: bool = True, separate_critic: bool = False) -> float:
    """Model FLOPs of one RL iteration as executed (`model_flops` per pass): the rollout prefills each prompt once
    for its `samples` rows; the experience runs the policy (not when its log-probs come from the rollout), the
    reference (not when `reference` is False: kl_coef 0 skips it) and a separate critic's trunk (no vocabulary
    head); each of `ppo_epochs` update passes is a forward and a backward (3x) of the policy, and of the separate
    critic. The experience and update passes run each prompt once per `group` rows (`share_prompt`; else 1)."""
    train = model_flops(model_cfg, prompt_lengths, gen_lengths, group)
    passes = (0 if experience_from_rollout else 1) + int(reference) + 3 * ppo_epochs
    critic = model_flops(model_cfg, prompt_lengths, gen_lengths, group, head=False) * (1 + 3 * ppo_epochs)
    return model_flops(model_cfg, prompt_lengths, gen_lengths, samples) + train * passes + critic * separate_critic


def mfu(tokens: float, seconds: float, flops_per_token: float, peak: float) -> float:
    """Model FLOP utilisation: achieved model FLOP/s over the measured peak."""
    return tokens * flops_per_token / max(seconds, 1e-9) / peak
