"""Advantages and losses of REINFORCE, GRPO and PPO (veRL semantics, METHOD.md §6),
as pure functions.

Per-token inputs are ``[N, L]`` over the same token grid as the trajectories;
``mask`` is the loss mask: 1 on policy-sampled tokens only (0 on the prompt, on
documents and feedback the engine inserted, and on padding). Inserted tokens stay
in attention; they only drop out of every loss term here.

Aggregation ``"token_mean"`` divides by the number of masked tokens; pass the
*global* count as ``normalizer`` when a batch is split into micro-batches, and the
micro-batch losses (and gradients) add up to exactly the full-batch ones.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ALGORITHMS = ("reinforce", "grpo", "ppo")
KL_TYPES = ("k1", "k2", "k3")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean")


def reinforce_advantages(rewards: jax.Array, mask: jax.Array) -> jax.Array:
  """The sequence reward on every policy token, no baseline: ``[N] -> [N, L]``."""
  return rewards[:, None].astype(jnp.float32) * mask


def grpo_advantages(rewards: jax.Array, group_ids: jax.Array, eps: float = 1e-6) -> jax.Array:
  """``(r - mean_g) / (std_g + eps)`` within each group (unbiased std); a group of
  one has mean 0 and std 1. ``rewards [N]``, ``group_ids [N]`` -> ``[N]``."""
  rewards = rewards.astype(jnp.float32)
  same = (group_ids[:, None] == group_ids[None, :]).astype(jnp.float32)  # [N, N]
  count = same.sum(axis=1)
  mean = same @ rewards / count
  squares = same @ (rewards ** 2) - count * mean ** 2  # sum over the group of (r - mean)^2
  std = jnp.sqrt(jnp.maximum(squares, 0.0) / jnp.maximum(count - 1, 1))
  single = count == 1
  mean, std = jnp.where(single, 0.0, mean), jnp.where(single, 1.0, std)
  return (rewards - mean) / (std + eps)


def masked_whiten(x: jax.Array, mask: jax.Array, eps: float = 1e-8) -> jax.Array:
  count = jnp.maximum(mask.sum(), 1.0)
  mean = (x * mask).sum() / count
  var = (((x - mean) * mask) ** 2).sum() / jnp.maximum(count - 1, 1.0)
  return (x - mean) * jax.lax.rsqrt(var + eps) * mask


def gae_advantages(token_rewards: jax.Array, values: jax.Array, mask: jax.Array,
                   gamma: float = 1.0, lam: float = 1.0, whiten: bool = True):
  """GAE over the policy tokens of each row (inserted tokens are skipped, not
  time steps). Returns ``(advantages [N, L], returns [N, L])``; advantages are
  whitened over masked tokens when ``whiten``."""
  mask = mask.astype(jnp.float32)

  def step(carry, column):
    next_value, next_gae = carry
    reward, value, m = column
    delta = reward + gamma * next_value - value
    gae = delta + gamma * lam * next_gae
    keep = m > 0
    return (jnp.where(keep, value, next_value), jnp.where(keep, gae, next_gae)), gae * m

  zeros = jnp.zeros(values.shape[:1], jnp.float32)
  columns = (token_rewards.T.astype(jnp.float32), values.T.astype(jnp.float32), mask.T)
  _, advantages = jax.lax.scan(step, (zeros, zeros), columns, reverse=True)
  advantages = advantages.T
  returns = (advantages + values) * mask
  if whiten:
    advantages = masked_whiten(advantages, mask)
  return advantages, returns


def kl_in_reward(algorithm: str) -> bool:
  """Where the KL penalty to the reference goes: PPO puts ``-kl_coef * k1`` into
  each policy token's reward (``advantages_and_returns``); REINFORCE and GRPO add
  ``+kl_coef * KL`` to the loss (``policy_loss``). The one place this is decided."""
  return algorithm == "ppo"


def advantages_and_returns(algorithm: str, rewards: jax.Array, mask: jax.Array,
                           group_ids: jax.Array, old_logp: jax.Array, ref_logp: jax.Array,
                           values: jax.Array, *, kl_coef: float = 0.001, gamma: float = 1.0,
                           lam: float = 1.0):
  """Advantages of one step's trajectories for ``algorithm`` (reinforce | grpo |
  ppo): ``rewards [N]``, per-token ``[N, L]`` inputs, ``group_ids [N]``. Returns
  ``(advantages [N, L], returns [N, L], token_rewards [N, L])``: the sequence
  reward sits on each row's last policy token, and PPO adds ``-kl_coef * k1`` to
  every policy token's reward (its KL lives in the reward, not the loss)."""
  mask = mask.astype(jnp.float32)
  length = mask.shape[1]
  last = length - 1 - jnp.argmax(mask[:, ::-1], axis=1)  # [N] last policy token
  has = (mask.sum(axis=1) > 0).astype(jnp.float32)
  token_rewards = jax.nn.one_hot(last, length) * (rewards * has)[:, None]
  zeros = jnp.zeros_like(mask)
  if algorithm == "reinforce":
    return reinforce_advantages(rewards, mask), zeros, token_rewards
  if algorithm == "grpo":
    return grpo_advantages(rewards, group_ids)[:, None] * mask, zeros, token_rewards
  if algorithm == "ppo":
    if kl_in_reward(algorithm):
      token_rewards = token_rewards - kl_coef * kl_penalty(old_logp, ref_logp, "k1") * mask
    advantages, returns = gae_advantages(token_rewards, values, mask, gamma, lam)
    return advantages, returns, token_rewards
  raise ValueError(f"algorithm={algorithm!r} is not one of {ALGORITHMS}.")


