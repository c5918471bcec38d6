"""ReFT's whole PPO chain (`make_experience` + `ppo_step`) against an independent PyTorch implementation.

The other PPO tests check the pieces: tests/losses_test.py the loss functions against NumPy, tests/steps_test.py the
step wiring against NumPy on reftjax's own completion-aligned arrays, tests/trl_parity_test.py GRPO against TRL.
Here a tiny random Llama runs in both frameworks (transformers' LlamaForCausalLM, eager attention, float32, weights
converted in memory with `reftjax.hf.params_to_hf`), and the torch side is written from the ReFT authors' code
(lqtrung1998/mwp_ReFT `train_rl_reft.py`: `rollout` and `train_one_epoch`; ../shared/REFERENCE.md, "ReFT as the
authors run it") in *their* layout: one full prompt + completion sequence per row, `logits[:, :-1]` against
`ids[:, 1:]`, a response mask over slots P-1 .. EOS-1 of that sequence, the score on the slot that emits EOS (the
last slot when there is no EOS), values read at the same slots, GAE over the whole row with the prompt's part zeroed,
advantages whitened with TRL's Bessel-corrected masked variance, losses summed per row over its response length and
averaged over rows, AdamW after a global-norm clip of the whole model. Nothing of reftjax's layout or code is used
on the torch side; reftjax's completion slot i is the authors' full-sequence slot P-1+i.

Compared: the experience (old and reference log-probs, old values, the KL-shaped rewards (recovered from the
experience's returns and values by inverting GAE: reftjax keeps no reward array), raw and whitened advantages,
returns), then after `ppo_step` the loss, pg/vf losses, pre-clip gradient norm and every updated parameter of the
policy and the value head, for: one epoch with one minibatch and no gradient clip; the authors' two epochs with the
clip active (their 1.0 sits below this batch's gradient norm; the second epoch's ratio and value clips are active);
one epoch of two minibatches (reftjax shuffles rows with its own key: the torch side tries every split of the 4
rows into two ordered minibatches of 2 and the nearest must match).

Tolerances (float32 on both sides; the two frameworks sum in different orders): log-probs, values, rewards, returns
and advantages within 2e-5 absolute (their scale is ~1-5; observed <= 1.4e-6); losses and the gradient norm within
1e-4 relative (observed <= 4e-6); parameter updates (new - old) within 3e-4 of the largest update of that tensor
(observed <= 2.3e-5). AdamW's eps is about the size of a gradient entry here (0.3 unclipped, 5e-3 clipped; the
authors' 1e-8 makes the first step lr * sign(g), blind to the gradient's scale and to the clip); the learning rate
(1e-2) moves every weight well above float32 rounding. Not exercised: reftjax advances the learning-rate schedule on
every minibatch update where the authors step it once per rollout batch (its documented choice,
`steps.ppo_updates_per_step`; the lr here is constant), and weight decay (0 in ReFT).
Mutations of reftjax that this file catches: either clip flipped, the whitening mean kept or its
variance biased, the score one token early, the KL sign, gamma for lambda in GAE, the value loss's 0.5, token-mean
aggregation, the hidden states or only the value read one slot late (session 35, on a scratch copy).
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reftjax.hf import params_to_hf
from reftjax.models import ModelConfig, init_value_head
from reftjax.rollout import Rollout
from reftjax.steps import OptimConfig, PPOConfig, init_state, make_experience_fn, make_optimizer, make_ppo_step

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                  rms_norm_eps=1e-5, max_position_embeddings=64)
PAD, EOS = 0, 2
BETA, GAMMA, LAM, CLIP, VCLIP, VF_COEF = 0.05, 1.0, 0.95, 0.2, 0.2, 5.0  # ReFT N-CoT
LR = 1e-2
SCORES = np.array([1.0, 0.1, 0.0, 1.0], np.float32)
P, N = 5, 6
PROMPT_LENS = [5, 3, 4, 2]  # left-padded
COMPLETION_LENS = [4, 6, 2, 6]  # tokens incl. EOS; row 1 has no EOS (truncated at N), row 3 ends EOS in slot N-1
HAS_EOS = [True, False, True, True]
VALUE_TOL = 2e-5
LOSS_RTOL = 1e-4
UPDATE_TOL = 3e-4


# ----------------------------------------------------------------------------- the batch and models


def _batch():
    rng = np.random.default_rng(0)
    b = len(SCORES)
    prompt, prompt_mask = np.full((b, P), PAD, np.int32), np.zeros((b, P), np.int32)
    comp, comp_mask = np.full((b, N), PAD, np.int32), np.zeros((b, N), np.int32)
    for i in range(b):
        prompt[i, P - PROMPT_LENS[i]:] = rng.integers(3, CFG.vocab_size, PROMPT_LENS[i])
        prompt_mask[i, P - PROMPT_LENS[i]:] = 1
        comp[i, :COMPLETION_LENS[i]] = rng.integers(3, CFG.vocab_size, COMPLETION_LENS[i])  # never PAD or EOS
        if HAS_EOS[i]:
            comp[i, COMPLETION_LENS[i] - 1] = EOS
        comp_mask[i, :COMPLETION_LENS[i]] = 1
    return prompt, prompt_mask, comp, comp_mask


def _policy_params(seed: int, std: float = 0.1):
    """Random float32 reftjax policy params (norm scales 1 + N(0, 0.3) so a mis-mapped norm shows)."""
    from reftjax.models import init_params

    shapes = jax.eval_shape(lambda: init_params(CFG, jax.random.key(0)))
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        if getattr(path[-1], "key", "") == "scale":
            return (1.0 + 0.3 * rng.standard_normal(s.shape)).astype(np.float32)
        return (std * rng.standard_normal(s.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def _initial():
    """(policy, reference policy, value head) as NumPy trees: the reference is the policy perturbed, so the KL term
    of the reward is not zero."""
    policy = _policy_params(0)
    noise = _policy_params(1, std=0.03)
    ref = jax.tree.map(lambda a, e: (a + e).astype(np.float32), policy, noise)
    value_head = jax.tree.map(np.asarray, init_value_head(CFG, jax.random.key(2)))
    return policy, ref, value_head


def _hf_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=CFG.vocab_size, hidden_size=CFG.hidden_size, intermediate_size=CFG.intermediate_size,
                       num_hidden_layers=CFG.num_layers, num_attention_heads=CFG.num_heads,
                       num_key_value_heads=CFG.num_kv_heads, rms_norm_eps=CFG.rms_norm_eps,
                       max_position_embeddings=CFG.max_position_embeddings, tie_word_embeddings=False,
                       attention_dropout=0.0, pad_token_id=PAD, eos_token_id=EOS)


class TorchPolicyWithValueHead(torch.nn.Module):
    """trl's AutoModelForCausalLMWithValueHead as the authors use it: the LM and a Dropout(0.1) + Linear(hidden, 1)
    head on the last hidden state (`hidden_states[-1]`, after the final norm), sharing the backbone; the authors'
    `disable_dropout_in_model` sets every dropout's p to 0."""

    def __init__(self, policy, value_head):
        from transformers import LlamaForCausalLM

        super().__init__()
        self.lm = LlamaForCausalLM(_hf_config()).to(torch.float32)
        self.lm.config._attn_implementation = "eager"
        missing, unexpected = self.lm.load_state_dict(
            {k: torch.tensor(v) for k, v in params_to_hf(policy, CFG).items()}, strict=False)
        assert not unexpected and not [k for k in missing if "rotary" not in k], (missing, unexpected)
        self.dropout = torch.nn.Dropout(0.1)
        self.summary = torch.nn.Linear(CFG.hidden_size, 1)
        with torch.no_grad():
            self.summary.weight.copy_(torch.tensor(value_head["summary"]["kernel"].T))
            self.summary.bias.copy_(torch.tensor(value_head["summary"]["bias"]))
        for m in self.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0

    def forward(self, ids, attn):
        # explicit positions from the mask (RoPE only sees differences, so the authors' default 0..L-1 with left
        # padding gives the same scores up to rounding)
        pos = (attn.long().cumsum(-1) - 1).clamp(min=0)
        out = self.lm(input_ids=ids, attention_mask=attn.long(), position_ids=pos, output_hidden_states=True)
        return out.logits, self.summary(self.dropout(out.hidden_states[-1])).squeeze(-1)


