"""Run as one of 2 JAX processes by tests/sharding_test.py (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID set): prints one JSON line of what this process saw of `evaluate`, `generate`, `Loader` and
`params_to_hf`."""
import json

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from reftjax.sharding import maybe_initialize_distributed

maybe_initialize_distributed()

from reftjax import rollout as R  # noqa: E402
from reftjax.data import Loader, LoaderConfig  # noqa: E402
from reftjax.data.tokenize import TokenizeConfig, TokenizedDataset  # noqa: E402
from reftjax.evaluate import EvalConfig, evaluate  # noqa: E402
from reftjax.graders.base import Grade  # noqa: E402
from reftjax.models import ModelConfig, init_params  # noqa: E402
from reftjax.sharding import MeshConfig, make_mesh, object_from_process_0, place_params  # noqa: E402

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                  eos_token_ids=(2,))
PID = jax.process_index()


class Tok:  # characters in, token ids out as text
    eos_token_id, pad_token_id = 2, 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + ord(c) % 60 for c in text]}

    def batch_decode(self, rows, skip_special_tokens=True):
        return [" ".join(map(str, r)) for r in rows]


class ProcessDependentGrader:
    """Grades that differ between processes, as a P-CoT program calling `random` (or hitting its wall-clock limit
    on a busy host) may."""
    votes_on_answer = True

    def validate(self, item):
        pass

    calls = 0

    def grade_batch(self, items, texts):
        ProcessDependentGrader.calls += 1
        rng = np.random.default_rng([PID, len(texts)])
        return [Grade(float(rng.integers(0, 2)), extracted=str(rng.integers(0, 3))) for _ in texts]


mesh = make_mesh(MeshConfig(data=-1))
params = place_params(jax.device_get(init_params(CFG, jax.random.key(0))), CFG, mesh)
rng = np.random.default_rng(0)
n = 12
ds = TokenizedDataset([rng.integers(3, 64, int(rng.integers(3, 8))).astype(np.int32) for _ in range(n)],
                      [np.zeros(0, np.int32)] * n, None, np.arange(n), 0,
                      TokenizeConfig(max_prompt_len=8, max_target_len=8, prompt_buckets=(8,), seq_buckets=(16,)),
                      {"examples": n, "kept": n})
items = [{"item_id": f"q{i}"} for i in range(n)]
res = evaluate(params, CFG, Tok(), ds, items, ProcessDependentGrader(),
               EvalConfig(batch_size=4, max_new_tokens=3, voting_k=2), mesh=mesh, eos_ids=(2,))

try:  # a failure in process 0 alone raises in every process (they would wait for it in the broadcast for ever)
    object_from_process_0(lambda: 1 / 0)  # (run in process 0 alone)
    raised = None
except Exception as e:  # noqa: BLE001
    raised = f"{type(e).__name__}: {e}"

# payloads of other sizes reuse one broadcast program (a size of its own compiled one each: every evaluation batch)
from reftjax.xla_cache import CompileStats  # noqa: E402

object_from_process_0(lambda: "x")
stats = CompileStats()
sizes_ok = [object_from_process_0(lambda n=n: "y" * n) == "y" * n for n in (10, 100, 500)]
broadcast_programs = stats.programs()

shapes = []
real_rollout = R.rollout


def spy(params, tokens, mask, rng, **kw):
    shapes.append(list(tokens.shape))
    return real_rollout(params, tokens, mask, rng, **kw)


R.rollout = spy
texts = R.generate(params, CFG, Tok(), ["hello", "abc", "xyz!!", "q", "rs"], chat=False, prompt_buckets=(8,),
                   batch_size=4, mesh=mesh, rng=jax.random.key(7))
try:
    Loader(ds, LoaderConfig(batch_size=4, kind="prompt", shuffle=False), mesh=mesh, spec=P(None))
    loader_error = None
except ValueError as e:
    loader_error = str(e)
# an export: params replicated over the processes convert as they are; split ones are refused naming the way out,
# which works (`to_host` on every process)
from reftjax.hf import params_to_hf  # noqa: E402
from reftjax.sharding import to_host  # noqa: E402

exported = {"replicated": len(params_to_hf(params, CFG))}
split = place_params(jax.device_get(init_params(CFG, jax.random.key(0))), CFG, make_mesh(MeshConfig(data=1, fsdp=-1)))
try:
    params_to_hf(split, CFG)
except ValueError as e:
    exported["split_error"] = str(e)
hosted = params_to_hf(to_host(split), CFG)
exported["hosted_equal"] = all(np.array_equal(hosted[k], v) for k, v in params_to_hf(to_host(params), CFG).items())
# a batch of this process's 2 rows over the 4 devices (2 rows a process divide nothing alone: the global 4 do), and
# back whole on every process; a 2-D array of process 0's, as every process reads it
from reftjax.sharding import from_process_0, shard_batch  # noqa: E402

rows = to_host(shard_batch(np.arange(6, dtype=np.int32).reshape(2, 3) + 100 * PID, mesh)).tolist()
first = from_process_0(np.arange(6, dtype=np.float32).reshape(2, 3) + PID)
print(json.dumps({"pid": PID, "accuracy": res["accuracy"], "voting_accuracy": res["voting_accuracy"],
                  "grader_calls": ProcessDependentGrader.calls, "raised": raised, "sizes_ok": sizes_ok,
                  "broadcast_programs": broadcast_programs,
                  "scores": [s["score"] for s in res["samples"]], "generate_rows": shapes, "texts": len(texts),
                  "loader_error": loader_error, "exported": exported, "rows": rows,
                  "first": [list(first.shape), first.tolist()]}))
