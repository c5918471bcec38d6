"""Device mesh, logical-axis rules and NamedSharding placement.

One table (`DEFAULT_RULES`) maps the logical axis names that the model attaches
to every parameter (see `reftjax.models.llama`) to mesh axes. The mesh always
has the three named axes ("data", "fsdp", "tensor"); the batch dimension is
split over ("data", "fsdp"), parameters over "fsdp" (ZeRO-3 style) and
"tensor" (Megatron style). The same code runs on 1 CPU device, 8 fake CPU
devices, one GPU or a multi-host TPU slice: only the mesh shape changes.

A dimension that a mesh axis does not divide is left replicated on that axis
rather than failing (e.g. SmolLM2's 9 heads on a tensor axis of 4 would not
split per head; the flattened 576 columns do, and are split).

Activations are split too: the jitted steps and the rollout (`MeshJit`) trace
under their params' mesh, and the model and the rollout pin the batch dimension
of their hidden states and KV caches over the batch axes (`constrain_batch`).

The programs are written for GSPMD's Auto axes (sharding constraints, XLA
propagating the rest). Arrays placed on a mesh with Explicit axes (`jax.make_mesh`'s
default in JAX 0.10) are moved to its Auto twin (`auto_mesh`: the same devices,
names and layout; `to_auto` shares their buffers) when a step, `rollout` or
`init_state` is given them, and what those return lives there. The placement
helpers (`place_params`, `shard_batch`) keep the mesh they are given.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import inspect
import logging
import numbers
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

DEFAULT_RULES: tuple[tuple[str, object], ...] = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("norm", None),
    ("layers", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape. -1 on one axis takes all remaining devices.

    Attributes:
      data: pure data-parallel replicas.
      fsdp: parameter/optimizer sharding axis (also splits the batch).
      tensor: tensor-parallel axis (splits heads, MLP and vocab columns).
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):  # (0 or -2 failed only at make_mesh, after the config was accepted; review, session 30)
        dims = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        if any(isinstance(d, bool) or not isinstance(d, numbers.Integral) or (d < 1 and d != -1)
               for d in dims.values()):
            raise ValueError(f"mesh: every axis must be an integer >= 1 or -1 (all remaining devices), got {dims}")
        for name, d in dims.items():  # (NumPy integers, as a notebook computes them, were taken before; kept)
            object.__setattr__(self, name, int(d))
        if list(dims.values()).count(-1) > 1:
            raise ValueError(f"mesh: at most one axis may be -1, got {dims}")

    def shape(self, n_devices: int) -> tuple[int, int, int]:
        dims = [self.data, self.fsdp, self.tensor]
        if dims.count(-1) > 1:
            raise ValueError(f"MeshConfig: at most one axis may be -1, got {dims}")
        fixed = int(np.prod([d for d in dims if d != -1]))
        if -1 in dims:
            if n_devices % fixed:
                raise ValueError(f"MeshConfig {dims}: {n_devices} devices not divisible by {fixed}")
            dims[dims.index(-1)] = n_devices // fixed
        if int(np.prod(dims)) != n_devices:
            raise ValueError(f"MeshConfig {dims} needs {int(np.prod(dims))} devices, have {n_devices}")
        return tuple(dims)


def maybe_initialize_distributed() -> None:
    """Call `jax.distributed.initialize()` on multi-process setups; a no-op on a single host. Idempotent.

    * TPU pods, SLURM (`srun` with several tasks), Open MPI (`mpirun -n N`, ORTE): JAX detects the cluster
      itself; `JAX_COORDINATOR_ADDRESS`, a TPU pod's `TPU_WORKER_HOSTNAMES`, or SLURM's / Open MPI's task
      variables saying there are several tasks trigger the call (without it each task trained alone, as its
      own process 0, into the same output directory).
    * Any other launcher (e.g. one process per GPU started by hand, or local CPU processes): set
      `JAX_COORDINATOR_ADDRESS=host:port`, `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` (0-based) in each
      process; JAX's own detection does not read the last two.
    """
    if jax.distributed.is_initialized():
        return
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not address and os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") == 0 and not _cluster_tasks():
        return
    n, pid = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_PROCESS_ID")
    if (n is None) != (pid is None):
        raise ValueError("set both JAX_NUM_PROCESSES and JAX_PROCESS_ID (or neither, to let JAX detect the cluster)")
    if n is None:
        jax.distributed.initialize()
        return
    try:
        n_i, pid_i = int(n), int(pid)
    except ValueError:
        raise ValueError(f"JAX_NUM_PROCESSES={n!r} and JAX_PROCESS_ID={pid!r} must be integers") from None
    if not 0 <= pid_i < n_i:
        raise ValueError(f"JAX_PROCESS_ID={pid_i} is not in [0, JAX_NUM_PROCESSES={n_i})")
    jax.distributed.initialize(coordinator_address=address, num_processes=n_i, process_id=pid_i)


_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def _cluster_tasks() -> bool:
    """Whether SLURM or Open MPI launched this process as one of several tasks (the variables JAX's own cluster
    detection reads); ValueError where Open MPI says so but JAX could not find the coordinator."""
    env = os.environ
    if all(v in env for v in _SLURM_VARS) and int(env["SLURM_NTASKS"]) > 1:
        return True
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        if "OMPI_MCA_orte_hnp_uri" not in env and "JAX_COORDINATOR_ADDRESS" not in env:
            raise ValueError(f"Open MPI started {env['OMPI_COMM_WORLD_SIZE']} processes, but JAX finds the "
                             "coordinator only through ORTE (OMPI_MCA_orte_hnp_uri, Open MPI < 5): set "
                             "JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID")
        return True
    return False


def make_mesh(cfg: MeshConfig = MeshConfig(), devices=None) -> Mesh:
    """A Mesh with axes ("data", "fsdp", "tensor") over `devices` (default: all); warns when they are XLA:CPU
    devices whose collectives could exhaust XLA's thread pool (`check_cpu_pool`)."""
    devices = list(jax.devices() if devices is None else devices)
    check_cpu_pool(devices)
    shape = cfg.shape(len(devices))
    try:
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
    except Exception:  # topology helpers do not know fake CPU devices in every order
        arr = np.asarray(devices).reshape(shape)
    return Mesh(arr, AXES)


