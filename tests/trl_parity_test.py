"""GRPO against TRL: its own `GRPOTrainer._compute_loss` code, and its advantage formula (copied from
grpo_trainer.py, with TRL's nanstd; TRL pinned in the test extra). The NumPy references in losses_test.py are
ours; this is the implementation TRL/verl users compare with.

`_compute_loss` is called unbound with a stand-in `self` whose log-prob function returns a leaf tensor, so torch
autograd gives d loss / d log-probs, compared with jax.grad of `losses.grpo_loss` on the same numbers. TRL's KL
term is taken with `use_bias_correction_kl=False` (reftjax's k3 term; TRL 1.16 defaults to True, which scales it
by the ratio).
"""
from collections import defaultdict
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reftjax import losses

torch = pytest.importorskip("torch")


def _grpo_trainer():
    """TRL's grpo_trainer module, imported by the tests that use it (~4 s: not in every xdist worker's collection).
    The test extra installs TRL; one that is installed but fails to import is an error, not a skip."""
    return pytest.importorskip("trl.trainer.grpo_trainer", exc_type=ModuleNotFoundError)


def _batch(seed=0, group=4, length=7):
    """4 prompts x 4 samples: random rewards, an all-equal group, one success, all zero; rows of every length
    (an empty one, a one-token one, a full one); ratios often outside the clip range."""
    rng = np.random.default_rng(seed)
    rewards = np.concatenate([rng.normal(size=group), np.ones(group), np.eye(group)[0], np.zeros(group)])
    lengths = rng.integers(1, length + 1, size=rewards.size)
    lengths[[3, 5, 6]] = 0, 1, length
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.float64)
    old = -np.abs(rng.normal(1.0, 0.7, size=mask.shape))
    new, ref = old + rng.normal(0, 0.3, size=mask.shape), old + rng.normal(0, 0.2, size=mask.shape)
    for a in (old, new, ref):
        a[mask == 0] = 5.0  # finite junk on padding (TRL multiplies by the mask)
    return rewards, mask, old, new, ref


class _Accelerator:
    num_processes = 1

    def gather(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x


def _trl_loss(new, old, ref, adv, mask, *, loss_type, beta, eps=0.2, eps_high=None):
    """TRL 1.16's GRPOTrainer._compute_loss on these log-probs -> (loss, d loss / d new, its metrics)."""
    leaf = torch.tensor(new, requires_grad=True)
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (leaf, torch.zeros_like(leaf), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level="token", beta=beta, loss_type=loss_type, epsilon_low=eps,
        epsilon_high=eps if eps_high is None else eps_high,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1), use_vllm=False,
        vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=mask.shape[1], accelerator=_Accelerator(),
        _entropy_bonus_enabled=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    rows = mask.shape[0]
    inputs = {"prompt_ids": torch.zeros(rows, 1, dtype=torch.long),
              "prompt_mask": torch.ones(rows, 1, dtype=torch.long),
              "completion_ids": torch.zeros(mask.shape, dtype=torch.long), "completion_mask": torch.tensor(mask),
              "advantages": torch.tensor(adv), "old_per_token_logps": torch.tensor(old),
              "ref_per_token_logps": torch.tensor(ref), "num_items_in_batch": torch.tensor(mask.sum())}
    loss = _grpo_trainer().GRPOTrainer._compute_loss(trainer, None, inputs)
    loss.backward()
    return loss.item(), leaf.grad.numpy(), {k: v[-1] for k, v in trainer._metrics["train"].items()}


def _trl_advantages(rewards, group, scale):
    """TRL 1.16's GRPOTrainer advantage lines (one reward function, scale_rewards "group", "batch" or "none")."""
    r = torch.tensor(rewards).view(-1, group)
    adv = (r - r.mean(1, keepdim=True)).view(-1)
    if scale == "group":
        adv = adv / (_grpo_trainer().nanstd(r, dim=1).repeat_interleave(group) + 1e-4)
    elif scale == "batch":
        adv = adv / (_grpo_trainer().nanstd(r.view(-1)).expand_as(adv) + 1e-4)
    return adv.numpy()


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_advantages_match_trl(scale):
    rewards = _batch()[0]
    ours = np.asarray(losses.grpo_advantages(jnp.asarray(rewards, jnp.float32), 4, scale=scale))
    np.testing.assert_allclose(ours, _trl_advantages(rewards, 4, scale), rtol=1e-5, atol=1e-5)
    assert np.all(ours[4:8] == 0)  # an all-equal group teaches nothing


@pytest.mark.parametrize("loss_type, loss_agg", [("grpo", "seq-mean-token-mean"), ("bnpo", "token-mean")])
@pytest.mark.parametrize("beta, eps_high", [(0.0, None), (0.04, None), (0.04, 0.28)])
def test_grpo_loss_and_gradient_match_trl(loss_type, loss_agg, beta, eps_high):
    rewards, mask, old, new, ref = _batch()
    adv = _trl_advantages(rewards, 4, "group")
    loss_trl, grad_trl, metrics_trl = _trl_loss(new, old, ref, adv, mask, loss_type=loss_type, beta=beta,
                                                eps_high=eps_high)

    def ours(logp):
        f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
        return losses.grpo_loss(logp, f32(old), f32(ref), f32(adv), f32(mask), 0.2, beta, loss_agg,
                                clip_eps_high=eps_high)

    (loss, metrics), grad = jax.value_and_grad(ours, has_aux=True)(jnp.asarray(new, jnp.float32))
    assert abs(float(loss) - loss_trl) <= 1e-5 * max(1.0, abs(loss_trl))
    np.testing.assert_allclose(np.asarray(grad) * mask, grad_trl * mask, rtol=1e-4, atol=1e-6)
    assert np.all(np.asarray(grad)[mask == 0] == 0)  # nothing flows into padding
    assert float(metrics["clipfrac"]) > 0.05  # the clip is exercised
    if eps_high is not None:  # and the wider clip above 1 changes the loss (DAPO's clip-higher, TRL's epsilon_high)
        assert abs(loss_trl - _trl_loss(new, old, ref, adv, mask, loss_type=loss_type, beta=beta)[0]) > 1e-4
    if beta:
        np.testing.assert_allclose(float(metrics["kl_k3"]), metrics_trl["kl"], rtol=1e-5)
