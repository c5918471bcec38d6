"""reftjax.host: glibc malloc with transparent huge pages, applied by re-executing the CLI once; the CPU description
that every benchmark line carries."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from reftjax import host

needs_thp = pytest.mark.skipif(not host._hugepages_possible() and host.host_allocator_mode() == "system",
                                reason="needs Linux, glibc >= 2.35 and transparent huge pages not 'never'")

# A worker thread (as XLA's pool threads are) mallocs, touches and frees 256 MiB twice: glibc
# mmaps such a block and unmaps it on free, so each round faults it in again; the fault count
# says whether the pages were 4 KiB (65536 per round) or 2 MiB huge pages (128 per round).
_PROBE = textwrap.dedent("""
    import ctypes, json, resource, threading
    from reftjax.host import host_allocator_mode
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    faults = []
    def work():
        for _ in range(2):
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            p = libc.malloc(256 << 20)
            ctypes.memset(p, 1, 256 << 20)
            libc.free(p)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    t = threading.Thread(target=work); t.start(); t.join()
    print(json.dumps({"mode": host_allocator_mode(), "faults": faults}))
""")


def _run(args, env_extra: dict, drop=()) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", "REFTJAX_HOST_ALLOCATOR", "REFTJAX_HOST_REEXEC", *drop)}
    env.update(env_extra)
    out = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_thp
def test_hugepage_tunable_cuts_page_faults():
    system = _run(["-c", _PROBE], {})
    huge = _run(["-c", _PROBE], {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})
    assert (system["mode"], huge["mode"]) == ("system", "hugepages")
    assert min(system["faults"]) >= 60000, system  # 4 KiB pages, every round
    assert max(huge["faults"]) <= 8000, huge  # huge pages (a fallback to 4 KiB for a few is allowed)


@needs_thp
def test_experiments_cli_reexecutes_once_with_the_tunable():
    info = _run(["-m", "experiments"], {"GLIBC_TUNABLES": "glibc.malloc.check=0"})
    assert info["host_allocator"] == "hugepages"
    # the user's own tunables are kept, ours appended once
    assert info["glibc_tunables"] == "glibc.malloc.check=0:glibc.malloc.hugetlb=1"
    assert "python -m experiments.gsm8k_reft" in info["experiments"]
    assert "python -m experiments.arithmetic_task" not in info["experiments"]  # a library, not runnable
    # a hugetlb value the user set stands (hugetlb=0 was overridden to 1)
    off = _run(["-m", "experiments"], {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert off["host_allocator"] == "system" and off["glibc_tunables"] == "glibc.malloc.hugetlb=0"


@needs_thp
def test_opt_out_and_no_reexec_on_plain_import():
    assert _run(["-m", "experiments"], {"REFTJAX_HOST_ALLOCATOR": "system"})["host_allocator"] == "system"
    code = "import json, os, experiments; print(json.dumps({'mode': experiments.HOST_ALLOCATOR, 'pid': os.getpid()}))"
    assert _run(["-c", code], {})["mode"] == "system"  # a notebook/library import never re-executes


def test_started_as_module(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["-m", "x"])
    monkeypatch.setattr(sys, "orig_argv", ["python", "-u", "-m", "experiments.gsm8k_reft", "x"])
    assert host.started_as_module("experiments")
    monkeypatch.setattr(sys, "orig_argv", ["python", "-m", "experimentsX.y"])
    assert not host.started_as_module("experiments")
    monkeypatch.setattr(sys, "argv", ["/path/pytest"])
    assert not host.started_as_module("experiments")


def test_keep_torch_out_hides_torch_unless_imported_or_asked_for(monkeypatch):
    """A command reftjax starts tells transformers torch is absent (it imported it, ~2.5 s, for nothing reftjax
    runs); torch already imported, or REFTJAX_IMPORT_TORCH=1, leaves it. The CLI's wiring: train_test's OpenAI job
    run, whose import log holds transformers and no torch."""
    import importlib
    import importlib.util

    monkeypatch.delenv(host.TORCH_OPT_IN, raising=False)
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert host.keep_torch_out() and sys.modules["torch"] is None
    assert importlib.util.find_spec("torch") is None  # what transformers' is_torch_available() asks
    with pytest.raises(ImportError):
        importlib.import_module("torch")
    assert not host.keep_torch_out() and sys.modules["torch"] is None  # already decided: unchanged
    imported = object()
    monkeypatch.setitem(sys.modules, "torch", imported)
    assert not host.keep_torch_out() and sys.modules["torch"] is imported
    monkeypatch.delitem(sys.modules, "torch")
    monkeypatch.setenv(host.TORCH_OPT_IN, "1")
    assert not host.keep_torch_out() and "torch" not in sys.modules


# First processor blocks of /proc/cpuinfo as three kinds of host print them (abridged flag lists).
_ZEN3 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC
flags\t\t: fpu sse sse2 avx fma avx2 bmi2 sha_ni

processor\t: 1
vendor_id\t: AuthenticAMD
flags\t\t: fpu avx512f
"""
_ZEN4 = _ZEN3.replace("model\t\t: 1\n", "model\t\t: 17\n").replace(
    "avx2 bmi2", "avx2 avx512f avx512_vnni avx512_bf16 bmi2", 1)