_POOL_WARNED: set = set()


def check_cpu_pool(devices) -> bool:
    """Warns once (and returns False) when several XLA:CPU devices of this process share an intra-op pool too small
    for their collectives. XLA sizes that pool max(cores, devices) threads, enough for one collective at a time
    (xla/pjrt/cpu/cpu_client.cc), and a thread waiting in a collective's rendezvous holds its thread. A device's part
    of one program can hold several: XLA's thunk executor orders collectives by when they start, not when they
    finish, so a while loop holding collectives (a layer scan's FSDP gathers, say) and a later collective can each
    hold one. Once every thread waits, none completes, and XLA aborts the process after its 40 s rendezvous timeout
    (`Fatal Python error: Aborted` inside a step). With 8 fake devices: a resume test aborted in 2 of 6 runs at 8
    threads (session 36), 1 of 8 on session 43's host; 4 threads a device made it rare, not impossible (a CI worker
    lost, most likely to it, in session 43). XLA reads PJRT_NPROC, else NPROC, in place of the core count
    (`host.xla_cpu_threads`); this asks for `host.POOL_THREADS_PER_DEVICE` (16) threads a device."""
    local = sum(d.platform == "cpu" and d.process_index == jax.process_index() for d in devices)
    if local < 2:
        return True
    from reftjax.host import POOL_THREADS_PER_DEVICE, xla_cpu_threads

    pool = max(xla_cpu_threads(), len(jax.local_devices(backend="cpu")))
    want = POOL_THREADS_PER_DEVICE * local
    if pool >= want:
        return True
    if (local, pool) not in _POOL_WARNED:
        _POOL_WARNED.add((local, pool))
        log.warning("%d XLA:CPU devices share a pool of %d threads: a step can deadlock in its collectives and XLA "
                    "then aborts the process after its rendezvous timeout. Set NPROC=%d in the environment before "
                    "JAX starts (XLA sizes the pool by it, or by PJRT_NPROC when that is set; BUILD_NOTES, sessions "
                    "36 and 43).", local, pool, want)
    return False