def _logprobs(logits, ids):
    """Authors' `logprobs_from_logits(logits[:, :-1], ids[:, 1:])`: full-sequence slot t scores token t+1."""
    return torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1).float()


def _masked_mean(x, m):
    return (x * m).sum() / m.sum()


def _masked_var(x, m):  # trl.core.masked_var, unbiased (Bessel) as the authors' allgather_masked_whiten uses it
    mean = _masked_mean(x, m)
    var = _masked_mean((x - mean) ** 2, m)
    return var * m.sum() / (m.sum() - 1)


# ----------------------------------------------------------------------------- the torch reference


def torch_experience(model, ref_model, ids, prompt_len: int, scores):
    """The authors' `rollout` after generation: returns a dict of full-sequence [B, L] tensors."""
    attn = ids != PAD  # the authors' `model_attention_mask` (PAD is never sampled)
    with torch.no_grad():
        logits, val = model(ids, attn)
        old_logprob = _logprobs(logits, ids)
        ref_logprob = _logprobs(ref_model(ids, attn)[0], ids)
    b, length = ids.shape
    mask = torch.zeros((b, length))
    mask[:, prompt_len - 1:-1] = 1  # slots that emit a completion token
    score_rew = torch.zeros((b, length))
    score_rew[:, -2] = torch.tensor(scores)  # no EOS: on the slot that emits the last token
    for bidx, tidx in (ids == EOS).nonzero().tolist():  # (no prompt holds EOS)
        mask[bidx, tidx:] = 0
        score_rew[bidx, tidx:] = 0
        score_rew[bidx, tidx - 1] = float(scores[bidx])  # the slot that emits EOS
    kl = (old_logprob - ref_logprob) * mask[:, :-1]
    rew = score_rew.clone()
    rew[:, :-1] -= BETA * kl
    val = val * mask
    adv = torch.zeros((b, length))
    for i in range(b):  # delta_t = r_t + gamma V_{t+1} - V_t, discounted cumulative sum from the end
        delta = rew[i, :-1] + GAMMA * val[i, 1:] - val[i, :-1]
        run = 0.0
        for t in range(length - 2, -1, -1):
            run = delta[t] + GAMMA * LAM * run
            adv[i, t] = run
        adv[i, :prompt_len - 1] = 0
    ret = (adv + val) * mask
    adv = adv * mask
    white = (adv - _masked_mean(adv, mask)) * torch.rsqrt(_masked_var(adv, mask) + 1e-8)  # mean removed
    return {"ids": ids, "attn": attn, "mask": mask, "rew": rew * mask, "val": val, "ret": ret, "adv": adv,
            "white": white, "old_logprob": old_logprob * mask[:, :-1], "ref_logprob": ref_logprob}


