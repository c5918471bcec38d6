"""Host-memory allocator settings for XLA:CPU runs (the `cpu` presets, benches).

XLA:CPU allocates its large temporaries (activations, scan residuals, logits) with
`malloc` on every step. glibc serves each allocation above 32 MiB (or above a worker
thread's 64 MiB arena heap) with a fresh `mmap` and unmaps it on `free`, so every step
faults its working set in again page by page: on the 2-core VM an SFT step of
SmolLM2-135M (8 x 256) took ~1.17 M minor page faults and ~3.8 s of kernel time
(BUILD_NOTES, session 6). Routing every thread to the main arena, serving large
blocks from the heap and never trimming it keeps the pages mapped across steps.

`tune_cpu_allocator()` sets exactly that through `mallopt` and must run before the
process starts its second thread (numpy/JAX thread pools): call it first thing in a
command-line entry point, or set the equivalent environment variables before
Python starts (`MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0
MALLOC_TRIM_THRESHOLD_=68719476736`). The process then keeps its peak heap for
its whole life (memory is reused, not returned to the OS). Opt out with
`REFTJAX_HOST_ALLOCATOR=system`.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import threading

# glibc <malloc.h>
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_TRIM_NEVER = -1  # mallopt(3): -1 disables trimming (its value is a C int: 1 << 36 would wrap)

_applied: bool | None = None


def tune_cpu_allocator() -> bool:
    """Keep freed host memory mapped (glibc only); True if the settings are in force.

    Idempotent. Returns False (and changes nothing) off Linux/glibc, when
    `REFTJAX_HOST_ALLOCATOR=system`, or when other threads already exist (their
    arenas are fixed by then, so the setting would be partial).
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("REFTJAX_HOST_ALLOCATOR", "tuned") == "system":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if os.environ.get("MALLOC_ARENA_MAX") == "1" and os.environ.get("MALLOC_MMAP_MAX_") == "0":
        _applied = True  # set before Python started
        return True
    if threading.active_count() > 1 or _native_threads() > 1:
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    ok = all(libc.mallopt(opt, val) == 1 for opt, val in (
        (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _TRIM_NEVER)))
    _applied = ok
    return ok


def _native_threads() -> int:
    """Threads of this process as the kernel sees them (numpy/BLAS/XLA pools included)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1