def _mesh_axes(name, rules) -> tuple[str, ...]:
    for logical, mesh_axes in rules:
        if logical == name:
            if mesh_axes is None:
                return ()
            return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    return ()


def logical_to_spec(logical: P, shape: tuple[int, ...], mesh: Mesh, rules=DEFAULT_RULES) -> P:
    """Mesh PartitionSpec for an array with logical axis names, dropping non-dividing axes (and trailing
    unsplit dimensions: `P(None, "fsdp")`, not `P(None, "fsdp", None)`)."""
    used: set[str] = set()
    out = []
    for dim, name in zip(shape, tuple(logical) + (None,) * (len(shape) - len(logical))):
        axes = []
        size = 1
        for ax in _mesh_axes(name, rules) if name is not None else ():
            if ax not in mesh.shape:  # a user's mesh without this axis (e.g. `Mesh(devices, ("data",))`)
                continue
            n = mesh.shape[ax]
            if ax in used or n == 1 or dim % (size * n):
                continue
            axes.append(ax)
            size *= n
        used.update(axes)
        out.append(None if not axes else (axes[0] if len(axes) == 1 else tuple(axes)))
    while out and out[-1] is None:  # XLA's spelling of its outputs: P(None, "fsdp", None) and P(None, "fsdp") are
        out.pop()  # the same layout but unequal shardings, so a step's new state missed the jit cache once
    return P(*out)


