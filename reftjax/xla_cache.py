"""The persistent XLA compilation cache of pipeline runs, and what compiling cost.

`reftjax.train.run` compiles a dozen programs (SFT step, rollout per completion
bucket, experience, PPO step, evaluation); on SmolLM2-135M on 2 CPU cores that is
~1 minute per run, on a 7B model on a TPU slice many minutes. With JAX's
persistent cache on, a run resumed after a crash (or re-run with the same model,
shapes and mesh) loads those executables from disk instead of compiling them
again. `ExperimentConfig.compilation_cache` picks the directory:

    None (default)  $JAX_COMPILATION_CACHE_DIR if set, else $REFTJAX_CACHE/xla (~/.cache/reftjax/xla,
                    beside the model copies), capped at 4 GiB (least recently used entries go;
                    the cap needs `filelock`, which transformers' huggingface_hub brings)
    ""              off
    a path          that directory

A directory this process cannot create or write turns the cache off with a warning; one it can read but not write
(a cache filled once, mounted read-only) serves its programs, uncapped (JAX's capped cache locks a file in it), and
saves no new ones. Mount it at the path it was filled at: JAX's cache key includes the directory's path (its autotune
cache lives under it), so the same programs under another path are misses.

The cache key covers the program, the devices, the XLA flags and the jax/jaxlib
versions, so a stale entry is never served to a different setup. `enable` also removes
entries a killed process left half-written (`drop_unfinished_entries`) from a capped cache
(the default; an uncapped one has no access-time files to tell finished entries by, so
each start would decompress every entry: it is left as it is). With the cap on,
JAX's eviction expects every entry to have its access-time file, so do not share the
directory with JAX processes that run uncapped. JAX only writes
programs that took at least `jax_persistent_cache_min_compile_time_secs` (1 s by
default; `JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`) to compile. As JAX warns, a
cache directory is trusted code: do not share one with users you do not trust.

`CompileStats` counts, from JAX's own monitoring events, how many programs were
compiled or loaded and how long that took, so a run reports its compile cost
(summary.json `compilation`, and `xla_programs` / `iteration_programs` in every RL metrics line: an
`iteration_programs` above 0 after the first iterations is a recompilation to look into).
"""
from __future__ import annotations

import collections
import importlib.util
import logging
import os
import re
import tempfile
import threading
import time
import warnings

import jax
from jax.experimental.compilation_cache import compilation_cache

DEFAULT_MAX_BYTES = 4 << 30

_COMPILE = "/jax/core/compile/backend_compile_duration"  # every program: compiled, or loaded from the cache
_TRACE = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration")
_HIT = "/jax/compilation_cache/cache_hits"
_SAVED = "/jax/compilation_cache/compile_time_saved_sec"

_lock = threading.Lock()
_counts: collections.Counter = collections.Counter()
_seconds: collections.Counter = collections.Counter()
_installed = False
_cap_before_read_only: int | None = None  # JAX's cache cap while a read-only directory runs uncapped


def cache_dir(setting: str | None) -> str | None:
    """The directory `setting` (see the module docstring) resolves to; None = no cache."""
    if setting is None:
        env = os.environ.get("JAX_COMPILATION_CACHE_DIR")
        if env:
            return os.path.abspath(os.path.expanduser(env))
        from reftjax.hf import cache_root  # beside the dense model copies

        return os.path.join(os.path.abspath(os.path.expanduser(cache_root())), "xla")
    if setting == "":
        return None
    return os.path.abspath(os.path.expanduser(setting))


def enable(setting: str | None) -> str | None:
    """Point JAX's persistent compilation cache at `cache_dir(setting)` for this process; returns it.

    Takes effect for every later compilation, also when JAX already compiled (and
    settled its cache) earlier in the process, e.g. in a notebook.
    """
    path = cache_dir(setting)
    read_only = False
    if path is not None:  # an optimisation: a directory this process cannot create turns it off; one it can read
        try:              # but not write (a cache filled once, mounted read-only on the workers) serves reads
            os.makedirs(path, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=path, prefix=".write-probe")
            probe.close()
        except OSError as e:
            read_only = os.path.isdir(path) and os.access(path, os.R_OK | os.X_OK)
            if read_only:
                logging.getLogger(__name__).warning(
                    "%s: the XLA compilation cache is read-only here (%s): programs are loaded from it, new ones "
                    "are not saved (JAX's warnings of failed cache writes are silenced in this process)", path, e)
                # (one per program compiled: dozens per run); only this directory's: a writable one enabled
                # later still shows its failures (a full disk)
                warnings.filterwarnings("ignore", message="Error writing persistent compilation cache entry .*"
                                        + re.escape(path), category=UserWarning)
            else:
                logging.getLogger(__name__).warning("%s: the XLA compilation cache is off (%s); set "
                                                    "JAX_COMPILATION_CACHE_DIR or compilation_cache to a writable "
                                                    "directory to keep compiled programs across runs", path, e)
                path = None
    global _cap_before_read_only
    cap = jax.config.jax_compilation_cache_max_size
    if _cap_before_read_only is not None and not read_only:  # the cap a read-only directory set aside (a later
        cap, _cap_before_read_only = _cap_before_read_only, None  # writable cache ran uncapped; regression review)
    if read_only:  # JAX's LRU cache locks a file in the directory on every read, so a cap read nothing there
        if _cap_before_read_only is None:
            _cap_before_read_only = cap
        cap = -1
    elif (path is not None and setting is None and cap == -1
            and importlib.util.find_spec("filelock") is not None):  # JAX's LRU eviction locks with filelock
        cap = DEFAULT_MAX_BYTES
    if path != jax.config.jax_compilation_cache_dir or cap != jax.config.jax_compilation_cache_max_size:
        compilation_cache.set_cache_dir(path)
        jax.config.update("jax_compilation_cache_max_size", cap)
        compilation_cache.reset_cache()  # JAX settles the cache (directory, cap) at the first compile; start over
    if path is not None and cap != -1 and not read_only:
        drop_unfinished_entries(path)
    return path


