"""How often the simulated search engine writes noisy documents, as a pure
function of the training step (ZeroSearch, Eq. 1).

  p(i) = p_s + (b ** (i / m) - 1) / (b - 1) * (p_e - p_s)

i is the global step (counted from 1), m the total number of steps, b the base
(4 in the paper); p = p_e from i = m on. With p_s = 0, p_e = 0.5, m = 203 this
gives 0.001, 0.068, 0.163, 0.298, 0.5 at steps 1, 50, 100, 150, 203.

Every function works on Python numbers (returning a float) and on JAX scalars,
traced or not (returning a float32 array), so the rollout can draw
useful/noisy on device from the step it is given.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp

SCHEDULES = ("exponential", "fixed")


def _check(start: float, end: float, total_steps: int, base: float) -> None:
  for name, value in (("start", start), ("end", end)):
    if not 0.0 <= value <= 1.0:
      raise ValueError(f"curriculum {name}={value} is not a probability in [0, 1].")
  if total_steps <= 0:
    raise ValueError(f"curriculum total_steps={total_steps} must be a positive step count.")
  if base <= 0 or base == 1:
    raise ValueError(f"curriculum base={base} must be positive and not 1 (the paper uses 4).")


def noise_probability(step, *, start: float, end: float, total_steps: int, base: float = 4.0):
  """The probability that a search call returns noisy documents at ``step``."""
  _check(start, end, total_steps, base)
  if isinstance(step, (jax.Array, jax.core.Tracer)):
    i = jnp.minimum(jnp.asarray(step, jnp.float32), float(total_steps))
    return jnp.float32(start) + (jnp.power(jnp.float32(base), i / total_steps) - 1.0) / (
        base - 1.0) * (end - start)
  i = min(float(step), float(total_steps))
  return start + (math.pow(base, i / total_steps) - 1.0) / (base - 1.0) * (end - start)


def fixed_probability(step, *, probability: float):
  """The ablation without a curriculum: the same probability at every step."""
  if not 0.0 <= probability <= 1.0:
    raise ValueError(f"fixed noise probability={probability} is not in [0, 1].")
  if isinstance(step, (jax.Array, jax.core.Tracer)):
    return jnp.full((), probability, jnp.float32)
  return float(probability)


@dataclasses.dataclass(frozen=True)
class Curriculum:
  """The noise schedule as a value (hashable, so it can sit in a jit-static
  config): ``curriculum(step) -> p``, on Python numbers or JAX scalars.

  ``kind="exponential"``: ``noise_probability`` from ``start`` to ``end`` over
  ``total_steps`` with ``base``; ``kind="fixed"``: ``probability`` at every step."""

  kind: str = "exponential"
  start: float = 0.0
  end: float = 0.5
  base: float = 4.0
  probability: float = 0.5
  total_steps: int = 203

  def __post_init__(self):
    if self.kind == "exponential":
      _check(self.start, self.end, self.total_steps, self.base)
    elif self.kind == "fixed":
      fixed_probability(0, probability=self.probability)  # validates
    else:
      raise ValueError(f"curriculum kind={self.kind!r} is not one of {SCHEDULES}.")

  @classmethod
  def from_config(cls, config, total_steps: int) -> "Curriculum":
    """From a config section with ``kind``, ``start``, ``end``, ``base`` and
    ``probability`` (every field present; the ones the kind does not use are ignored)."""
    return cls(kind=config.kind, start=config.start, end=config.end, base=config.base,
               probability=config.probability, total_steps=total_steps)

  def __call__(self, step):
    if self.kind == "fixed":
      return fixed_probability(step, probability=self.probability)
    return noise_probability(step, start=self.start, end=self.end, total_steps=self.total_steps,
                             base=self.base)


def schedule_from_config(config, total_steps: int) -> Callable:
  """``step -> p`` from a config section (``Curriculum.from_config``)."""
  return Curriculum.from_config(config, total_steps)
