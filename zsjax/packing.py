"""Padding-free rows: trajectories packed into rows of a token budget.

A step's trajectories are right-padded to the context cap ``S`` (``[N, S]``);
most are far shorter. ``pack(lengths, width)`` places each trajectory's held
tokens (``tokens[i, :lengths[i]]``) into rows of ``width`` tokens, first fit in
order of decreasing length, so the scoring pass and the update compute over
about the real tokens instead of ``N x S``. Inside a packed row each trajectory
is its own segment (ids 1, 2, ...; 0 = padding) with positions restarting at 0,
which the model reads as separate sequences (``zsjax.model``: attention stays
within a segment, the first token of a segment is not scored), so every
per-token value is the one the padded row gives (tests/test_packing.py).

``Packing`` is host data (numpy): where each trajectory went. ``scatter`` moves
``[N, S]`` per-token arrays into ``[R, width]`` packed rows, ``gather`` brings
packed per-token results back to ``[N, S]`` (0 past each length).

Shape legend: N trajectories, S the context cap, R packed rows, W the width.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Packing:
  """Where each of N trajectories lies in R packed rows of ``width`` tokens."""

  row: np.ndarray  # [N] packed row of each trajectory
  offset: np.ndarray  # [N] its first token's index in that row
  lengths: np.ndarray  # [N] held tokens
  rows: int  # R, a multiple of ``multiple``
  width: int  # W

  def segment_ids(self) -> np.ndarray:
    """``[R, W]`` int32: k + 1 on the k-th trajectory placed in a row, 0 on padding."""
    out = np.zeros((self.rows, self.width), np.int32)
    rank = np.zeros(self.rows, np.int32)
    for i in np.argsort(self.offset, kind="stable"):
      rank[self.row[i]] += 1
      out[self.row[i], self.offset[i]:self.offset[i] + self.lengths[i]] = rank[self.row[i]]
    return out

  def positions(self) -> np.ndarray:
    """``[R, W]`` int32: each token's index in its own trajectory (0 on padding)."""
    out = np.zeros((self.rows, self.width), np.int32)
    for i, (r, o, n) in enumerate(zip(self.row, self.offset, self.lengths)):
      out[r, o:o + n] = np.arange(n)
    return out

  def scatter(self, values: np.ndarray, fill=0) -> np.ndarray:
    """``[N, S, ...]`` per-token values -> ``[R, W, ...]`` (``fill`` on padding)."""
    values = np.asarray(values)
    out = np.full((self.rows, self.width) + values.shape[2:], fill, values.dtype)
    for i, (r, o, n) in enumerate(zip(self.row, self.offset, self.lengths)):
      out[r, o:o + n] = values[i, :n]
    return out

  def gather(self, packed: np.ndarray, length: int) -> np.ndarray:
    """``[R, W, ...]`` -> ``[N, length, ...]``: each trajectory's values back at
    its own indices, 0 past its length."""
    packed = np.asarray(packed)
    out = np.zeros((len(self.row), length) + packed.shape[2:], packed.dtype)
    for i, (r, o, n) in enumerate(zip(self.row, self.offset, self.lengths)):
      out[i, :n] = packed[r, o:o + n]
    return out

  @property
  def fill(self) -> float:
    """Held tokens over packed slots: the share of the packed compute that is real."""
    return float(self.lengths.sum()) / max(self.rows * self.width, 1)


def pack(lengths, width: int, multiple: int = 1) -> Packing:
  """First-fit decreasing: each trajectory (``lengths [N]`` held tokens, each at
  most ``width``) into the first row with room, longest first; the row count is
  rounded up to a ``multiple`` (extra rows are padding)."""
  lengths = np.asarray(lengths, np.int64)
  if len(lengths) and lengths.max() > width:
    raise ValueError(f"a trajectory of {int(lengths.max())} tokens does not fit a packed row of "
                     f"{width}; config.rl.pack_tokens must be at least config.rollout.max_length.")
  row = np.zeros(len(lengths), np.int64)
  offset = np.zeros(len(lengths), np.int64)
  free: list[int] = []  # room left in each row
  for i in np.argsort(-lengths, kind="stable"):
    n = int(lengths[i])
    for r, room in enumerate(free):
      if room >= n:
        break
    else:
      r = len(free)
      free.append(width)
    row[i], offset[i] = r, width - free[r]
    free[r] -= n
  rows = max(len(free), 1)
  rows = -(-rows // multiple) * multiple
  return Packing(row=row, offset=offset, lengths=lengths, rows=rows, width=width)


__all__ = ["Packing", "pack"]
