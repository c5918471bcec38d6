"""Host settings for XLA:CPU runs (the `cpu` presets, benches): the memory allocator, one XLA device per core,
and the CPU a figure was taken on.

XLA:CPU allocates its large temporaries (activations, scan residuals, logits) with
`malloc` on every step. glibc serves each block above its mmap threshold (at most
32 MiB) with a fresh `mmap` and unmaps it on `free`, so every step faults its working
set in again, one 4 KiB page at a time: on the 2-core VM an SFT step of
SmolLM2-135M (8 x 256) took ~1.1 M minor page faults and ~3.8 s of kernel time
(BUILD_NOTES, sessions 6-7).

The fix used here is glibc's own tunable `glibc.malloc.hugetlb=1` (glibc >= 2.35): malloc
then `madvise`s its mmapped blocks for transparent huge pages, so the same step takes
~2.5 K faults (2 MiB each) and memory is still returned to the OS on `free`
(resident memory stays at the working set). Tunables are read when the process
starts, so `use_hugepage_malloc()` re-executes a command-line process once with
`GLIBC_TUNABLES` extended (same interpreter, same arguments, same PID). It does
nothing off Linux/glibc, on glibc < 2.35, when transparent huge pages are off
(`never`), when the tunable is already set, or with `REFTJAX_HOST_ALLOCATOR=system`.
In a notebook or any other long-lived interpreter, set
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` before it starts instead.

(Session 6 used `mallopt` to keep one never-trimmed heap instead. It removed the faults
too, but the heap fragmented and grew by ~4.4 GB at unpredictable steps, up to 24 GB
resident for the same SFT step: BUILD_NOTES, session 7.)
"""
from __future__ import annotations

import contextlib
import os
import platform
import sys

HUGETLB_TUNABLE = "glibc.malloc.hugetlb"
_REEXEC_MARK = "REFTJAX_HOST_REEXEC"
_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def host_allocator_mode() -> str:
    """'hugepages' if this process's glibc malloc madvises huge pages, else 'system'."""
    for item in os.environ.get("GLIBC_TUNABLES", "").split(":"):
        name, _, value = item.partition("=")
        if name == HUGETLB_TUNABLE and value in ("1", "2"):
            return "hugepages"
    return "system"


def _hugepages_possible() -> bool:
    if os.environ.get("REFTJAX_HOST_ALLOCATOR", "hugepages") == "system":
        return False
    if any(t.startswith(HUGETLB_TUNABLE + "=") for t in os.environ.get("GLIBC_TUNABLES", "").split(":")):
        return False  # the user set it (e.g. hugetlb=0 to turn it off): theirs stands
    if platform.system() != "Linux":
        return False
    lib, version = platform.libc_ver()
    try:
        if lib != "glibc" or tuple(int(x) for x in version.split(".")[:2]) < (2, 35):
            return False
    except ValueError:
        return False
    try:
        with open(_THP_ENABLED) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def use_hugepage_malloc() -> str:
    """Re-execute this command-line process with glibc's huge-page tunable, once.

    Call it first thing in an entry point (before heavy imports: they are redone).
    Returns the mode in force, 'hugepages' or 'system'; when it re-executes it does
    not return. Never re-executes twice (an environment marker guards the loop).
    """
    mode = host_allocator_mode()
    if (mode == "hugepages" or os.environ.get(_REEXEC_MARK) or not sys.executable
            or not _hugepages_possible()):
        return mode
    tunables = [t for t in os.environ.get("GLIBC_TUNABLES", "").split(":")
                if t and not t.startswith(HUGETLB_TUNABLE + "=")]
    env = dict(os.environ, GLIBC_TUNABLES=":".join([*tunables, HUGETLB_TUNABLE + "=1"]))
    env[_REEXEC_MARK] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    raise AssertionError("unreachable")  # pragma: no cover


