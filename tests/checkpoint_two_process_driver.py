"""Run as one of 2 JAX processes x 1 CPU device by tests/checkpoint_test.py (JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID and the checkpoint directory in argv[1]): saves steps 3 and 5 of a state sharded
over both processes, damages the shards of step 5 only process 1 reads, then reads back the best (process 1 also
failing to read step 3's metrics) and the latest step; prints one JSON line: which step each read returned and whose
values this process's shards hold."""
import glob
import json
import os
import sys

import jax
import numpy as np

from reftjax.sharding import maybe_initialize_distributed

maybe_initialize_distributed()

from jax.experimental import multihost_utils  # noqa: E402

from reftjax import sharding  # noqa: E402
from reftjax.checkpoint import CheckpointConfig, Checkpointer, abstract_like  # noqa: E402
from reftjax.models import ModelConfig, init_params  # noqa: E402
from reftjax.steps import OptimConfig, init_state, make_optimizer  # noqa: E402

CFG = ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                  eos_token_ids=(1,))
MESH = sharding.make_mesh(sharding.MeshConfig(fsdp=2))
TX = make_optimizer(OptimConfig(learning_rate=1e-2, schedule="constant", warmup_ratio=0.0), 10)
SHAPES = jax.eval_shape(lambda: init_params(CFG, jax.random.key(0)))


def state(seed):
    rs = np.random.RandomState(seed)
    host = jax.tree.map(lambda s: rs.standard_normal(s.shape).astype(s.dtype), SHAPES)
    return init_state({"policy": sharding.place_params(host, CFG, MESH)}, TX, jax.random.key(0))


def source(params):
    """The saved steps whose values this process's shards of the embedding hold."""
    def local(p):
        return [np.asarray(s.data) for s in p["embed_tokens"]["embedding"].addressable_shards]
    return [s for s in (3, 5) if all(np.array_equal(a, b) for a, b in zip(local(params), local(saved[s])))]


directory = sys.argv[1]
saved = {s: state(s).params["policy"] for s in (3, 5)}
ck = Checkpointer(CheckpointConfig(directory, keep_last=3, keep_best=2, async_save=False))
for s, metric in ((3, 0.5), (5, 0.9)):
    ck.save(s, state(s), {"s": s}, metric=metric, force=True)
ck.wait()
abstract = abstract_like(saved[3])
params, clean_best = ck.restore_best_params(abstract)
seen = {"clean_best": [clean_best, source(params)]}
multihost_utils.sync_global_devices("read clean")
if jax.process_index() == 0:  # (the directory is shared: the files of process 1's shards)
    for f in glob.glob(os.path.join(directory, "5", "state", "ocdbt.process_1", "**", "*"), recursive=True):
        if os.path.isfile(f):
            with open(f, "wb") as out:
                out.write(b"damaged")
multihost_utils.sync_global_devices("damaged")
if jax.process_index() == 1:  # it fails to read step 3's metrics (a one-off I/O error): its own ranking lacks it
    read = ck._metrics_of
    ck._metrics_of = lambda s: None if s == 3 else read(s)
params, best = ck.restore_best_params(abstract)
seen["best"] = [best, source(params)]
restored, extras, latest = ck.restore_latest(abstract_like(state(0)))
seen["latest"] = [latest, source(restored.params["policy"]), extras]
ck.close()
print(json.dumps(seen), flush=True)
