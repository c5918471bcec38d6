"""Where an SFT step's time goes: reftjax vs torch, piece by piece (SmolLM2-135M, 8 x 256, fp32, CPU).

    python bench/sft_breakdown.py [REMAT] [REPEATS] [BATCH] [SEQ]   # none|dots|full (default none), 2, 8, 256

Prints one JSON line of median seconds: forward + loss, forward + backward, the trunk alone
(backward of sum(hidden)), the 49152-vocab head + loss alone (hidden states given), reftjax's full
`sft_step`, and the torch equivalents (transformers model, 2 threads). Companion of bench/sft_step.py.
"""
import os, sys, time, statistics, json
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from reftjax.host import cpu_description, use_hugepage_malloc  # noqa: E402

HOST_ALLOCATOR = use_hugepage_malloc()  # re-executes once, before the heavy imports: reftjax/host.py
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax, jax.numpy as jnp, numpy as np, torch
from reftjax.hf import load_model, local_hf_dir
from reftjax.models import forward
from reftjax import losses
from reftjax.steps import OptimConfig, init_state, make_optimizer, make_sft_step
torch.set_num_threads(2)
remat = sys.argv[1] if len(sys.argv) > 1 else "none"
R = int(sys.argv[2]) if len(sys.argv) > 2 else 2
b = int(sys.argv[3]) if len(sys.argv) > 3 else 8
t = int(sys.argv[4]) if len(sys.argv) > 4 else 256
model = load_model("default", remat=remat); cfg = model.config
toks = np.random.default_rng(0).integers(3, cfg.vocab_size, size=(b, t)).astype(np.int32)
batch = {"tokens": jnp.asarray(toks), "attn_mask": jnp.ones((b, t), jnp.int32), "loss_mask": jnp.ones((b, t), jnp.int32)}
def loss_fn(p, batch):
    logits, _ = forward(p, cfg, batch["tokens"], batch["attn_mask"])
    return losses.sft_loss(logits[:, :-1], batch["tokens"][:, 1:], batch["loss_mask"][:, 1:])[0]
def hidden_fn(p, batch):
    _, h = forward(p, cfg, batch["tokens"], batch["attn_mask"], return_logits=False)
    return jnp.sum(h)
fwd = jax.jit(loss_fn); vg = jax.jit(jax.value_and_grad(loss_fn)); vg_h = jax.jit(jax.value_and_grad(hidden_fn))
h = jnp.asarray(np.random.default_rng(1).normal(size=(b, t, cfg.hidden_size)).astype(np.float32))
emb = model.params["embed_tokens"]["embedding"]
def head(e, h):
    logits = h @ e.T
    return losses.sft_loss(logits[:, :-1], batch["tokens"][:, 1:], batch["loss_mask"][:, 1:])[0]
head_vg = jax.jit(jax.value_and_grad(head, argnums=(0, 1)))
def tm(f, *a):
    out = f(*a); jax.block_until_ready(out)
    ts = []
    for _ in range(R):
        s = time.perf_counter(); jax.block_until_ready(f(*a)); ts.append(time.perf_counter() - s)
    return round(statistics.median(ts), 2)
res = {"remat": remat, "host_allocator": HOST_ALLOCATOR, "load0": os.getloadavg()[0]}
p = model.params
res["jax_fwd_loss"] = tm(fwd, p, batch)
res["jax_fwd_bwd"] = tm(vg, p, batch)
res["jax_fwd_bwd_trunk_only"] = tm(vg_h, p, batch)
res["jax_head_fwd_bwd"] = tm(head_vg, emb, h)
tx = make_optimizer(OptimConfig(learning_rate=1e-5, schedule="constant", warmup_ratio=0.0), 1000)
state = init_state({"policy": jax.tree.map(jnp.copy, p)}, tx, jax.random.key(0))
step = make_sft_step(cfg, tx)
state, m = step(state, batch); jax.block_until_ready(m)
ts = []
for _ in range(R):
    s = time.perf_counter(); state, m = step(state, batch); jax.block_until_ready(m); ts.append(time.perf_counter() - s)
res["jax_full_step"] = round(statistics.median(ts), 2)
from transformers import AutoModelForCausalLM
tmod = AutoModelForCausalLM.from_pretrained(local_hf_dir("default"), dtype=torch.float32); tmod.train()
ids = torch.tensor(toks, dtype=torch.long)
def ttm(f):
    f(); ts = []
    for _ in range(R):
        s = time.perf_counter(); f(); ts.append(time.perf_counter() - s)
    return round(statistics.median(ts), 2)
def tf():
    with torch.no_grad(): tmod(input_ids=ids, labels=ids)
def tfb():
    tmod(input_ids=ids, labels=ids).loss.backward(); tmod.zero_grad(set_to_none=True)
E = tmod.model.embed_tokens.weight.detach().clone().requires_grad_(True)
H = torch.tensor(np.asarray(h)).requires_grad_(True)
def thead():
    lg = H @ E.T
    l = torch.nn.functional.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), ids[:, 1:].reshape(-1)); l.backward()
res["torch_fwd_loss"] = ttm(tf); res["torch_fwd_bwd"] = ttm(tfb); res["torch_head_fwd_bwd"] = ttm(thead)
res["load1"] = os.getloadavg()[0]
print(json.dumps({**res, "cpu": cpu_description()}))
