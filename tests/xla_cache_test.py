"""The persistent compilation cache of pipeline runs (`reftjax.xla_cache`).

Each check that compiles runs in a fresh interpreter: JAX's cache settings are
process-global, and the point is a second process loading what the first compiled.
"""
import errno
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import types
import warnings

import pytest

from reftjax import xla_cache

ROOT = pathlib.Path(__file__).resolve().parents[1]

_PROBE = """
import json, sys
import jax, jax.numpy as jnp
from reftjax import xla_cache
path = xla_cache.enable(None if sys.argv[1] == "default" else sys.argv[1])
stats = xla_cache.CompileStats()
f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum(axis=0) * 3.0)
y = f(jnp.arange(64.0).reshape(8, 8) / 64)
print(json.dumps({"path": path, "y": [float(v) for v in y], "programs_after_one": stats.programs(),
                  **stats.summary()}))
"""


def _probe(setting, env, stderr=False):
    out = subprocess.run([sys.executable, "-c", _PROBE, setting], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return (res, out.stderr) if stderr else res


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env.pop("XLA_FLAGS", None)
    return {**env, "JAX_PLATFORMS": "cpu", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "PYTHONPATH": str(ROOT), **extra}


def test_second_process_loads_the_program_from_the_cache(tmp_path):
    cache = tmp_path / "xla"
    first, second = _probe(str(cache), _env()), _probe(str(cache), _env())
    assert first["path"] == second["path"] == first["cache_dir"] == str(cache)
    assert first["programs"] >= 1 and first["programs_after_one"] == first["programs"]
    assert first["cache_hits"] == 0 and any(cache.iterdir())
    assert second["cache_hits"] >= 1 and second["programs"] == first["programs"]
    assert second["y"] == first["y"]  # the loaded executable computes the same bits


def test_empty_setting_turns_the_cache_off(tmp_path):
    off = _probe("", _env(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "env")))
    assert off["path"] is None and off["cache_dir"] is None and off["cache_hits"] == 0
    assert not (tmp_path / "env").exists()


def test_a_cache_directory_that_cannot_be_written_turns_the_cache_off_with_a_warning(tmp_path):
    """The cache is an optimisation, but a read-only cache root (common on cluster nodes) stopped the run at start-up
    with an OSError traceback (helper review: rc 1 after 3 s). Here the root is a file, which not even root can
    create a directory under."""
    (tmp_path / "home").write_text("a file, not a directory")
    res, err = _probe("default", _env(REFTJAX_CACHE=str(tmp_path / "home")), stderr=True)
    assert res["path"] is None and res["cache_dir"] is None and res["programs"] >= 1
    assert f"{tmp_path / 'home' / 'xla'}: the XLA compilation cache is off" in err


