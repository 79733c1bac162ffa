"""A test-only sampling strategy that forces chosen tokens (``zsjax.sampling.sample``
accepts any object with a ``sample(logits, rng, position)`` method)."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from zsjax.sampling import Greedy, log_prob_of, sample


@dataclasses.dataclass(frozen=True, eq=False)
class Scripted:
  """Row b's g-th sampled token is ``script[b, g]`` (where >= 0) instead of a draw
  from ``base``; the log-prob reported is still the model's under ``base``."""

  script: np.ndarray  # [B, T] int32, -1 = draw from base
  base: Any = Greedy()

  @property
  def temperature(self) -> float:
    return self.base.temperature

  def sample(self, logits, rng, position):
    sampled, _ = sample(self.base, logits, rng)
    script = jnp.asarray(self.script)
    rows = jnp.arange(script.shape[0])
    forced = script[rows, jnp.minimum(position, script.shape[1] - 1)]
    tokens = jnp.where(forced >= 0, forced, sampled)
    return tokens, log_prob_of(self.base, logits, tokens)


def script_rows(rows: Sequence[Sequence[int]]) -> np.ndarray:
  """Token rows -> a ``[B, T]`` script padded with -1 (one spare column)."""
  out = np.full((len(rows), max(map(len, rows)) + 1), -1, np.int32)
  for i, row in enumerate(rows):
    out[i, :len(row)] = row
  return out