_ARM = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes sve sve2
CPU implementer\t: 0x41
CPU part\t: 0xd4f
"""


def test_parse_cpuinfo_reads_the_first_block_and_the_vector_isa():
    assert host.parse_cpuinfo(_ZEN3) == {"model_name": "AMD EPYC", "vendor": "AuthenticAMD", "family_model": "25/1",
                                         "isa": ["avx2", "fma"]}  # the second block's avx512f is not read
    assert host.parse_cpuinfo(_ZEN4)["isa"] == ["avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni"]
    assert host.parse_cpuinfo(_ZEN4)["family_model"] == "25/17"
    arm = host.parse_cpuinfo(_ARM)
    assert (arm["model_name"], arm["vendor"], arm["isa"]) == ("0xd4f", "0x41", ["asimd", "sve", "sve2"])
    assert host.parse_cpuinfo("") == {"model_name": "", "vendor": "", "family_model": "?/?", "isa": []}


def test_cpu_description_of_this_host():
    import platform

    cpu = host.cpu_description()
    assert cpu["machine"] == platform.machine() and 1 <= cpu["cores"] <= (os.cpu_count() or 1)
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            text = f.read()
        assert cpu["model_name"] and cpu["model_name"] in text
        first = text.split("\n\n")[0]
        flags = next((l.split(":", 1)[1].split() for l in first.splitlines() if l.split(":")[0].strip() in
                      ("flags", "Features")), [])
        assert ("avx2" in cpu["isa"]) == ("avx2" in flags) and ("avx512f" in cpu["isa"]) == ("avx512f" in flags)
    json.dumps(cpu)  # goes into the benches' JSON lines as it is


_DEVICES = textwrap.dedent("""
    import json, os, sys
    from reftjax.host import use_core_devices
    n = use_core_devices(int(sys.argv[1]) if len(sys.argv) > 1 else None)
    import jax
    print(json.dumps({"returned": n, "devices": len(jax.devices("cpu")), "flags": os.environ.get("XLA_FLAGS", ""),
                      "again": use_core_devices(5)}))