def started_as_module(package: str) -> bool:
    """True while `package` is being imported by `python -m <package>.<module>` (the CLI start)."""
    if sys.argv[:1] != ["-m"]:
        return False
    argv = sys.orig_argv
    target = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "-m"), "")
    return target == package or target.startswith(package + ".")


TORCH_OPT_IN = "REFTJAX_IMPORT_TORCH"


def keep_torch_out() -> bool:
    """Make torch look uninstalled to this command-line process; returns whether it did.

    reftjax reads and writes checkpoints and runs tokenizers without torch (the README's main command installs
    none), yet transformers 5 imports torch at start-up wherever it is installed (its config module pulls in its
    RoPE utilities, its activations the hub kernels' `torch.distributed`): ~2.5 s of a run's start-up on the 2-core
    host (BUILD_NOTES, session 54), in Colab or any environment that has torch for other work. A command reftjax
    starts (`python -m experiments.<name>`, `python -m reftjax.<tool>`) runs no torch code, so it sets
    `sys.modules["torch"] = None`: `importlib.util.find_spec("torch")` then answers None, which is how
    transformers decides torch is absent, and `import torch` raises ImportError. Not done when torch is already
    imported, with `REFTJAX_IMPORT_TORCH=1`, nor for an importer (a notebook or program may use torch itself).
    Child processes (the sandbox's fork-servers, a judge server) start interpreters of their own.
    """
    if "torch" in sys.modules or os.environ.get(TORCH_OPT_IN) == "1":
        return False
    sys.modules["torch"] = None
    return True


@contextlib.contextmanager
def torch_unblocked():
    """Lifts `keep_torch_out`'s block for an import that reads `sys.modules["torch"]` as "imported or not" without
    importing torch: scipy's array-API helpers take the None there for a module and raise AttributeError, so
    `import scipy.stats` (which `import nltk` runs: the METEOR grader) failed in reftjax's commands. The block is
    put back after, unless torch was imported meanwhile; a no-op where nothing is blocked."""
    blocked = "torch" in sys.modules and sys.modules["torch"] is None
    if blocked:
        del sys.modules["torch"]
    try:
        yield
    finally:
        if blocked and "torch" not in sys.modules:
            sys.modules["torch"] = None


_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
# XLA:CPU threads a device that `use_core_devices` asks for and `sharding.check_cpu_pool` expects: collectives
# waiting for the other devices hold their threads, and 4 a device most likely deadlocked once in CI (session 43)
POOL_THREADS_PER_DEVICE = 16


def xla_cpu_threads() -> int:
    """The core count XLA:CPU sizes its intra-op pool by (then at least one thread per device): PJRT_NPROC, else
    NPROC (the first that is a whole number; negative counts as 0), else the cores this process may run on
    (`DefaultThreadPoolSize`, xla/pjrt/cpu/cpu_client.cc). Read when the CPU backend starts."""
    for name in ("PJRT_NPROC", "NPROC"):
        try:
            return max(0, int(os.environ[name]))
        except (KeyError, ValueError):
            pass
    return cores()


