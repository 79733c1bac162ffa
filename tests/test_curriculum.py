"""Eq. 1 of the paper: values, the cap at total_steps, traced == Python."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from zsjax import curriculum as C


def test_paper_example_values():
  steps = [1, 50, 100, 150, 203]
  got = [C.noise_probability(i, start=0.0, end=0.5, total_steps=203) for i in steps]
  np.testing.assert_allclose(got, [0.001, 0.068, 0.163, 0.298, 0.5], atol=6e-4)
  # the formula by hand at one step
  assert got[2] == pytest.approx((4 ** (100 / 203) - 1) / 3 * 0.5, rel=1e-12)


def test_capped_at_end_and_monotone():
  kw = dict(start=0.25, end=0.5, total_steps=40)
  values = [C.noise_probability(i, **kw) for i in range(0, 60)]
  assert values[0] == pytest.approx(0.25)
  assert all(b >= a for a, b in zip(values, values[1:]))
  assert all(v == pytest.approx(0.5) for v in values[40:])


def test_traced_matches_python():
  kw = dict(start=0.0, end=0.75, total_steps=203)
  traced = jax.jit(lambda s: C.noise_probability(s, **kw))
  for i in (1, 17, 100, 203, 500):
    assert float(traced(jnp.int32(i))) == pytest.approx(C.noise_probability(i, **kw), rel=1e-5)


def test_schedule_from_config_and_fixed():
  section = dict(kind="fixed", start=0.0, end=0.5, base=4.0, probability=0.5)
  fixed = C.schedule_from_config(ml_collections.ConfigDict(section), 10)
  assert fixed(3) == 0.5 and float(jax.jit(fixed)(jnp.int32(3))) == 0.5
  curve = C.schedule_from_config(ml_collections.ConfigDict(
      dict(section, kind="exponential", end=0.25)), 100)
  assert curve(100) == pytest.approx(0.25) and curve(1) < 0.01


@pytest.mark.parametrize("kwargs,needle", [
    (dict(start=-0.1, end=0.5, total_steps=10), "start=-0.1"),
    (dict(start=0.0, end=1.5, total_steps=10), "end=1.5"),
    (dict(start=0.0, end=0.5, total_steps=0), "total_steps=0"),
    (dict(start=0.0, end=0.5, total_steps=10, base=1.0), "base=1.0"),
])
def test_bad_arguments_are_named(kwargs, needle):
  with pytest.raises(ValueError, match=needle):
    C.noise_probability(1, **kwargs)