def drop_unfinished_entries(path: str) -> list[str]:
    """Delete cache entries a killed process left half-written; returns their file names.

    JAX writes an entry in place (`<key>-cache`), then, with eviction on, its access time
    (`<key>-atime`), and never replaces a key that exists. So a process killed during the
    first write leaves a truncated entry that every later run warns it cannot read and
    compiles again. Every entry without its `-atime` file is checked: one that does not
    decompress is deleted; a complete one (written without eviction, e.g. before `enable`
    capped the cache) gets its `-atime` file. That adoption is needed, not cosmetic: JAX's
    eviction reads every entry's `-atime` and, on one missing, fails each later write
    ("Error writing persistent compilation cache entry"). Racing a concurrent writer is
    harmless: an entry deleted mid-write is a cache miss next time.
    """
    try:
        from jax._src.compilation_cache import decompress_executable  # JAX's own reader of its entries
    except ImportError:  # a JAX without it: leave the directory alone rather than guess
        return []
    dropped = []
    try:
        names = set(os.listdir(path))
    except OSError:
        return dropped
    for name in sorted(names):
        atime = name[: -len("-cache")] + "-atime"
        if not name.endswith("-cache") or atime in names:
            continue
        full = os.path.join(path, name)
        try:
            with open(full, "rb") as f:
                data = f.read()
            try:
                decompress_executable(data)
            except Exception:  # truncated: the writer was killed
                os.remove(full)
                dropped.append(name)
                continue
            with open(os.path.join(path, atime), "wb") as f:  # JAX's format: ns since the epoch, 8 bytes LE
                f.write(time.time_ns().to_bytes(8, "little"))
        except OSError:  # removed by another process meanwhile
            pass
    return dropped


def _on_event(event: str, **_):
    if event == _HIT:
        with _lock:
            _counts[event] += 1


def _on_duration(event: str, duration_secs: float, **_):
    if event == _COMPILE or event == _SAVED or event in _TRACE:
        with _lock:
            _counts[event] += 1
            _seconds[event] += duration_secs


def _install():
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
    jax.monitoring.register_event_listener(_on_event)
    jax.monitoring.register_event_duration_secs_listener(_on_duration)


def busy_seconds() -> float:
    """Seconds this process has spent tracing, lowering and compiling (or loading) programs so far: the
    difference over a step is the part of its wall time that was compilation, not the program running."""
    _install()
    with _lock:
        return float(_seconds[_COMPILE] + sum(_seconds[k] for k in _TRACE))


class CompileStats:
    """Programs compiled (or loaded from the persistent cache) in this process since construction."""

    def __init__(self):
        _install()
        self._counts, self._seconds = self._snapshot()

    @staticmethod
    def _snapshot():
        with _lock:
            return collections.Counter(_counts), collections.Counter(_seconds)

    def programs(self) -> int:
        """Executables obtained since construction (each compiled or loaded from the cache)."""
        return self._snapshot()[0][_COMPILE] - self._counts[_COMPILE]

    def summary(self) -> dict:
        counts, seconds = self._snapshot()
        d_count = counts - self._counts
        d_sec = {k: seconds[k] - self._seconds[k] for k in seconds}
        return {
            "programs": d_count[_COMPILE],
            "compile_seconds": round(d_sec.get(_COMPILE, 0.0), 2),
            "trace_lower_seconds": round(sum(d_sec.get(k, 0.0) for k in _TRACE), 2),
            "cache_dir": jax.config.jax_compilation_cache_dir,
            "cache_hits": d_count[_HIT],
            "compile_seconds_saved": round(d_sec.get(_SAVED, 0.0), 2),
        }
