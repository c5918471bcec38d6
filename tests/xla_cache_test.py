"""The persistent compilation cache of pipeline runs (`reftjax.xla_cache`).

Each check that compiles runs in a fresh interpreter: JAX's cache settings are
process-global, and the point is a second process loading what the first compiled.
"""
import json
import os
import pathlib
import subprocess
import sys

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