def tree_shardings(logical_tree, shapes_tree, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedSharding for every leaf of `shapes_tree` (arrays or ShapeDtypeStructs)."""
    return jax.tree.map(lambda spec, x: NamedSharding(mesh, logical_to_spec(spec, x.shape, mesh, rules)),
                        logical_tree, shapes_tree, is_leaf=lambda x: isinstance(x, P))


def param_shardings(cfg, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings of the model's params (computed from shapes only)."""
    from reftjax.models import init_params, param_logical_axes

    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    logical = param_logical_axes(cfg)
    out = tree_shardings(logical, shapes, mesh, rules)
    _warn_replicated(logical, shapes, out, mesh, rules)
    return out


def replicated_share(logical_tree, shapes_tree, shardings_tree, mesh: Mesh, rules=DEFAULT_RULES):
    """(share of parameter bytes, leaf names) that a mesh axis of size > 1 was meant to split (by `rules`) but
    could not (it does not divide the dimension), so every device on that axis holds them whole."""
    total, dropped, names = 0, 0, []
    flat = jax.tree_util.tree_flatten_with_path(shapes_tree)[0]
    specs = jax.tree.leaves(logical_tree, is_leaf=lambda x: isinstance(x, P))
    for (path, x), spec, sh in zip(flat, specs, jax.tree.leaves(shardings_tree)):
        nbytes = int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
        total += nbytes
        wanted = {ax for name in spec if name is not None for ax in _mesh_axes(name, rules)
                  if mesh.shape.get(ax, 1) > 1}  # (a user's mesh may lack an axis: `logical_to_spec` skips it)
        used = {ax for entry in sh.spec if entry is not None
                for ax in (entry if isinstance(entry, tuple) else (entry,))}
        if wanted - used:
            dropped += nbytes
            names.append(jax.tree_util.keystr(path))
    return (dropped / total if total else 0.0), names


def _warn_replicated(logical, shapes, shardings, mesh, rules):
    known = {ax for name, axes in rules if axes is not None and name != "batch"
             for ax in ((axes,) if isinstance(axes, str) else axes)} | set(BATCH_AXES)
    idle = [f"{ax}={n}" for ax, n in mesh.shape.items() if n > 1 and ax not in known]
    if idle:  # (a tunix-style ("fsdp", "tp") mesh: "tp" split nothing, and its devices all did the same work)
        log.warning("mesh %s: nothing is split over axis %s (batches are split over the axes named data and fsdp, "
                    "params by the sharding rules), so its devices repeat each other's work; name the axes data / "
                    "fsdp / tensor (`reftjax.sharding.make_mesh`), or pass rules mapping the params' logical axes "
                    "to it (DEFAULT_RULES)", dict(mesh.shape), ", ".join(idle))
    batch = dict(rules).get("batch", BATCH_AXES)
    if tuple((batch,) if isinstance(batch, str) else batch or ()) != BATCH_AXES:
        log.warning("sharding rules map 'batch' to %r: only parameter placement reads the rules; batches and "
                    "activations are split over the axes named %s", batch, " and ".join(BATCH_AXES))
    share, names = replicated_share(logical, shapes, shardings, mesh, rules)
    if share:
        log.warning("mesh %s: %.0f%% of the parameter bytes stay whole on an axis meant to split them (the axis size "
                    "does not divide their dimensions), so each device there holds them in full, e.g. %s; choose "
                    "mesh sizes that divide the hidden, intermediate and vocabulary sizes", dict(mesh.shape),
                    100 * share, ", ".join(names[:3]))


def put(tree, shardings):
    """Place host arrays with the given shardings; works multi-host (each host fills its shards)."""
    def one(x, s):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

    return jax.tree.map(one, tree, shardings)


def place_params(params_np, cfg, mesh: Mesh | None = None, rules=None):
    """Host params -> device params, sharded over `mesh` when given."""
    if mesh is None:
        return jax.tree.map(lambda x: jax.device_put(np.asarray(x)), params_np)
    return put(params_np, param_shardings(cfg, mesh, rules or DEFAULT_RULES))


def batch_spec(ndim: int) -> P:
    """Batch arrays: leading dimension split over the data axes, the rest replicated."""
    return P(BATCH_AXES, *([None] * (ndim - 1)))


def batch_devices(mesh: Mesh | None) -> int:
    """How many devices the mesh's batch axes (data x fsdp) span: a batch's rows must be a multiple of it (1 with no
    mesh)."""
    return 1 if mesh is None else int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.shape]))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    return NamedSharding(mesh, batch_spec(ndim))


def shard_batch(batch, mesh: Mesh):
    """Place a pytree of host batch arrays (this host's rows) over the mesh's data axes.

    The global rows (this host's x the process count) must be a multiple of the data x fsdp devices. The steps and
    `rollout` also take host (NumPy) batches of any size: they split what divides and replicate the rest.
    """
    split = batch_devices(mesh)

    def place(x):
        x = np.asarray(x)
        rows = (x.shape[0] if x.ndim else 1) * jax.process_count()
        if rows % split:  # (JAX's IndivisibleError named no way out: library-user review, session 28)
            raise ValueError(f"shard_batch: {rows} rows do not split over the mesh's data x fsdp = {split} devices; "
                             f"pass a multiple of {split} rows, or pass the host arrays to the step or rollout "
                             f"unsharded")
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)

    return jax.tree.map(place, batch)


def to_host(tree):
    """NumPy copies of a pytree of arrays, whole on every process.

    Batch-sharded arrays of a multi-process mesh are gathered from all processes
    (`process_allgather`, a collective: every process must call this in the same order);
    everything else is a plain device-to-host copy.
    """
    from jax.experimental import multihost_utils

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(one, tree)


def from_process_0(x: np.ndarray) -> np.ndarray:
    """Process 0's copy of a host array, on every process (a collective: every process calls it, in the same order,
    with the same shape and dtype); `x` itself on one process. For what a host computes that may differ between
    processes: graders run model-written programs in each process's sandbox under a wall-clock limit, and may call
    `random`; the decisions taken on their results (best checkpoint, early stopping) must agree, or the processes
    part ways in collectives. Exact: the bytes are broadcast."""
    a = np.ascontiguousarray(x)
    if jax.process_count() == 1:
        return a
    from jax.experimental import multihost_utils

    raw = multihost_utils.broadcast_one_to_all(a.reshape(-1).view(np.uint8))
    return np.asarray(raw).view(a.dtype).reshape(a.shape)