def cores() -> int:
    """The cores this process may run on (its affinity; XLA's default pool size, unless NPROC says otherwise)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def use_core_devices(count: int | None = None) -> int:
    """Have XLA:CPU present `count` devices (default: one per core this process may use); call before JAX starts.

    XLA:CPU runs a program's ops one after another and spreads an op over the cores only when it is
    large: at decode sizes (GEMMs of 32 rows, norms and softmaxes over [32, ...]) part of a step leaves
    the second core idle. With one device per core, a batch split over a data mesh runs as one program
    per device, side by side, on the same cores. Measured on the 2-core VM (`bench/rollout.py
    --host-devices 2`, BUILD_NOTES session 21; tokens identical): the b=32 256-token greedy rollout of
    SmolLM2-135M took 35.9 s (median of 3) on the 2-device mesh against 39.4 s on one device, but b=8
    took 21.1 s against 17.9 s. So it is an option, not a default of the library or the presets.

    Returns the host device count in force. A count already in XLA_FLAGS stands (the user's choice),
    `REFTJAX_CPU_DEVICES=n` overrides `count` (1: leave XLA's single device), and once JAX's backends
    are up it changes nothing (XLA reads the flag when the CPU backend starts) and returns their count.
    Splitting the CPU also sets NPROC=16n (`POOL_THREADS_PER_DEVICE`) unless NPROC or PJRT_NPROC is set: XLA's pool
    would hold max(cores, n) threads, enough for one collective at a time (`sharding.check_cpu_pool`). The bigger
    pool costs the 2-device rollout speed: 4 a device against max(cores, n), b32 ~13% (BUILD_NOTES, session 36);
    16 a device against 4, b8 ~5% and b32 ~1% (session 43).
    """
    flags = os.environ.get("XLA_FLAGS", "").split()
    for flag in flags:
        if flag.startswith(_DEVICE_COUNT_FLAG + "="):
            return int(flag.partition("=")[2])
    if "jax" in sys.modules:
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():
            import jax

            return len(jax.devices("cpu"))
    env = os.environ.get("REFTJAX_CPU_DEVICES")
    try:
        n = int(env) if env else (count or cores())
    except ValueError:
        raise ValueError(f"REFTJAX_CPU_DEVICES={env!r} must be a whole number of devices") from None
    if n < 1:
        raise ValueError(f"use_core_devices: the device count must be >= 1, got {n}")
    if n > 1:
        os.environ["XLA_FLAGS"] = " ".join([*flags, f"{_DEVICE_COUNT_FLAG}={n}"])
        if "PJRT_NPROC" not in os.environ and "NPROC" not in os.environ:
            # XLA's pool would hold max(cores, n) threads, enough for one collective at a time: a data mesh's step
            # could deadlock (`sharding.check_cpu_pool`). The bigger pool costs some speed (sessions 36 and 43)
            os.environ["NPROC"] = str(POOL_THREADS_PER_DEVICE * n)
    return n


_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16",
              "asimd", "sve", "sve2")


def parse_cpuinfo(text: str) -> dict:
    """The first processor block of a Linux `/proc/cpuinfo`: model name, vendor, family/model and the
    vector-ISA flags that change XLA:CPU's and torch's kernels (x86 `flags` / Arm `Features`); on an Arm board
    without a model name, the board's `Model`, which a Raspberry Pi writes in a last block of its own (read from the
    first block alone, a Pi was named by its CPU part, `0xd08`; mutation review, session 46)."""
    fields: dict[str, str] = {}
    board = None  # (the board's Model, from a later block)
    first_done = False
    for line in text.splitlines():
        if not line.strip():
            first_done = first_done or bool(fields)
            continue
        key, _, value = line.partition(":")
        if not first_done:
            fields.setdefault(key.strip(), value.strip())
        elif key.strip() == "Model" and board is None:
            board = value.strip()
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    return {"model_name": fields.get("model name") or fields.get("Model") or board or fields.get("CPU part") or "",
            "vendor": fields.get("vendor_id") or fields.get("CPU implementer") or "",
            "family_model": f"{fields.get('cpu family', '?')}/{fields.get('model', '?')}",
            "isa": [f for f in _ISA_FLAGS if f in flags]}


def cpu_description() -> dict:
    """What a benchmark figure depends on besides the code: the CPU model, its vector ISA and the cores this
    process may use (every `bench/` JSON line carries it as "cpu"). The same rollout code measured 1.90x
    transformers at batch 32 on an AVX-512 EPYC VM (session 13) and 1.11x on an AVX2-only one (session 15),
    both of this project's 2-core machine kind (BUILD_NOTES): a ratio means little without the host."""
    try:
        with open("/proc/cpuinfo") as f:
            info = parse_cpuinfo(f.read())
    except OSError:
        info = {"model_name": platform.processor() or platform.machine(), "vendor": "", "family_model": "?/?",
                "isa": []}
    return {**info, "machine": platform.machine(), "cores": cores()}