def torch_ppo(model, exp, *, minibatches, epochs: int, grad_clip: float):
    """The authors' `train_one_epoch` update loop; `minibatches` lists the row indices of each update (per epoch).
    Returns the per-update stats."""
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=_adam_eps(grad_clip), weight_decay=0.0)
    model.train()
    stats = []
    for _ in range(epochs):
        for rows in minibatches:
            rows = torch.tensor(rows)
            ids, attn, mask = exp["ids"][rows], exp["attn"][rows], exp["mask"][rows]
            cur_val, cur_ret, cur_adv = exp["val"][rows], exp["ret"][rows], exp["white"][rows]
            cur_old = exp["old_logprob"][rows]
            resp_len = torch.clamp(mask.sum(1), min=1.0)
            logits, vpreds = model(ids, attn)
            logprob = _logprobs(logits, ids)
            ratio = torch.exp(logprob - cur_old)
            pg1 = -cur_adv[:, :-1] * ratio
            pg2 = -cur_adv[:, :-1] * torch.clamp(ratio, 1.0 - CLIP, 1.0 + CLIP)
            pg_loss = ((torch.max(pg1, pg2) * mask[:, :-1]).sum(-1) / resp_len).mean()
            vclipped = torch.max(torch.min(vpreds, cur_val + VCLIP), cur_val - VCLIP)
            vf1, vf2 = (vpreds - cur_ret) ** 2, (vclipped - cur_ret) ** 2
            vf_loss = 0.5 * ((torch.max(vf1, vf2) * mask).sum(-1) / resp_len).mean()
            loss = pg_loss + VF_COEF * vf_loss  # no entropy term
            opt.zero_grad()
            loss.backward()
            # (torch divides by norm + 1e-6, optax by norm: 1e-6 relative at a norm of ~1, far below the tolerance)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
            opt.step()
            stats.append({"loss": loss.item(), "pg_loss": pg_loss.item(), "vf_loss": vf_loss.item(),
                          "grad_norm": float(norm),
                          "clipfrac": _masked_mean((pg2 > pg1).float(), mask[:, :-1]).item(),
                          "vf_clipfrac": _masked_mean((vf2 > vf1).float(), mask).item()})
    return stats