def object_from_process_0(make):
    """`make()` run in process 0 alone and its result, pickled, sent to every process (a collective, as
    `from_process_0`); `make()` itself on one process. For host work that costs per call, such as grading: an
    evaluation's rows or a verifier-data batch graded by a model-based grader were sent to its judge by every process
    of a multi-process run, N times the requests (the RL rows were graded once; session 42's Known limits)."""
    if jax.process_count() == 1:
        return make()
    import pickle

    raw, error = np.zeros(0, np.uint8), None
    if is_primary():
        try:
            raw = np.frombuffer(pickle.dumps((True, make())), np.uint8)
        except Exception as exc:  # noqa: BLE001 - raised on every process below: the others would wait for ever
            error = exc
            raw = np.frombuffer(pickle.dumps((False, f"{type(exc).__name__}: {exc}")), np.uint8)
    size = int(from_process_0(np.asarray([raw.size], np.int64))[0])
    # sent in a buffer of a power-of-two size (1 KiB at least): each new shape compiles a broadcast program, and
    # every evaluation batch's grades pickle to another size
    buf = np.zeros(max(1024, 1 << (size - 1).bit_length()), np.uint8)
    buf[:raw.size] = raw
    raw = from_process_0(buf)[:size]
    ok, value = pickle.loads(raw.tobytes())  # (process 0's own bytes: what it computed itself)
    if ok:
        return value
    if error is not None:
        raise error
    raise RuntimeError(f"process 0 raised {value}")


def is_primary() -> bool:
    """Whether this process writes the run's files (logs, reports, exports): process 0."""
    return jax.process_index() == 0


@functools.cache
def _flags_program():
    """(sharding of one flag per device, jitted any over them replicated) on a mesh of every device."""
    mesh = Mesh(np.array(jax.devices()), ("p",))
    return NamedSharding(mesh, P("p")), jax.jit(lambda x: x.any(), out_shardings=NamedSharding(mesh, P()))


def any_process_later(flag: bool) -> jax.Array:
    """Whether `flag` is set on any process, dispatched, not awaited: a replicated boolean to read later (a
    collective: every process calls it at the same point)."""
    sharding, any_ = _flags_program()
    return any_(jax.make_array_from_process_local_data(sharding, np.full(jax.local_device_count(), bool(flag))))


def any_process(flag: bool) -> bool:
    """`any_process_later` read at once (a collective; one process: no device work). What lets processes take one
    decision from what each saw alone: stop together, fall back from the same unreadable checkpoint step."""
    if jax.process_count() > 1:
        return bool(np.asarray(any_process_later(flag).addressable_data(0)))
    return bool(flag)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def auto_mesh(mesh: Mesh | None) -> Mesh | None:
    """`mesh` with its Explicit axes made Auto (the same devices, names and order), or `mesh` itself when it has
    none. reftjax's model indexes and contracts sharded arrays without the `out_sharding` annotations that Explicit
    axes (sharding in types) require: on `jax.make_mesh`'s default mesh the first embedding gather of every step
    and rollout raised `ShardingTypeError` (tunix-migrant review, session 38)."""
    types = tuple(getattr(mesh, "axis_types", None) or ())
    if mesh is None or jax.sharding.AxisType.Explicit not in types:
        return mesh
    auto = tuple(jax.sharding.AxisType.Auto if t == jax.sharding.AxisType.Explicit else t for t in types)
    return Mesh(mesh.devices, mesh.axis_names, axis_types=auto)


def _explicit(x) -> bool:
    if isinstance(x, jax.core.Tracer) or not isinstance(x, (jax.Array, jax.ShapeDtypeStruct)):
        return False
    sharding = x.sharding
    return isinstance(sharding, NamedSharding) and auto_mesh(sharding.mesh) is not sharding.mesh


