"""What the per-step interrupt agreement of a multi-process run costs the host (2 local JAX processes, CPU).

    python bench/interrupt_poll.py [--size 512] [--loops 40] [--repeats 5]

Each process dispatches a jitted step (`--loops` 512x512 matmuls at `--size`), then times, median of `--repeats`:
  * `train._Interrupt.check()` right after the dispatch: the gather read at once (what every step did until
    session 30): it waits for the step queued before it;
  * `check()` with nothing queued: the collective alone;
  * `train._Interrupt.poll()` right after the dispatch (the loops' per-step call since session 30): the gather
    dispatched, the previous step's read.
The launcher prints one JSON line with both processes' figures (seconds) and `step_s`, one step alone.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def median_call_seconds(call, dispatch, repeats: int, clock=time.perf_counter) -> float:
    """The median of `repeats` timings of `call()`, each made right after `dispatch()` queued a step (None: nothing
    queued); the step is waited for after the timing, so a call that waits on it pays for it and one that does not,
    does not."""
    import numpy as np

    times = []
    for _ in range(repeats):
        y = None if dispatch is None else dispatch()
        t0 = clock()
        call()
        times.append(clock() - t0)
        if y is not None:
            y.block_until_ready()
    return float(np.median(times))


def timed_calls(stop, dispatch) -> dict:
    """Each figure's name -> (the call timed, what is dispatched right before it: `dispatch` queues a step, None
    nothing): `check` after a dispatch, `check` idle, `poll` after a dispatch."""
    return {"check_after_dispatch": (stop.check, dispatch), "check_idle": (stop.check, None),
            "poll_after_dispatch": (stop.poll, dispatch)}


def child(args) -> dict:
    import jax
    import jax.numpy as jnp

    from reftjax.sharding import maybe_initialize_distributed

    maybe_initialize_distributed()
    from reftjax import train as T

    @jax.jit
    def step(x):
        return jax.lax.fori_loop(0, args.loops, lambda i, x: jnp.tanh(x @ x) * 0.5, x)

    x = jnp.full((args.size, args.size), 0.01, jnp.float32)
    step(x).block_until_ready()
    t0 = time.perf_counter()
    step(x).block_until_ready()
    out = {"step_s": time.perf_counter() - t0}
    stop = T._Interrupt()
    stop.check()
    stop.poll()  # compiles the dispatched gather
    for name, (call, dispatch) in timed_calls(stop, lambda: step(x)).items():
        out[name] = median_call_seconds(call, dispatch, args.repeats)
    return {k: round(v, 4) for k, v in out.items()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--loops", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    if "JAX_PROCESS_ID" in os.environ:
        print(json.dumps(child(args)), flush=True)
        return {}
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = []
    for i in range(2):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_NUM_PROCESSES="2",
                   JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_PROCESS_ID=str(i), PYTHONPATH=ROOT)
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:])], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True))
    try:
        outs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(p.returncode for p in procs):
        raise SystemExit(f"a process failed (exit codes {[p.returncode for p in procs]})")
    from reftjax.host import cpu_description

    result = {"bench": "interrupt_poll", "size": args.size, "loops": args.loops, "repeats": args.repeats,
              "processes": [json.loads(o.strip().splitlines()[-1]) for o in outs], "cpu": cpu_description()}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
