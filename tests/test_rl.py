"""RL math on literal arrays against hand / numpy computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zsjax import rl


def test_grpo_advantages_by_hand():
  rewards = jnp.array([1.0, 0.0, 0.5, 2.0, 3.0, 7.0])
  groups = jnp.array([10, 10, 10, 42, 42, 5])  # ids need not be contiguous
  got = np.asarray(rl.grpo_advantages(rewards, groups))
  g1 = np.array([1.0, 0.0, 0.5])
  want1 = (g1 - g1.mean()) / (g1.std(ddof=1) + 1e-6)
  g2 = np.array([2.0, 3.0])
  want2 = (g2 - g2.mean()) / (g2.std(ddof=1) + 1e-6)
  np.testing.assert_allclose(got[:3], want1, rtol=1e-5)
  np.testing.assert_allclose(got[3:5], want2, rtol=1e-5)
  np.testing.assert_allclose(got[5], 7.0 / (1 + 1e-6), rtol=1e-6)  # group of one: mean 0, std 1
  same = rl.grpo_advantages(jnp.array([1.0, 1.0]), jnp.array([0, 0]))
  np.testing.assert_allclose(same, [0.0, 0.0])


def test_reinforce_broadcasts_on_policy_tokens():
  mask = jnp.array([[0, 1, 1, 0], [1, 0, 0, 1]])
  np.testing.assert_allclose(rl.reinforce_advantages(jnp.array([2.0, -1.0]), mask),
                             [[0, 2, 2, 0], [-1, 0, 0, -1]])


def test_gae_skips_inserted_tokens_and_telescopes_at_gamma_lambda_one():
  rewards = np.zeros((1, 6), np.float32)
  rewards[0, 5] = 1.0
  values = np.array([[0.5, 0.2, 9.0, 9.0, 0.3, 0.4]], np.float32)
  mask = np.array([[1, 1, 0, 0, 1, 1]], np.float32)  # positions 2-3 were inserted documents
  adv, ret = rl.gae_advantages(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask),
                               whiten=False)
  # gamma = lambda = 1: advantage = (sum of future rewards over policy tokens) - value
  want = np.array([[1 - 0.5, 1 - 0.2, 0, 0, 1 - 0.3, 1 - 0.4]])
  np.testing.assert_allclose(adv, want, rtol=1e-6)
  np.testing.assert_allclose(ret, mask * 1.0, rtol=1e-6)
  white, _ = rl.gae_advantages(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask))
  kept = np.asarray(white)[mask == 1]
  assert abs(kept.mean()) < 1e-6 and abs(kept.std(ddof=1) - 1) < 1e-4
  assert (np.asarray(white)[mask == 0] == 0).all()


def test_gae_with_discount_by_hand():
  rewards = jnp.array([[0.0, 0.0, 1.0]])
  values = jnp.array([[0.1, 0.2, 0.3]])
  adv, _ = rl.gae_advantages(rewards, values, jnp.ones((1, 3)), gamma=0.9, lam=0.5, whiten=False)
  d2 = 1.0 - 0.3
  d1 = 0.0 + 0.9 * 0.3 - 0.2
  d0 = 0.0 + 0.9 * 0.2 - 0.1
  a2 = d2
  a1 = d1 + 0.45 * a2
  a0 = d0 + 0.45 * a1
  np.testing.assert_allclose(adv, [[a0, a1, a2]], rtol=1e-6)


def test_kl_estimators_and_sign():
  logp, ref = jnp.array([-1.0, -2.0]), jnp.array([-1.5, -1.0])
  np.testing.assert_allclose(rl.kl_penalty(logp, ref, "k1"), [0.5, -1.0])
  np.testing.assert_allclose(rl.kl_penalty(logp, ref, "k2"), [0.125, 0.5])
  d = np.array([-0.5, 1.0])
  np.testing.assert_allclose(rl.kl_penalty(logp, ref, "k3"), np.exp(d) - d - 1, rtol=1e-6)
  assert float(rl.kl_penalty(jnp.array([0.0]), jnp.array([30.0]), "k3")[0]) == 10.0  # clamp
  # the KL term is added: a policy farther from the reference has a larger loss
  zeros = jnp.zeros((1, 2))
  near, _ = rl.policy_loss(ref[None], ref[None], ref[None], zeros, jnp.ones((1, 2)), kl_coef=0.1)
  far, _ = rl.policy_loss(logp[None], logp[None], ref[None], zeros, jnp.ones((1, 2)), kl_coef=0.1)
  assert float(near) == 0.0 and float(far) > 0.0
  with pytest.raises(ValueError, match="kl_type='k9'"):
    rl.kl_penalty(logp, ref, "k9")


def test_policy_loss_by_hand_with_clipping():
  old = jnp.log(jnp.array([[0.5, 0.5, 0.5, 0.5]]))
  logp = jnp.log(jnp.array([[0.8, 0.3, 0.55, 0.1]]))  # ratios 1.6, 0.6, 1.1, 0.2
  adv = jnp.array([[1.0, 1.0, -2.0, -1.0]])
  mask = jnp.array([[1, 1, 1, 0]])
  loss, m = rl.policy_loss(logp, old, logp, adv, mask, kl_coef=0.0)
  # token 0: A>0, rho 1.6 -> clipped at 1.2: -1.2 ; token 1: max(-0.6, -0.8) = -0.6
  # token 2: A<0, rho 1.1 inside: 2.2 ; token 3 masked
  np.testing.assert_allclose(loss, (-1.2 - 0.6 + 2.2) / 3, rtol=1e-6)
  np.testing.assert_allclose(m["loss/clip_frac"], 1 / 3, rtol=1e-6)
  # dual clip bounds a negative-advantage token with a huge ratio at -A * c
  big = jnp.log(jnp.array([[5.0]])) + jnp.log(jnp.array([[0.5]]))
  capped, _ = rl.policy_loss(big, jnp.log(jnp.array([[0.5]])), big, jnp.array([[-1.0]]),
                             jnp.ones((1, 1)), kl_coef=0.0, dual_clip=3.0)
  np.testing.assert_allclose(capped, 3.0, rtol=1e-6)


def test_masked_tokens_get_zero_gradient_and_accumulation_matches_one_batch():
  rng = np.random.default_rng(0)
  n, l = 6, 5
  logp = jnp.asarray(rng.normal(-1, 0.3, (n, l)), jnp.float32)
  old = logp + jnp.asarray(rng.normal(0, 0.1, (n, l)), jnp.float32)
  ref = logp + jnp.asarray(rng.normal(0, 0.1, (n, l)), jnp.float32)
  adv = jnp.asarray(rng.normal(0, 1, (n, l)), jnp.float32)
  mask = jnp.asarray(rng.integers(0, 2, (n, l)), jnp.float32)
  ent = jnp.asarray(rng.uniform(0, 2, (n, l)), jnp.float32)

  def loss_fn(lp, rows, normalizer=None):
    return rl.policy_loss(lp, old[rows], ref[rows], adv[rows], mask[rows], kl_coef=0.001,
                          entropy=ent[rows], entropy_coef=0.001, normalizer=normalizer)[0]

  full = jax.grad(loss_fn)(logp, slice(None))
  assert np.all(np.asarray(full)[np.asarray(mask) == 0] == 0.0)
  total = mask.sum()
  halves = [jax.grad(loss_fn)(logp[s], s, total) for s in (slice(0, 2), slice(2, 6))]
  np.testing.assert_allclose(jnp.concatenate(halves), full, rtol=1e-5, atol=1e-8)


def test_seq_mean_token_mean_and_value_loss():
  x = jnp.array([[1.0, 3.0, 0.0], [4.0, 0.0, 0.0]])
  mask = jnp.array([[1, 1, 0], [1, 0, 0]])
  np.testing.assert_allclose(rl.aggregate(x, mask, "token_mean"), 8 / 3)
  np.testing.assert_allclose(rl.aggregate(x, mask, "seq_mean_token_mean"), (2 + 4) / 2)
  loss, _ = rl.value_loss(jnp.array([[2.0]]), jnp.array([[0.0]]), jnp.array([[1.0]]),
                          jnp.ones((1, 1)), clip=0.5)
  # v = 2 -> (2-1)^2 = 1 ; clipped v = 0.5 -> (0.5-1)^2 = 0.25 ; 0.5 * max = 0.5
  np.testing.assert_allclose(loss, 0.5)
  logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25]]]))
  np.testing.assert_allclose(rl.token_entropy(logits), [[1.5 * np.log(2)]], rtol=1e-6)


@pytest.mark.parametrize("algorithm", ["reinforce", "grpo", "ppo"])
def test_the_policy_gradient_raises_the_reward_of_a_one_token_bandit(algorithm):
  """RL learns: a tiny random LM answers a fixed prompt with one sampled token,
  rewarded 1 when the token is among the first quarter of the vocabulary. The
  exact expected reward (probability mass on those tokens, from the logits) must
  rise from about 0.25 to above 0.9 in 30 updates; a sign or mask error in the
  advantages or the loss makes it fall or stay."""
  import optax

  from zsjax import model as M

  cfg = M.ModelConfig(vocab_size=16, embed_dim=16, mlp_dim=32, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=8, arch="qwen2", qkv_bias=True)
  params = M.init_params(cfg, jax.random.key(0))
  ref_params = params
  prompt = jnp.array([1, 2, 3], jnp.int32)
  n = 32
  mask = jnp.zeros((n, 4), jnp.int32).at[:, 3].set(1)  # only the sampled token is the policy's
  groups = jnp.arange(n) // 8
  tx = optax.adam(3e-2)
  opt = tx.init(params)

  def expected_reward(p):
    logits = M.Transformer(cfg).apply({"params": p}, prompt[None])[0, -1]
    return jax.nn.softmax(logits)[:4].sum()

  @jax.jit
  def step(p, opt, key):
    logits = M.Transformer(cfg).apply({"params": p}, prompt[None])[0, -1]
    answer = jax.random.categorical(key, logits, shape=(n,))
    tokens = jnp.concatenate([jnp.broadcast_to(prompt, (n, 3)), answer[:, None]], axis=1)
    reward = (answer < 4).astype(jnp.float32)
    old_logp = M.token_log_probs(cfg, p, tokens)
    ref_logp = M.token_log_probs(cfg, ref_params, tokens)
    adv, _, _ = rl.advantages_and_returns(algorithm, reward, mask, groups, old_logp, ref_logp,
                                          jnp.zeros_like(old_logp))
    grads = jax.grad(lambda q: rl.policy_loss(
        M.token_log_probs(cfg, q, tokens), old_logp, ref_logp, adv, mask)[0])(p)
    updates, opt = tx.update(grads, opt, p)
    return optax.apply_updates(p, updates), opt

  before = float(expected_reward(params))
  for k in range(30):
    params, opt = step(params, opt, jax.random.key(k + 1))
  after = float(expected_reward(params))
  assert 0.1 < before < 0.45 and after > 0.9, (before, after)