# ----------------------------------------------------------------------------- reftjax


def _pc(**kw):
    return PPOConfig(kl_coef=BETA, gamma=GAMMA, gae_lambda=LAM, clip_eps=CLIP, clip_range_value=VCLIP,
                     vf_coef=VF_COEF, **kw)


def _adam_eps(grad_clip: float) -> float:
    """AdamW's eps about the size of a gradient entry (global norm / sqrt(#params) = ~56 / 140 unclipped, 1 / 140
    clipped), so the first step depends on the gradient's size: the authors' 1e-8 makes it lr * sign(g)."""
    return 5e-3 if grad_clip > 0 else 0.3


def _tx(grad_clip: float):
    return make_optimizer(OptimConfig(learning_rate=LR, schedule="constant", warmup_ratio=0.0, weight_decay=0.0,
                                      grad_clip=grad_clip, eps=_adam_eps(grad_clip)), 10)


@pytest.fixture(scope="module")
def setup():
    policy, ref, value_head = _initial()
    prompt, prompt_mask, comp, comp_mask = _batch()
    b = len(SCORES)
    rollout = Rollout(jnp.asarray(prompt), jnp.asarray(prompt_mask), jnp.asarray(comp),
                      jnp.zeros((b, N), jnp.float32), jnp.asarray(comp_mask), jnp.asarray(comp_mask.sum(1)),
                      jnp.asarray(HAS_EOS), jnp.arange(b, dtype=jnp.int32))
    params = {"policy": jax.tree.map(jnp.asarray, policy), "value_head": jax.tree.map(jnp.asarray, value_head)}
    exp, _ = make_experience_fn(CFG, _pc())(params, jax.tree.map(jnp.asarray, ref), rollout,
                                            jnp.zeros(b, jnp.int32), jnp.asarray(SCORES))
    ids = torch.tensor(np.concatenate([prompt, comp], axis=1), dtype=torch.long)
    ref_model = TorchPolicyWithValueHead(ref, value_head).eval()
    texp = torch_experience(TorchPolicyWithValueHead(policy, value_head).eval(), ref_model, ids, P, SCORES)
    return {"policy": policy, "value_head": value_head, "exp": exp, "texp": texp}


def _completion(x, dtype=np.float64):
    """Authors' full-sequence [B, L] (or [B, L-1] log-prob) slots P-1 .. L-2 -> reftjax's completion slots 0..N-1."""
    return np.asarray(x.detach().numpy(), dtype)[:, P - 1:P - 1 + N]


def _close(name, ours, ref, mask, tol):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    diff = float(np.abs(np.where(mask, ours - ref, 0.0)).max())
    assert diff <= tol, f"{name}: max |reftjax - torch| = {diff:.3g} > {tol}"
    return diff