def to_auto(tree):
    """`tree` with every array (or `jax.ShapeDtypeStruct`: a restore target) placed on an Explicit-axis mesh moved to
    the same layout on its `auto_mesh` (the buffers are shared, not copied)."""
    def one(x):
        if not _explicit(x):
            return x
        sharding = NamedSharding(auto_mesh(x.sharding.mesh), x.sharding.spec)
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding, weak_type=x.weak_type)
        return jax.device_put(x, sharding)

    return jax.tree.map(one, tree)


def mesh_of(tree) -> Mesh | None:
    """The Mesh of the first NamedSharding-placed leaf of `tree`, or None (single device)."""
    return next((x.sharding.mesh for x in jax.tree.leaves(tree)
                 if isinstance(getattr(x, "sharding", None), NamedSharding)), None)


def replicated_like(tree, like):
    """`tree` replicated over the mesh of `like` (all processes), or unchanged when `like` has no mesh: a fresh head
    beside sharded params, not left on one device (a jitted step then fails: incompatible devices)."""
    mesh = mesh_of(like)
    return tree if mesh is None else put(tree, jax.tree.map(lambda _: replicated(mesh), tree))


# ----------------------------------------------------------------------------- activations and step outputs
# Params are placed by the rule table, but XLA alone does not split activations over the batch: on an fsdp mesh
# it followed the weights' split of the hidden size, so every device computed the whole batch (PPO on the gpu
# preset: ~35 GiB a device on 8 devices, as much as on one), and a voting rollout of sliced prompts held the whole
# KV cache on every device (helper review, session 23). And a jitted step left to choose its new state's
# shardings re-split params its input held whole, so the next call compiled again. The step wrappers below set a
# context while they trace: `constrain_batch` (called by the model on its hidden states and by the rollout on its
# caches) then splits the batch dimension over the mesh's batch axes, and the new state keeps the old one's layout.

_MESH: contextvars.ContextVar = contextvars.ContextVar("reftjax_activation_mesh", default=None)


@contextlib.contextmanager
def activation_mesh(mesh: Mesh | None):
    """Within it, code traced by `jax.jit` splits activations' batch dimension over `mesh` (`constrain_batch`).
    The step and rollout functions of reftjax set it from their params' mesh; wrap your own `jax.jit` of a
    reftjax function (e.g. `steps.sft_step`) in it when you jit it yourself over a mesh."""
    token = _MESH.set(auto_mesh(mesh))
    try:
        yield
    finally:
        _MESH.reset(token)


def current_mesh() -> Mesh | None:
    """The active `activation_mesh` (inside a reftjax step's trace: its params' mesh), or None."""
    return _MESH.get()


def constrain_batch(x):
    """`x` with its leading (batch) dimension split over the active mesh's batch axes (`activation_mesh`);
    unchanged outside one, on a one-device mesh, or where the axes do not divide the dimension."""
    mesh = _MESH.get()
    if mesh is None or mesh.size == 1 or not hasattr(x, "shape") or not x.shape:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(P("batch"), x.shape, mesh)))


def constrain_lookup(x):
    """An embedding lookup's [B, ...] output split over the batch axes, as `constrain_batch`, by way of the data
    axis alone where the table is split over `fsdp` and the mesh has a `data` or `tensor` axis too: the lookup comes
    out split along its last (hidden) dimension over `fsdp`, and XLA found no efficient way from there to the batch
    split ("Involuntary full rematerialization" in every step's backward on a data x fsdp mesh, in the rollout's
    lookups on a tensor mesh; recompile audit, session 35). Gathering the hidden dimension over `fsdp` first, then
    slicing the batch, is the same collective made explicit. Meshes of `fsdp` alone (the presets') are left to XLA,
    which goes there with an all-to-all."""
    mesh = _MESH.get()
    if mesh is None or mesh.size == 1 or not hasattr(x, "shape") or not x.shape:
        return x
    sizes = dict(mesh.shape)
    if sizes.get("fsdp", 1) > 1 and (sizes.get("data", 1) > 1 or sizes.get("tensor", 1) > 1):
        split = sizes.get("data", 1) > 1 and x.shape[0] % sizes["data"] == 0
        x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P("data") if split else P()))
    return constrain_batch(x)