def test_a_cache_directory_that_can_be_read_but_not_written_still_serves_its_programs(tmp_path):
    """A cache filled once and mounted read-only on the workers was turned off whole by the write probe: every
    program compiled again (regression review, with a read-only bind mount). It serves reads now, uncapped (JAX's
    eviction writes access times), and JAX's per-program write warnings are silenced. The mount is mimicked: the
    probe's file creation fails with EROFS (root writes through permission bits)."""
    cache = tmp_path / "xla"
    first = _probe(str(cache), _env())
    assert first["cache_hits"] == 0 and any(cache.iterdir())
    read_only = ("import errno, sys\nfrom reftjax import xla_cache\nclass _ReadOnly:\n    @staticmethod\n"
                 "    def NamedTemporaryFile(**kw):\n        raise OSError(errno.EROFS, 'Read-only file system')\n"
                 "xla_cache.tempfile = _ReadOnly\n" + _PROBE + "import jax, warnings\n"
                 "print(json.dumps({'cap': jax.config.jax_compilation_cache_max_size}))\n"
                 "warnings.warn(f'Error writing persistent compilation cache entry for x: EROFS: {path}/x-cache')\n"
                 "warnings.warn('Error writing persistent compilation cache entry for y: ENOSPC: /elsewhere/y')\n"
                 "import tempfile; xla_cache.tempfile = tempfile; xla_cache.enable(sys.argv[2])\n"
                 "print(json.dumps({'cap': jax.config.jax_compilation_cache_max_size}))\n")
    # a cap (here JAX's own setting) is dropped: JAX's capped cache locks a file in the directory on every read,
    # which a read-only mount refuses, so nothing was served (regression review)
    out = subprocess.run([sys.executable, "-c", read_only, "default", str(tmp_path / "writable")], cwd=ROOT,
                         capture_output=True, text=True,
                         env=_env(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_COMPILATION_CACHE_MAX_SIZE=str(1 << 30)),
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    *_, res, cap, later = [json.loads(line) for line in out.stdout.strip().splitlines()]
    assert res["path"] == res["cache_dir"] == str(cache) and res["cache_hits"] >= 1 and res["y"] == first["y"]
    assert cap == {"cap": -1}
    assert later == {"cap": 1 << 30}  # a writable cache enabled later gets the cap back (it ran uncapped)
    assert f"{cache}: the XLA compilation cache is read-only here" in out.stderr
    # silenced for this directory only: another's failures (a full disk) still show
    assert "entry for x" not in out.stderr and "entry for y: ENOSPC: /elsewhere/y" in out.stderr


def test_default_directory_follows_jax_env_then_reftjax_cache_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("REFTJAX_CACHE", str(tmp_path / "rc"))
    assert xla_cache.cache_dir(None) == str(tmp_path / "env")
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    assert xla_cache.cache_dir(None) == str(tmp_path / "rc" / "xla")
    monkeypatch.delenv("REFTJAX_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert xla_cache.cache_dir(None) == str(tmp_path / "home" / ".cache" / "reftjax" / "xla")
    assert xla_cache.cache_dir("~/c") == str(tmp_path / "home" / "c")
    assert xla_cache.cache_dir("") is None


def test_default_setting_caps_the_cache_size(tmp_path):
    env = _env(REFTJAX_CACHE=str(tmp_path / "rc"))
    code = ("import jax; from reftjax import xla_cache; p = xla_cache.enable(None); "
            "print(p, jax.config.jax_compilation_cache_max_size)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    path, cap = out.stdout.split()
    assert path == str(tmp_path / "rc" / "xla") and int(cap) == xla_cache.DEFAULT_MAX_BYTES


def test_switching_directories_after_a_compile_takes_effect(tmp_path):
    """JAX settles its cache at the first compile (a notebook may have compiled with another directory):
    programs compiled after `enable(b)` go to b, not to the directory in use before."""
    code = ("import sys, jax, jax.numpy as jnp; from reftjax import xla_cache; xla_cache.enable(sys.argv[1]); "
            "jax.jit(lambda x: x + 1)(jnp.ones(3)).block_until_ready(); "
            "xla_cache.enable(sys.argv[2]); jax.jit(lambda x: x * 2 - 1)(jnp.ones(5)).block_until_ready()")
    a, b = tmp_path / "a", tmp_path / "b"
    out = subprocess.run([sys.executable, "-c", code, str(a), str(b)], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert any(a.iterdir()) and any(b.iterdir())
    assert not {p.name for p in a.iterdir()} & {p.name for p in b.iterdir()}


def test_an_entry_left_half_written_by_a_killed_process_is_dropped_and_rewritten(tmp_path):
    """JAX writes `<key>-cache` in place and never replaces an existing key: without the cleanup a truncated entry
    made every later run warn and compile that program again."""
    cache = tmp_path / "xla"
    env = _env(JAX_COMPILATION_CACHE_DIR=str(cache))  # the default setting: capped, so JAX writes -atime files
    first = _probe("default", env)
    entries = sorted(cache.glob("*-cache"))
    assert first["cache_hits"] == 0 and len(entries) == first["programs"] >= 1
    victim = entries[-1]
    victim.write_bytes(victim.read_bytes()[:16])  # killed mid-write: truncated, and no -atime yet
    (cache / (victim.name[: -len("-cache")] + "-atime")).unlink()
    second, err = _probe("default", env, stderr=True)
    assert "Error reading persistent compilation cache" not in err
    assert second["cache_hits"] == len(entries) - 1 and second["y"] == first["y"]
    assert victim.stat().st_size > 16  # compiled again and written whole
    third, err = _probe("default", env, stderr=True)
    assert third["cache_hits"] == len(entries) and "Error reading" not in err


def test_cleanup_drops_broken_entries_and_adopts_complete_ones(tmp_path):
    from jax._src.compilation_cache import compress_executable

    (tmp_path / "k1-cache").write_bytes(b"x")  # no -atime, does not decompress: a killed writer's
    (tmp_path / "k2-cache").write_bytes(b"y")  # has its -atime: not looked at
    (tmp_path / "k2-atime").write_bytes(b"t")
    (tmp_path / "k3-cache").write_bytes(compress_executable(b"a whole entry"))  # complete, from an uncapped writer
    assert xla_cache.drop_unfinished_entries(str(tmp_path)) == ["k1-cache"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k2-atime", "k2-cache", "k3-atime", "k3-cache"]
    assert len((tmp_path / "k3-atime").read_bytes()) == 8  # JAX's timestamp format; checked once


def test_default_setting_caps_a_cache_jax_already_opened(tmp_path):
    """JAX_COMPILATION_CACHE_DIR set and a program compiled before `enable(None)` (a notebook): the cap still takes
    effect (JAX had opened the directory uncapped), and the entries written before it are adopted: JAX's eviction
    fails every later write while one entry lacks its -atime file."""
    code = ("import jax, jax.numpy as jnp; from reftjax import xla_cache; "
            "jax.jit(lambda x: x + 1)(jnp.ones(3)).block_until_ready(); "
            "xla_cache.enable(None); jax.jit(lambda x: x * 2 - 1)(jnp.ones(5)).block_until_ready(); "
            "print(jax.config.jax_compilation_cache_max_size)")
    cache = tmp_path / "xla"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(JAX_COMPILATION_CACHE_DIR=str(cache)),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) == xla_cache.DEFAULT_MAX_BYTES
    assert "Error writing persistent compilation cache" not in out.stderr
    entries = list(cache.glob("*-cache"))
    assert len(entries) >= 2 and all(e.with_name(e.name[: -len("-cache")] + "-atime").exists() for e in entries)


class _FakeJax:
    """Stands in for `jax` and JAX's `compilation_cache` in `xla_cache.enable`: it records what `enable` sets and
    leaves this process's own cache settings alone."""

    def __init__(self, cache_dir=None, cap=-1):
        self.config = types.SimpleNamespace(jax_compilation_cache_dir=cache_dir, jax_compilation_cache_max_size=cap,
                                            update=lambda name, value: setattr(self.config, name, value))
        self.resets = 0

    def set_cache_dir(self, path):
        self.config.jax_compilation_cache_dir = path

    def reset_cache(self):
        self.resets += 1


def _fake_jax(monkeypatch, **kwargs) -> _FakeJax:
    fake = _FakeJax(**kwargs)
    monkeypatch.setattr(xla_cache, "jax", fake)
    monkeypatch.setattr(xla_cache, "compilation_cache", fake)
    monkeypatch.setattr(xla_cache, "_cap_before_read_only", None)
    return fake


def _read_only(monkeypatch, *dirs):
    """The write probe fails in `dirs` as on a read-only mount (root writes through permission bits)."""
    def probe(dir, **kwargs):
        if dir in dirs:
            raise OSError(errno.EROFS, "Read-only file system")
        return tempfile.NamedTemporaryFile(dir=dir, **kwargs)

    monkeypatch.setattr(xla_cache, "tempfile", types.SimpleNamespace(NamedTemporaryFile=probe))


def test_cache_dir_makes_every_setting_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "rel/xla")
    assert xla_cache.cache_dir(None) == os.path.join(os.getcwd(), "rel", "xla")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "~/j")
    assert xla_cache.cache_dir(None) == str(tmp_path / "home" / "j")
    assert xla_cache.cache_dir("c") == os.path.join(os.getcwd(), "c")


def test_enable_caps_only_the_default_setting_and_keeps_a_cap_already_set(tmp_path, monkeypatch):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("REFTJAX_CACHE", str(tmp_path / "rc"))
    fake = _fake_jax(monkeypatch)
    assert xla_cache.enable(None) == fake.config.jax_compilation_cache_dir == str(tmp_path / "rc" / "xla")
    assert fake.config.jax_compilation_cache_max_size == 4 << 30 and fake.resets == 1  # 4 GiB, as documented
    fake = _fake_jax(monkeypatch)
    assert xla_cache.enable(str(tmp_path / "mine")) == fake.config.jax_compilation_cache_dir == str(tmp_path / "mine")
    assert fake.config.jax_compilation_cache_max_size == -1  # a directory of one's own runs as JAX is set
    fake = _fake_jax(monkeypatch, cap=1 << 30)  # JAX_COMPILATION_CACHE_MAX_SIZE
    xla_cache.enable(None)
    assert fake.config.jax_compilation_cache_max_size == 1 << 30


def test_read_only_directories_set_the_cap_aside_once_and_give_it_back(tmp_path, monkeypatch):
    fake = _fake_jax(monkeypatch, cap=1 << 30)
    ro1, ro2, rw = tmp_path / "ro1", tmp_path / "ro2", tmp_path / "rw"
    ro1.mkdir()
    ro2.mkdir()
    _read_only(monkeypatch, str(ro1), str(ro2))
    with warnings.catch_warnings():  # enable silences JAX's write warnings for a read-only directory
        for ro in (ro1, ro2):  # a second read-only directory keeps the cap set aside by the first
            assert xla_cache.enable(str(ro)) == str(ro) and fake.config.jax_compilation_cache_max_size == -1
    assert xla_cache.enable(str(rw)) == str(rw) and fake.config.jax_compilation_cache_max_size == 1 << 30
    fake.config.jax_compilation_cache_max_size = 2 << 30  # set by the user later: it stands
    xla_cache.enable(str(rw))
    assert fake.config.jax_compilation_cache_max_size == 2 << 30


def test_a_directory_that_cannot_be_read_or_a_file_turns_the_cache_off(tmp_path, monkeypatch, caplog):
    fake = _fake_jax(monkeypatch)
    locked, file = tmp_path / "locked", tmp_path / "file"
    locked.mkdir()
    file.write_text("an executable file, not a directory")
    file.chmod(0o755)
    _read_only(monkeypatch, str(locked))
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: path != str(locked) and access(path, mode))
    assert xla_cache.enable(str(locked)) is None and xla_cache.enable(str(file)) is None
    assert fake.config.jax_compilation_cache_dir is None
    assert f"{locked}: the XLA compilation cache is off" in caplog.text
    assert f"{file}: the XLA compilation cache is off" in caplog.text


def test_enable_cleans_a_capped_cache_only(tmp_path, monkeypatch):
    """An uncapped cache is left as it is: JAX writes no -atime files there, so every entry would be read on each
    start (and adopted: given an -atime file)."""
    (tmp_path / "k1-cache").write_bytes(b"x")  # a killed writer's
    _fake_jax(monkeypatch)
    xla_cache.enable(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k1-cache"]
    _fake_jax(monkeypatch, cap=1 << 30)
    xla_cache.enable(str(tmp_path))
    assert not any(tmp_path.iterdir())


def test_cleanup_leaves_other_files_alone_and_writes_jaxs_access_time(tmp_path):
    from jax._src.compilation_cache import compress_executable

    (tmp_path / "notes.txt").write_bytes(b"not an entry")
    (tmp_path / "d-cache").mkdir()  # cannot be read (as an entry another process removed meanwhile)
    (tmp_path / "k3-cache").write_bytes(compress_executable(b"a whole entry"))
    before = time.time_ns()
    assert xla_cache.drop_unfinished_entries(str(tmp_path)) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d-cache", "k3-atime", "k3-cache", "notes.txt"]
    assert before <= int.from_bytes((tmp_path / "k3-atime").read_bytes(), "little") <= time.time_ns()
    assert xla_cache.drop_unfinished_entries(str(tmp_path / "notes.txt")) == []  # not a directory
    assert xla_cache.drop_unfinished_entries(str(tmp_path / "missing")) == []


def test_cleanup_leaves_the_directory_alone_with_a_jax_that_cannot_read_entries(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "jax._src.compilation_cache", types.ModuleType("jax._src.compilation_cache"))
    (tmp_path / "k1-cache").write_bytes(b"x")
    assert xla_cache.drop_unfinished_entries(str(tmp_path)) == [] and (tmp_path / "k1-cache").exists()


def test_compile_stats_count_jaxs_events_since_construction():
    """From JAX's own monitoring events, as JAX records them while it traces, lowers, compiles and loads."""
    import jax

    record = jax.monitoring.record_event_duration_secs
    xla_cache.busy_seconds()  # installs the listeners
    record(xla_cache._COMPILE, 1.0)  # before construction: not counted
    record(xla_cache._SAVED, 1.0)
    jax.monitoring.record_event(xla_cache._HIT)
    busy, stats = xla_cache.busy_seconds(), xla_cache.CompileStats()
    xla_cache.CompileStats()  # listeners are installed once: events are not counted twice
    for event, seconds in [(xla_cache._COMPILE, 0.5), (xla_cache._COMPILE, 0.25), (xla_cache._TRACE[0], 0.1),
                           (xla_cache._TRACE[1], 0.2), (xla_cache._SAVED, 2.0), ("/jax/some/other_event", 9.0)]:
        record(event, seconds)
    jax.monitoring.record_event(xla_cache._HIT)
    assert stats.programs() == 2
    assert stats.summary() == {"programs": 2, "compile_seconds": 0.75, "trace_lower_seconds": 0.3,
                               "cache_dir": jax.config.jax_compilation_cache_dir, "cache_hits": 1,
                               "compile_seconds_saved": 2.0}
    assert xla_cache.busy_seconds() - busy == pytest.approx(0.75 + 0.3)


def test_an_empty_jax_compilation_cache_dir_is_no_setting(tmp_path, monkeypatch):
    """`JAX_COMPILATION_CACHE_DIR=` (emptied to unset it) falls through to $REFTJAX_CACHE/xla, not the working
    directory (mutation review, session 49)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "")
    monkeypatch.setenv("REFTJAX_CACHE", str(tmp_path / "rc"))
    assert xla_cache.cache_dir(None) == str(tmp_path / "rc" / "xla")


def test_default_setting_is_uncapped_without_filelock(tmp_path, monkeypatch):
    """JAX's capped (LRU) cache locks with `filelock`: without it the default cache runs uncapped (session 49)."""
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("REFTJAX_CACHE", str(tmp_path / "rc"))
    fake = _fake_jax(monkeypatch)
    find_spec = xla_cache.importlib.util.find_spec
    monkeypatch.setattr(xla_cache.importlib.util, "find_spec",
                        lambda name, *args: None if name == "filelock" else find_spec(name, *args))
    assert xla_cache.enable(None) == str(tmp_path / "rc" / "xla")
    assert fake.config.jax_compilation_cache_max_size == -1


def test_write_warnings_are_silenced_for_a_read_only_path_with_regex_characters(tmp_path, monkeypatch):
    """The path is matched literally in the warning filter: '+' or '(' in it (session 49)."""
    _fake_jax(monkeypatch)
    ro = tmp_path / "c++ (ro)"
    ro.mkdir()
    _read_only(monkeypatch, str(ro))
    with warnings.catch_warnings(record=True) as caught:  # (enable's filter goes with the block)
        warnings.simplefilter("always")
        assert xla_cache.enable(str(ro)) == str(ro)
        warnings.warn(f"Error writing persistent compilation cache entry for x: EROFS: {ro}/x-cache")
        warnings.warn(f"Error writing persistent compilation cache entry for y: ENOSPC: {tmp_path}/rw/y-cache")
    assert [str(w.message) for w in caught] == [f"Error writing persistent compilation cache entry for y: ENOSPC: "
                                                f"{tmp_path}/rw/y-cache"]


def test_busy_seconds_counts_without_compile_stats(tmp_path):
    """`busy_seconds` alone (no `CompileStats` in the process) counts the compile it brackets (session 49)."""
    code = ("import jax, jax.numpy as jnp; from reftjax import xla_cache; b = xla_cache.busy_seconds(); "
            "jax.jit(lambda x: jnp.tanh(x) * 2)(jnp.ones(3)).block_until_ready(); print(xla_cache.busy_seconds() - b)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.split()[-1]) > 0


def test_a_directory_that_can_be_listed_but_not_searched_turns_the_cache_off(tmp_path, monkeypatch):
    """Mode r-- without x (root searches every directory, so `os.access` is faked): its entries cannot be opened, so
    it is no read-only cache (session 49)."""
    fake = _fake_jax(monkeypatch)
    listed = tmp_path / "listed"
    listed.mkdir()
    _read_only(monkeypatch, str(listed))
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: access(path, mode) and (path != str(listed)
                                                                                  or not mode & os.X_OK))
    assert xla_cache.enable(str(listed)) is None and fake.config.jax_compilation_cache_dir is None