def test_the_batch_covers_eos_truncation_and_padding(setup):
    exp, texp = setup["exp"], setup["texp"]
    m = np.asarray(exp.mask_BxN) > 0
    np.testing.assert_array_equal(m, _completion(texp["mask"]) > 0)  # the two masks agree: EOS included
    assert m.sum(1).tolist() == COMPLETION_LENS
    lp_old, lp_ref = np.asarray(exp.logp_old_BxN), np.asarray(exp.logp_ref_BxN)
    assert np.abs(lp_old - lp_ref)[m].min() > 1e-3  # a reference other than the policy: the KL term matters


def test_experience_matches_the_authors_rollout(setup):
    exp, texp = setup["exp"], setup["texp"]
    m = np.asarray(exp.mask_BxN) > 0
    diffs = {
        "logp_old": _close("logp_old", exp.logp_old_BxN, _completion(texp["old_logprob"]), m, VALUE_TOL),
        "logp_ref": _close("logp_ref", exp.logp_ref_BxN, _completion(texp["ref_logprob"]), m, VALUE_TOL),
        "values": _close("values", exp.values_old_BxN, _completion(texp["val"]), m, VALUE_TOL),
        "returns": _close("returns", exp.returns_BxN, _completion(texp["ret"]), m, VALUE_TOL),
        "advantages": _close("advantages", exp.advantages_BxN, _completion(texp["white"]), m, VALUE_TOL),
    }
    # outside the mask reftjax zeroes what the authors multiply by the mask afterwards
    for x in (exp.values_old_BxN, exp.returns_BxN, exp.advantages_BxN):
        assert not np.asarray(x)[~m].any()
    # the KL-shaped rewards, recovered from reftjax's returns and values by inverting GAE (V_N = 0, A_N = 0):
    # A_t = R_t - V_t, r_t = A_t - gamma lam A_{t+1} - gamma V_{t+1} + V_t
    v = np.where(m, np.asarray(exp.values_old_BxN, np.float64), 0.0)
    a = np.where(m, np.asarray(exp.returns_BxN, np.float64), 0.0) - v
    shift = lambda x: np.concatenate([x[:, 1:], np.zeros_like(x[:, :1])], axis=1)  # noqa: E731
    rew = a - GAMMA * LAM * shift(a) - GAMMA * shift(v) + v
    diffs["rewards"] = _close("rewards", rew, _completion(texp["rew"]), m, 4 * VALUE_TOL)
    # the raw (unwhitened) advantages too: whitening is checked apart from GAE
    diffs["raw_advantages"] = _close("raw_advantages", a, _completion(texp["adv"]), m, VALUE_TOL)
    print("experience max |diff|:", {k: f"{d:.1e}" for k, d in diffs.items()})


def _reftjax_update(setup, *, epochs, minibatch_size, grad_clip):
    pc = _pc(ppo_epochs=epochs, minibatch_size=minibatch_size)
    tx = _tx(grad_clip)
    params = {"policy": jax.tree.map(jnp.asarray, setup["policy"]),
              "value_head": jax.tree.map(jnp.asarray, setup["value_head"])}
    state = init_state(params, tx, jax.random.key(7))
    new, metrics = make_ppo_step(CFG, tx, pc)(state, setup["exp"])
    return jax.tree.map(np.asarray, new.params), {k: np.asarray(v) for k, v in metrics.items()}


def _torch_update(setup, *, minibatches, epochs, grad_clip):
    model = TorchPolicyWithValueHead(setup["policy"], setup["value_head"])
    stats = torch_ppo(model, setup["texp"], minibatches=minibatches, epochs=epochs, grad_clip=grad_clip)
    sd = {k: v.detach().numpy().astype(np.float64) for k, v in model.lm.state_dict().items() if "rotary" not in k}
    sd["v_head.summary.weight"] = model.summary.weight.detach().numpy().astype(np.float64)
    sd["v_head.summary.bias"] = model.summary.bias.detach().numpy().astype(np.float64)
    return sd, stats


def _as_torch_names(params):
    out = {k: np.asarray(v, np.float64) for k, v in params_to_hf(params["policy"], CFG).items()}
    out["v_head.summary.weight"] = np.asarray(params["value_head"]["summary"]["kernel"], np.float64).T
    out["v_head.summary.bias"] = np.asarray(params["value_head"]["summary"]["bias"], np.float64)
    return out