def place(x, sharding):
    """`x` constrained to `sharding` inside a trace (`reshard` on an Explicit-axis mesh, which rejects
    `with_sharding_constraint`); unchanged for None."""
    if sharding is None:
        return x
    mesh = getattr(sharding, "mesh", None)
    if mesh is not None and jax.sharding.AxisType.Explicit in tuple(mesh.axis_types):
        return jax.sharding.reshard(x, sharding)
    return jax.lax.with_sharding_constraint(x, sharding)


def _fn_name(fn) -> str:
    """The name of a function or of a partial's function (it names the compiled program)."""
    return getattr(fn, "__name__", None) or getattr(getattr(fn, "func", None), "__name__", "step")


def _argument_path(fn, path) -> str:
    """`path` into `(args, kwargs)` as the argument's name and the path within it: `ref_params['layers']...`
    (the bare position, `[0][1]['layers']...`, named no argument: library-user review, session 34)."""
    try:
        (where, key), rest = path[:2], path[2:]
        positional = [p.name for p in inspect.signature(fn).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        name = positional[key.idx] if where.idx == 0 else key.key
    except (IndexError, AttributeError, TypeError, ValueError):  # (no signature, one of *args): the position
        return jax.tree_util.keystr(path)
    return f"{name}{jax.tree_util.keystr(tuple(rest))}"


def _raise_deleted(fn, args, kwargs):
    """A deleted array passed again (after a step donated it) ran a compiled program on freed buffers: PJRT's
    "Buffer has been deleted or donated", an INVALID_ARGUMENT, or on a multi-device mesh a segfault (library-user
    review, session 28: the README's example used the loaded params for two states)."""
    where = [_argument_path(fn, path) for path, x in jax.tree_util.tree_flatten_with_path((args, kwargs))[0]
             if isinstance(x, jax.Array) and x.is_deleted()]
    name = _fn_name(fn)
    raise ValueError(f"{name.lstrip('_')}: {len(where)} argument array(s) were deleted, e.g. {where[0]}: their "
                     f"buffers were donated to an earlier step (make_sft_step and make_ppo_step donate the state "
                     f"they are given, "
                     f"and init_state shares the params it is given); pass a copy, jax.tree.map(jnp.copy, params), "
                     f"of params you use again")


class MeshJit:
    """`jax.jit(fn)` traced under its arguments' mesh (`activation_mesh`, from the first NamedSharding leaf of the
    arguments), so the batch of every activation is split over the mesh.

    `state_step=True` is for `fn(state, *args) -> (new_state, aux)`: the state is donated and the new state keeps
    the incoming state's shardings (as `out_shardings` would), so the next call reuses the program.
    One `jax.jit` per (mesh, state layout): JAX's own cache keys on shapes and shardings' specs, not on which
    devices a mesh holds or on a context, so one trace served another mesh of the same shape (incompatible
    devices) or another state layout (helper review, session 23). Called inside a user's own `jax.jit` it
    traces under the caller's `activation_mesh`. `static_argnames` as for `jax.jit`; `lower` and `_cache_size`
    (summed over the meshes) as `jax.jit`'s. `_cache_size` counts JAX's dispatch-cache entries, which can exceed
    the programs compiled: a step called 4 times on a data x fsdp x tensor mesh held 2 entries for 1 trace and 1
    compile (JAX 0.10.2; tunix-migrant review, session 38). A shardings-only change compiles without tracing, so
    neither a trace count nor this one is exact: `xla_cache.CompileStats` counts compiled programs."""

    def __init__(self, fn, *, state_step: bool = False, static_argnames=()):
        self._fn, self._state_step, self._static = fn, state_step, tuple(static_argnames)
        self._jits: dict = {}
        functools.update_wrapper(self, fn)

    def _jit_for(self, args, kwargs):
        leaves = jax.tree.leaves((args, kwargs))
        if any(isinstance(x, jax.core.Tracer) for x in leaves):  # inside a caller's trace: the caller's mesh
            mesh, pins = _MESH.get(), None
        else:
            if any(isinstance(x, jax.Array) and x.is_deleted() for x in leaves):
                _raise_deleted(self._fn, args, kwargs)
            if any(map(_explicit, leaves)):  # (a mesh with Explicit axes: its Auto twin, `auto_mesh`)
                args, kwargs = to_auto((args, kwargs))
                leaves = jax.tree.leaves((args, kwargs))
            mesh = mesh_of(leaves)  # (the leaves flattened once above)
            args, kwargs = self._committed(mesh, leaves, args, kwargs)
            pins = None
            if self._state_step and mesh is not None and mesh.size > 1:  # (one device: nothing to drift)
                state = args[0] if args else kwargs["state"]
                pins = jax.tree.map(lambda x: x.sharding if isinstance(x, jax.Array) else replicated(mesh), state)
        key = (mesh, None if pins is None else (jax.tree.structure(pins), tuple(jax.tree.leaves(pins))))
        jitted = self._jits.get(key)
        if jitted is None:
            fn = self._fn

            @functools.wraps(fn)
            def traced(*a, **kw):
                token = _MESH.set(mesh)
                try:
                    out = fn(*a, **kw)
                finally:
                    _MESH.reset(token)
                if pins is not None:
                    out = (jax.lax.with_sharding_constraint(out[0], pins),) + tuple(out[1:])
                return out

            traced.__name__ = traced.__qualname__ = _fn_name(fn)
            jitted = self._jits[key] = jax.jit(traced, static_argnames=self._static,
                                               donate_argnames=("state",) if self._state_step else ())
        return jitted, args, kwargs

    def _committed(self, mesh, leaves, args, kwargs):
        """The arguments with every uncommitted array (NumPy, or a jax.Array JAX may still move) committed beside
        the committed ones: replicated over the arguments' mesh, else onto their device. JAX compiles a program per
        commitment, so prompts given as NumPy on one call and placed on the next compiled the rollout twice (helper
        review, session 34's list). With nothing committed nothing is (JAX's default device, and its results stay
        free to move: committing them to one device made a later call beside mesh-placed arrays fail; regression
        review). Python and NumPy scalars stay as they are (weak types), and so does a state_step's donated state
        (placed by `init_state`); with several processes JAX places them as before (the training loop passes placed
        arrays)."""
        def loose(x):
            return isinstance(x, np.ndarray) or (isinstance(x, jax.Array) and not x.committed)
        placed = next((x.sharding for x in leaves if isinstance(x, jax.Array) and x.committed), None)
        if placed is None or not any(map(loose, leaves)):
            return args, kwargs
        if mesh is not None:
            home = replicated(mesh)
        elif len(placed.device_set) == 1:
            home = placed
        else:  # (several devices without a mesh: JAX's own placement)
            return args, kwargs
        if not home.is_fully_addressable:  # (several processes: device_put cannot place a host array there)
            return args, kwargs
        commit = functools.partial(jax.tree.map, lambda x: jax.device_put(x, home) if loose(x) else x)
        if not self._state_step:
            return commit(args), commit(kwargs)
        if args:
            return (args[0], *commit(args[1:])), commit(kwargs)
        return args, {k: v if k == "state" else commit(v) for k, v in kwargs.items()}

    def __call__(self, *args, **kwargs):
        jitted, args, kwargs = self._jit_for(args, kwargs)
        return jitted(*args, **kwargs)

    def lower(self, *args, **kwargs):
        jitted, args, kwargs = self._jit_for(args, kwargs)
        return jitted.lower(*args, **kwargs)

    def _cache_size(self) -> int:
        return sum(j._cache_size() for j in self._jits.values())
