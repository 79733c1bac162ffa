"""Samplers against numpy: greedy, temperature frequencies, top-k, top-p sets,
and the returned log-probs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zsjax import sampling as S


def numpy_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


LOGITS = np.array([[2.0, 1.0, 0.5, -1.0, 0.0, 1.5, -2.0],
                   [0.1, 0.2, 3.0, 0.0, -0.5, 2.9, 1.0]], np.float32)


def test_greedy_is_argmax_with_its_log_prob():
  tokens, logp = S.sample(S.Greedy(), jnp.asarray(LOGITS), jax.random.key(0))
  np.testing.assert_array_equal(tokens, LOGITS.argmax(-1))
  np.testing.assert_allclose(logp, numpy_log_softmax(LOGITS)[[0, 1], LOGITS.argmax(-1)], rtol=1e-6)


@pytest.mark.parametrize("method", S.METHODS)
def test_temperature_sampling_frequencies_and_log_probs(method):
  strategy = S.Sampling(temperature=0.7, method=method)
  draw = jax.jit(jax.vmap(lambda k: S.sample(strategy, jnp.asarray(LOGITS[:1]), k)))
  tokens, logp = draw(jax.random.split(jax.random.key(1), 20000))
  tokens, logp = np.asarray(tokens)[:, 0], np.asarray(logp)[:, 0]
  expected = np.exp(numpy_log_softmax(LOGITS[0] / 0.7))
  freq = np.bincount(tokens, minlength=7) / len(tokens)
  np.testing.assert_allclose(freq, expected, atol=0.015)
  np.testing.assert_allclose(logp, np.log(expected)[tokens], rtol=1e-5)


def nucleus_reference(row, top_p):
  order = np.argsort(-row)
  probs = np.exp(numpy_log_softmax(row))[order]
  keep = np.cumsum(probs) - probs < top_p
  return set(order[keep].tolist())


@pytest.mark.parametrize("top_p", [0.3, 0.6, 0.9, 0.99])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p):
  out = np.asarray(S.truncate(jnp.asarray(LOGITS), top_p=top_p))
  for row, kept in zip(LOGITS, out):
    assert set(np.flatnonzero(kept > -1e29).tolist()) == nucleus_reference(row, top_p)


@pytest.mark.parametrize("method", S.METHODS)
def test_top_k_never_samples_outside_the_k_largest(method):
  strategy = S.Sampling(temperature=2.0, top_k=2, method=method)
  draw = jax.jit(jax.vmap(lambda k: S.sample(strategy, jnp.asarray(LOGITS), k)[0]))
  tokens = np.asarray(draw(jax.random.split(jax.random.key(2), 2000)))
  assert set(tokens[:, 0].tolist()) == {0, 5} and set(tokens[:, 1].tolist()) == {2, 5}


def test_bad_settings_are_named():
  with pytest.raises(ValueError, match="temperature=0"):
    S.Sampling(temperature=0)
  with pytest.raises(ValueError, match="top_p=1.5"):
    S.Sampling(top_p=1.5)
  with pytest.raises(ValueError, match="kind='beam'"):
    S.from_config({"kind": "beam"})
  with pytest.raises(ValueError, match="method='multinomial'"):
    S.Sampling(method="multinomial")
  assert S.from_config({"kind": "sample", "temperature": 1.0, "top_p": 1.0, "top_k": 0,
                        "method": "inverse_cdf"}).method == "inverse_cdf"


def test_inverse_cdf_draws_from_a_large_vocabulary_like_numpy():
  """A 4096-entry distribution with a few heavy entries and a masked block:
  frequencies against the exact probabilities (and never a masked entry)."""
  rng = np.random.default_rng(0)
  logits = rng.normal(size=4096).astype(np.float32)
  logits[[7, 1000, 4095]] += 6.0
  logits[2000:3000] = -1e30
  draw = jax.jit(lambda k: S.draw("inverse_cdf", k, jnp.broadcast_to(jnp.asarray(logits),
                                                                      (40000, 4096))))
  tokens = np.asarray(draw(jax.random.key(3)))
  assert not np.any((tokens >= 2000) & (tokens < 3000))
  probs = np.exp(numpy_log_softmax(logits.astype(np.float64)))
  freq = np.bincount(tokens, minlength=4096) / len(tokens)
  heavy = [7, 1000, 4095]
  sigma = np.sqrt(probs[heavy] * (1 - probs[heavy]) / len(tokens))
  assert np.all(np.abs(freq[heavy] - probs[heavy]) < 5 * sigma)
  light = np.setdiff1d(np.arange(4096), heavy)  # the light mass in total
  assert abs(freq[light].sum() - probs[light].sum()) < 5 * np.sqrt(
      probs[light].sum() * (1 - probs[light].sum()) / len(tokens))


def test_inverse_cdf_takes_the_last_live_entry_when_the_point_rounds_to_the_total(monkeypatch):
  """A uniform number of 1.0 (what rounding can make of u * total) lands past
  every cumulative sum: the last entry of positive weight is drawn, never a
  masked one."""
  monkeypatch.setattr(jax.random, "uniform", lambda rng, shape, dtype: jnp.ones(shape, dtype))
  logits = jnp.asarray([[0.0, 1.0, 2.0, -1e30, -1e30], [-1e30, 3.0, -1e30, -1e30, -1e30]])
  np.testing.assert_array_equal(S.draw("inverse_cdf", jax.random.key(0), logits), [2, 1])