""")


def test_use_core_devices_splits_the_cpu_before_jax_starts():
    clean = {"XLA_FLAGS": "--xla_cpu_enable_fast_math=false"}  # a user's other flags are kept
    out = _run(["-c", _DEVICES, "3"], clean)
    assert (out["returned"], out["devices"], out["again"]) == (3, 3, 3)  # once JAX is up, the count stands
    assert out["flags"] == "--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=3"
    cores = len(os.sched_getaffinity(0))
    out = _run(["-c", _DEVICES], clean)  # default: one device per core
    assert (out["returned"], out["devices"]) == (cores, cores)
    out = _run(["-c", _DEVICES, "3"], {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})  # the user's count
    assert (out["returned"], out["devices"]) == (2, 2)
    out = _run(["-c", _DEVICES, "3"], {"XLA_FLAGS": "", "REFTJAX_CPU_DEVICES": "1"})  # opted out
    assert (out["returned"], out["devices"], out["flags"]) == (1, 1, "")
    with pytest.raises(AssertionError, match="REFTJAX_CPU_DEVICES='two' must be a whole number"):
        _run(["-c", _DEVICES], {"XLA_FLAGS": "", "REFTJAX_CPU_DEVICES": "two"})


_POOL = textwrap.dedent("""
    import collections, json, os, sys
    from reftjax.host import use_core_devices, xla_cpu_threads
    n = use_core_devices(int(sys.argv[1]))
    import jax, jax.numpy as jnp
    jax.jit(lambda x: x + 1)(jnp.ones(3)).block_until_ready()
    names = collections.Counter(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
    print(json.dumps({"devices": n, "nproc": os.environ.get("NPROC"), "pool": names["tf_XLAEigen"],
                      "threads": xla_cpu_threads()}))
""")


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts the pool's threads in /proc")
def test_use_core_devices_gives_xlas_pool_sixteen_threads_a_device():
    """XLA:CPU's intra-op pool holds max(cores, devices) threads, enough for one collective at a time (a deadlock and
    XLA's abort in the suite; sessions 36 and 43): splitting the CPU sets NPROC=16n unless NPROC or PJRT_NPROC is set.
    `xla_cpu_threads` reads them as XLA does (PJRT_NPROC first), checked against the pool's real thread count."""
    drop = ("NPROC", "PJRT_NPROC")
    out = _run(["-c", _POOL, "3"], {"XLA_FLAGS": ""}, drop)
    assert (out["devices"], out["nproc"], out["pool"], out["threads"]) == (3, "48", 48, 48)
    out = _run(["-c", _POOL, "3"], {"XLA_FLAGS": "", "NPROC": "5"}, drop)  # the user's stands
    assert (out["nproc"], out["pool"], out["threads"]) == ("5", 5, 5)
    out = _run(["-c", _POOL, "3"], {"XLA_FLAGS": "", "PJRT_NPROC": "7", "NPROC": "5"}, ("PJRT_NPROC",))
    assert (out["pool"], out["threads"]) == (7, 7)  # (XLA reads PJRT_NPROC first)
    out = _run(["-c", _POOL, "3"], {"XLA_FLAGS": "", "PJRT_NPROC": "2"}, drop)  # below the device count
    assert (out["nproc"], out["pool"], out["threads"]) == (None, 3, 2)
    out = _run(["-c", _POOL, "1"], {"XLA_FLAGS": ""}, drop)  # one device: nothing set
    assert (out["devices"], out["nproc"]) == (1, None)


def _possible(tmp_path, monkeypatch, enabled="always [madvise] never\n", libc=("glibc", "2.35"), system="Linux"):
    """`_hugepages_possible` on a host described by the arguments (the THP setting is a file under tmp_path)."""
    for name in ("GLIBC_TUNABLES", "REFTJAX_HOST_ALLOCATOR", "REFTJAX_HOST_REEXEC"):
        monkeypatch.delenv(name, raising=False)
    thp = tmp_path / "thp_enabled"
    if enabled is None:
        thp.unlink(missing_ok=True)
    else:
        thp.write_text(enabled)
    monkeypatch.setattr(host, "_THP_ENABLED", str(thp))
    monkeypatch.setattr(host.platform, "libc_ver", lambda: libc)
    monkeypatch.setattr(host.platform, "system", lambda: system)
    return host._hugepages_possible()


def test_hugepages_need_linux_glibc_2_35_and_transparent_huge_pages(tmp_path, monkeypatch):
    assert _possible(tmp_path, monkeypatch)  # the oldest glibc with the tunable
    assert _possible(tmp_path, monkeypatch, libc=("glibc", "3.0"))
    assert _possible(tmp_path, monkeypatch, enabled="[always] madvise never\n")
    assert not _possible(tmp_path, monkeypatch, libc=("glibc", "2.34"))
    assert not _possible(tmp_path, monkeypatch, libc=("glibc", "2.x"))  # a version it cannot read
    assert not _possible(tmp_path, monkeypatch, libc=("", ""))  # musl, or a static build
    assert not _possible(tmp_path, monkeypatch, system="Darwin")
    assert not _possible(tmp_path, monkeypatch, enabled="always madvise [never]\n")
    assert not _possible(tmp_path, monkeypatch, enabled=None)  # no THP in this kernel
    assert _possible(tmp_path, monkeypatch)
    monkeypatch.setenv("REFTJAX_HOST_ALLOCATOR", "system")
    assert not host._hugepages_possible()
    monkeypatch.setenv("REFTJAX_HOST_ALLOCATOR", "hugepages")
    assert host._hugepages_possible()
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0")  # the user's own setting stands
    assert not host._hugepages_possible()


def test_host_allocator_mode_reads_the_tunable(monkeypatch):
    for value, mode in [("", "system"), ("glibc.malloc.hugetlb=0", "system"), ("glibc.malloc.hugetlb=1", "hugepages"),
                        ("glibc.malloc.check=0:glibc.malloc.hugetlb=2", "hugepages")]:  # 2: also MAP_HUGETLB
        monkeypatch.setenv("GLIBC_TUNABLES", value)
        assert host.host_allocator_mode() == mode, value


def test_use_hugepage_malloc_reexecutes_the_command_line_once(tmp_path, monkeypatch):
    """In-process, `os.execve` recorded: the same interpreter and arguments, the tunable alone in a fresh
    GLIBC_TUNABLES, and the marker that stops a second re-execution."""
    assert _possible(tmp_path, monkeypatch)
    calls = []

    def execve(path, argv, env):
        calls.append((path, argv, env))
        raise SystemExit("re-executed")  # execve does not return

    monkeypatch.setattr(host.os, "execve", execve)
    monkeypatch.setattr(sys, "argv", ["/src/experiments/gsm8k_reft.py", "--steps", "3"])
    monkeypatch.setattr(sys, "orig_argv", [sys.executable, "-u", "-m", "experiments.gsm8k_reft", "--steps", "3"])
    with pytest.raises(SystemExit, match="re-executed"):
        host.use_hugepage_malloc()
    [(path, argv, env)] = calls
    assert path == sys.executable and argv == sys.orig_argv
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1" and env["REFTJAX_HOST_REEXEC"] == "1"
    monkeypatch.setenv("REFTJAX_HOST_REEXEC", "1")  # the re-executed process, had glibc dropped the tunable
    assert host.use_hugepage_malloc() == "system" and len(calls) == 1


def test_xla_cpu_threads_reads_pjrt_nproc_then_nproc_then_the_affinity(monkeypatch):
    monkeypatch.setattr(host.os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    monkeypatch.setattr(host.os, "cpu_count", lambda: 64)
    monkeypatch.delenv("PJRT_NPROC", raising=False)
    monkeypatch.delenv("NPROC", raising=False)
    assert host.cores() == host.xla_cpu_threads() == 3  # the cores this process may run on, not the machine's
    monkeypatch.setenv("NPROC", "many")  # not a whole number: skipped
    assert host.xla_cpu_threads() == 3
    monkeypatch.setenv("NPROC", "5")
    assert host.xla_cpu_threads() == 5
    monkeypatch.setenv("PJRT_NPROC", "-2")  # negative counts as 0
    assert host.xla_cpu_threads() == 0


def test_use_core_devices_refuses_a_count_below_one(monkeypatch):
    from jax._src import xla_bridge

    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)  # as before JAX starts
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv("REFTJAX_CPU_DEVICES", "0")
    with pytest.raises(ValueError, match="must be >= 1, got 0"):
        host.use_core_devices()
    assert os.environ["XLA_FLAGS"] == ""


def test_parse_cpuinfo_prefers_a_model_to_the_cpu_part_and_reads_no_later_block():
    board = _ARM.replace("CPU part", "Model\t\t: Raspberry Pi 5 Model B Rev 1.0\nCPU part")
    assert host.parse_cpuinfo(board)["model_name"] == "Raspberry Pi 5 Model B Rev 1.0"
    later = _ARM + "\nprocessor\t: 1\nmodel name\t: another core\nvendor_id\t: another vendor\n"
    arm = host.parse_cpuinfo(later)  # fields the first block lacks are not taken from the next one
    assert (arm["model_name"], arm["vendor"]) == ("0xd4f", "0x41")
    # ... but a Raspberry Pi names its board in a last block of its own, after every processor's (helper-140)
    pi = (_ARM + "\nprocessor\t: 1\nCPU part\t: 0xd4f\n\nHardware\t: BCM2835\nRevision\t: c03111\n"
          "Model\t\t: Raspberry Pi 4 Model B Rev 1.1\n")
    assert host.parse_cpuinfo(pi) == {**host.parse_cpuinfo(_ARM), "model_name": "Raspberry Pi 4 Model B Rev 1.1"}
    assert host.parse_cpuinfo(_ZEN3 + "\nModel\t: a board\n")["model_name"] == "AMD EPYC"  # (a model name wins)


def test_cpu_description_without_proc_cpuinfo(monkeypatch):
    import platform

    def no_file(*args, **kwargs):
        raise FileNotFoundError("/proc/cpuinfo")

    monkeypatch.setattr(host, "open", no_file, raising=False)
    monkeypatch.setattr(host.os, "sched_getaffinity", lambda pid: {1, 2}, raising=False)
    monkeypatch.setattr(host.os, "cpu_count", lambda: 64)
    cpu = host.cpu_description()
    assert cpu == {"model_name": platform.processor() or platform.machine(), "vendor": "", "family_model": "?/?",
                   "isa": [], "machine": platform.machine(), "cores": 2}


def test_a_users_hugetlb_among_other_tunables_stands_and_an_empty_value_is_not_hugepages(tmp_path, monkeypatch):
    """(Mutation review, session 49.) glibc separates tunables with ':': the user's hugetlb=0 after another tunable is
    theirs (not re-executed to 1), and a hugetlb without a value of 1 or 2 is not huge pages."""
    assert _possible(tmp_path, monkeypatch)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.check=0:glibc.malloc.hugetlb=0")
    assert not host._hugepages_possible() and host.host_allocator_mode() == "system"
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=")
    assert host.host_allocator_mode() == "system"


class _Stream:
    def __init__(self):
        self.flushed = False

    def flush(self):
        self.flushed = True


def test_use_hugepage_malloc_flushes_before_it_reexecutes_and_needs_an_interpreter(tmp_path, monkeypatch):
    """Output still buffered at `execve` is lost with the old process image; an embedded interpreter without
    `sys.executable` is not re-executed (session 49)."""
    assert _possible(tmp_path, monkeypatch)
    calls = []

    def execve(path, argv, env):
        calls.append((sys.stdout.flushed, sys.stderr.flushed))
        raise SystemExit("re-executed")

    monkeypatch.setattr(host.os, "execve", execve)
    monkeypatch.setattr(sys, "orig_argv", [sys.executable, "-m", "experiments.gsm8k_reft"])
    monkeypatch.setattr(sys, "stdout", _Stream())
    monkeypatch.setattr(sys, "stderr", _Stream())
    with pytest.raises(SystemExit, match="re-executed"):
        host.use_hugepage_malloc()
    assert calls == [(True, True)]
    monkeypatch.setattr(sys, "executable", "")
    assert host.use_hugepage_malloc() == "system" and len(calls) == 1


def test_cores_without_an_affinity_call_is_the_cpu_count(monkeypatch):
    """macOS has no `sched_getaffinity` (session 49)."""
    monkeypatch.delattr(host.os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(host.os, "cpu_count", lambda: 8)
    assert host.cores() == 8
    monkeypatch.setattr(host.os, "cpu_count", lambda: None)  # undeterminable
    assert host.cores() == 1


def test_use_core_devices_changes_nothing_once_jax_is_up_and_reads_an_empty_setting_as_unset(monkeypatch):
    """No device-count flag in XLA_FLAGS and JAX already started (a notebook): the count in force is returned and
    neither XLA_FLAGS nor NPROC is touched (session 49). An empty REFTJAX_CPU_DEVICES is no setting."""
    import jax
    from jax._src import xla_bridge

    devices = len(jax.devices("cpu"))  # JAX's backends are up in this process
    for name in ("NPROC", "PJRT_NPROC", "REFTJAX_CPU_DEVICES"):
        monkeypatch.setenv(name, "0")  # (so that monkeypatch restores them, set or not, after the test)
        monkeypatch.delenv(name)
    monkeypatch.setenv("XLA_FLAGS", "")
    assert host.use_core_devices(devices + 3) == devices
    assert os.environ["XLA_FLAGS"] == "" and "NPROC" not in os.environ
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)  # as before JAX starts
    monkeypatch.setenv("REFTJAX_CPU_DEVICES", "")
    assert host.use_core_devices(1) == 1 and os.environ["XLA_FLAGS"] == ""


def test_parse_cpuinfo_skips_leading_blank_lines_and_matches_whole_flags():
    """(Session 49.) A leading blank line does not end the first block; a flag counts only whole: a Bulldozer's
    `fma4` is not `fma`; every ISA flag read is reported, in `_ISA_FLAGS` order."""
    assert host.parse_cpuinfo("\n\n" + _ZEN3) == host.parse_cpuinfo(_ZEN3)
    assert host.parse_cpuinfo(_ZEN3.replace("avx fma avx2", "avx fma4 xop", 1))["isa"] == []
    everything = _ZEN3.replace("sha_ni", "amx_bf16 amx_tile avx_vnni avx512_vnni avx512_bf16 avx512f", 1)
    assert host.parse_cpuinfo(everything)["isa"] == ["avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni",
                                                     "avx_vnni", "amx_tile", "amx_bf16"]