def kl_penalty(logp: jax.Array, ref_logp: jax.Array, kl_type: str) -> jax.Array:
  """Per-token KL estimate to the reference: k1 ``logp - ref``, k2 ``(logp - ref)^2 / 2``,
  k3 (low-variance) ``exp(d) - d - 1`` with ``d = ref - logp``, clamped to [-10, 10]."""
  if kl_type == "k1":
    return logp - ref_logp
  if kl_type == "k2":
    return 0.5 * (logp - ref_logp) ** 2
  if kl_type == "k3":
    d = ref_logp - logp
    return jnp.clip(jnp.exp(d) - d - 1.0, -10.0, 10.0)
  raise ValueError(f"kl_type={kl_type!r} is not one of {KL_TYPES}.")


def aggregate(x: jax.Array, mask: jax.Array, mode: str = "token_mean",
              normalizer: jax.Array | float | None = None) -> jax.Array:
  """Masked mean: over all tokens (``normalizer`` overrides the token count), or of
  per-sequence token means (``normalizer`` overrides the sequence count)."""
  mask = mask.astype(jnp.float32)
  if mode == "token_mean":
    return (x * mask).sum() / (mask.sum() if normalizer is None else normalizer)
  if mode == "seq_mean_token_mean":
    per_seq = (x * mask).sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1.0)
    has = (mask.sum(axis=1) > 0).astype(jnp.float32)
    return (per_seq * has).sum() / (has.sum() if normalizer is None else normalizer)
  raise ValueError(f"aggregation={mode!r} is not one of {AGGREGATIONS}.")


def policy_loss(logp, old_logp, ref_logp, advantages, mask, *, clip_eps: float = 0.2,
                kl_coef: float = 0.001, kl_type: str = "k3", entropy=None,
                entropy_coef: float = 0.0, dual_clip: float | None = None,
                aggregation: str = "token_mean", normalizer=None):
  """The clipped policy-gradient loss ``max(-A rho, -A clip(rho, 1-eps, 1+eps))``
  (optionally dual-clipped at ``-A c`` for A < 0), **plus** ``kl_coef`` times the
  KL to the reference, minus ``entropy_coef`` times the entropy. All ``[N, L]``;
  returns ``(loss, metrics)``."""
  mask = mask.astype(jnp.float32)
  ratio = jnp.exp(logp - old_logp)
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
  pg = jnp.maximum(unclipped, clipped)
  if dual_clip is not None:
    if dual_clip <= 1.0:
      raise ValueError(f"dual_clip={dual_clip} must be > 1 (the paper setting is 3).")
    pg = jnp.where(advantages < 0, jnp.minimum(pg, -advantages * dual_clip), pg)
  agg = lambda x: aggregate(x, mask, aggregation, normalizer)  # noqa: E731
  pg_loss = agg(pg)
  kl = agg(kl_penalty(logp, ref_logp, kl_type)) if kl_coef else jnp.float32(0.0)
  loss = pg_loss + kl_coef * kl
  metrics = {"loss/pg": pg_loss, "loss/kl": kl,
             "loss/clip_frac": agg((clipped > unclipped).astype(jnp.float32)),
             "loss/ratio_mean": agg(ratio)}
  if entropy is not None:
    ent = agg(entropy)
    loss = loss - entropy_coef * ent
    metrics["loss/entropy"] = ent
  metrics["loss/policy"] = loss
  return loss, metrics


def value_loss(values, old_values, returns, mask, *, clip: float = 0.5,
               aggregation: str = "token_mean", normalizer=None):
  """The PPO critic loss, ``0.5 * max((v - R)^2, (v_clipped - R)^2)`` with
  ``v_clipped = old + clip(v - old, -clip, clip)``."""
  clipped = old_values + jnp.clip(values - old_values, -clip, clip)
  per_token = 0.5 * jnp.maximum((values - returns) ** 2, (clipped - returns) ** 2)
  loss = aggregate(per_token, mask, aggregation, normalizer)
  return loss, {"loss/value": loss}


def token_entropy(logits: jax.Array) -> jax.Array:
  """Entropy of each position's next-token distribution, ``[N, L, V] -> [N, L]``."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)