def _update_error(before, ours, ref) -> dict:
    """Per tensor: max |(ours - before) - (ref - before)| / max |ref - before|."""
    return {k: float(np.abs(ours[k] - ref[k]).max() / max(np.abs(ref[k] - before[k]).max(), 1e-30)) for k in ref}


def _check_update(setup, ours_params, ours_metrics, ref_params, ref_stats):
    before = _as_torch_names({"policy": setup["policy"], "value_head": setup["value_head"]})
    ours = _as_torch_names(ours_params)
    assert set(ours) == set(ref_params)
    for k in ref_params:  # every tensor moved (the update is visible)
        assert np.abs(ref_params[k] - before[k]).max() > 1e-4, k
    err = _update_error(before, ours, ref_params)
    worst = max(err, key=err.get)
    assert err[worst] <= UPDATE_TOL, f"update of {worst} off by {err[worst]:.3g} of its size"
    n = len(ref_stats)
    assert int(ours_metrics["updates"]) == n and int(ours_metrics["skipped"]) == 0
    rel = {}
    for key in ("loss", "pg_loss", "vf_loss", "grad_norm"):
        want = np.mean([s[key] for s in ref_stats])  # reftjax reports the mean over the updates
        rel[key] = abs(float(ours_metrics[key]) - want) / max(abs(want), 1e-6)
        assert rel[key] <= LOSS_RTOL, f"{key}: reftjax {float(ours_metrics[key])} torch {want}"
    for key in ("clipfrac", "vf_clipfrac"):
        assert float(ours_metrics[key]) == pytest.approx(np.mean([s[key] for s in ref_stats]), abs=1e-6), key
    print(f"worst update error {err[worst]:.1e} ({worst}); metric rel. errors", {k: f"{v:.1e}" for k, v in rel.items()})
    return err, rel


def test_one_epoch_one_minibatch_no_clip(setup):
    ours_params, metrics = _reftjax_update(setup, epochs=1, minibatch_size=None, grad_clip=0.0)
    ref_params, stats = _torch_update(setup, minibatches=[[0, 1, 2, 3]], epochs=1, grad_clip=0.0)
    _check_update(setup, ours_params, metrics, ref_params, stats)
    assert stats[0]["clipfrac"] == 0 and stats[0]["vf_clipfrac"] == 0  # on-policy: ratio 1, values unmoved


def test_two_epochs_with_the_clips_active(setup):
    ours_params, metrics = _reftjax_update(setup, epochs=2, minibatch_size=None, grad_clip=1.0)
    ref_params, stats = _torch_update(setup, minibatches=[[0, 1, 2, 3]], epochs=2, grad_clip=1.0)
    assert min(s["grad_norm"] for s in stats) > 1.0  # the gradient clip acted on both updates
    assert stats[1]["clipfrac"] > 0 and stats[1]["vf_clipfrac"] > 0  # so did the ratio and value clips
    _check_update(setup, ours_params, metrics, ref_params, stats)


def test_one_epoch_two_minibatches(setup):
    ours_params, metrics = _reftjax_update(setup, epochs=1, minibatch_size=2, grad_clip=1.0)
    before = _as_torch_names({"policy": setup["policy"], "value_head": setup["value_head"]})
    ours = _as_torch_names(ours_params)
    tried = []
    for first in itertools.combinations(range(4), 2):  # reftjax's shuffle: find the split it drew
        split = [list(first), [i for i in range(4) if i not in first]]
        ref_params, stats = _torch_update(setup, minibatches=split, epochs=1, grad_clip=1.0)
        tried.append((max(_update_error(before, ours, ref_params).values()), split, ref_params, stats))
    tried.sort(key=lambda t: t[0])
    assert tried[1][0] > 100 * UPDATE_TOL, tried[:2]  # the split matters: only one of them can match
    _, split, ref_params, stats = tried[0]
    assert min(s["grad_norm"] for s in stats) > 1.0  # the gradient clip acted
    _check_update(setup, ours_params, metrics, ref_params, stats)
