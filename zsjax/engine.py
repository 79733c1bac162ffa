"""What a search engine is to the rollout, and the ragged-token helpers engines share.

An engine is any object with

* ``inputs(questions, answers, samples_per_prompt) -> pytree``: on the host, the
  per-row inputs it needs (batch on the rows), carried in ``RolloutBatch``;
* ``input_shardings(plan)``: the shardings of those inputs (``None``: replicated);
* ``row_problem(question, answer) -> str | None``: why a data row cannot be
  served (too long for the engine's prompt), checked when data loads;
* ``__call__(engine_state, inputs, query [B, Q], query_lengths [B], active [B],
  noisy [B], rng) -> EngineOutput``: the documents of each active row's query,
  useful or noisy, inside the jitted rollout;
* ``last_error``: the message of its last failed call ("" for an engine that
  cannot fail), which RL and evaluation report.

The engines: ``zsjax.simulator.SimulatorEngine`` (on device; its state is the
simulator's params), ``zsjax.search.HostSearch`` (BM25 or a served simulator,
called through ``io_callback``) and ``NoEngine`` (a rollout that never searches).
``Engine`` is that contract as a ``typing.Protocol``.

Shape legend: B batch, Q query, D documents, W a row's width.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


class EngineOutput(flax.struct.PyTreeNode):
  """An engine's answer to one batch of queries."""

  tokens: jax.Array  # [B, D] right-padded
  lengths: jax.Array  # [B]
  failed: jax.Array  # [B] bool: the engine gave up on the row's call
  # True: ``tokens`` are the whole observation block, wrapper included, tokenized as
  # one string (config.rollout.retokenize); False: the documents alone
  wrapped: bool = flax.struct.field(pytree_node=False, default=False)


def encode_texts(rows: Sequence[Sequence[str]], width: int, field: str):
  """Each row's strings as zero-padded UTF-8 bytes, ``([N, K, width] uint8,
  lengths [N, K])``, for host callbacks that need the text; a string longer than
  ``width`` bytes raises, naming ``field``."""
  encoded = [[t.encode("utf-8") for t in row] for row in rows]
  longest = max((len(t) for row in encoded for t in row), default=0)
  if longest > width:
    raise ValueError(f"a question or answer of {longest} UTF-8 bytes is longer than the "
                     f"text width {width} ({field}); raise it.")
  k = max((len(row) for row in encoded), default=0)
  text = np.zeros((len(encoded), k, width), np.uint8)
  lengths = np.zeros((len(encoded), k), np.int32)
  for i, row in enumerate(encoded):
    for j, raw in enumerate(row):
      text[i, j, :len(raw)] = np.frombuffer(raw, np.uint8)
      lengths[i, j] = len(raw)
  return text, lengths


def decode_text(text, lengths, i: int, j: int) -> str:
  """String ``j`` of row ``i`` of ``encode_texts``' arrays (on the host)."""
  return bytes(np.asarray(text)[i, j, :int(lengths[i, j])]).decode("utf-8")


def pad_rows(rows: Sequence[Sequence[int]], width: int | None = None, pad_id: int = 0):
  """Ragged token rows -> ``([N, width] int32, lengths [N])``, cut at ``width``."""
  width = max(1, max((len(r) for r in rows), default=1)) if width is None else width
  out = np.full((len(rows), width), pad_id, np.int32)
  for i, r in enumerate(rows):
    out[i, :len(r)] = r[:width]
  return out, np.asarray([min(len(r), width) for r in rows], np.int32)


def concat_ragged(segments, width: int, pad_id: int):
  """Concatenates per-row ragged segments.

  ``segments``: ``(tokens [B or 1, Li], lengths [B] or [])`` pairs. Returns
  ``(out [B, width], total [B])``; positions past each row's total hold
  ``pad_id``, and content past ``width`` is dropped."""
  b = max(jnp.shape(lengths)[0] if jnp.ndim(lengths) else 1 for _, lengths in segments)
  b = max(b, max(t.shape[0] for t, _ in segments))
  position = jnp.arange(width)[None, :]  # [1, W]
  out = jnp.full((b, width), pad_id, jnp.int32)
  offset = jnp.zeros((b,), jnp.int32)
  for tokens, lengths in segments:
    lengths = jnp.broadcast_to(jnp.asarray(lengths, jnp.int32), (b,))
    tokens = jnp.broadcast_to(tokens, (b, tokens.shape[1]))
    index = jnp.clip(position - offset[:, None], 0, tokens.shape[1] - 1)
    inside = (position >= offset[:, None]) & (position < (offset + lengths)[:, None])
    out = jnp.where(inside, jnp.take_along_axis(tokens, index, axis=1), out)
    offset = offset + lengths
  return out, jnp.minimum(offset, width)


def gather_span(buffer, start, length, width: int, pad_id: int):
  """``buffer[b, start[b] : start[b] + length[b]]`` as ``[B, width]`` right-padded."""
  index = jnp.clip(start[:, None] + jnp.arange(width)[None, :], 0, buffer.shape[1] - 1)
  valid = jnp.arange(width)[None, :] < length[:, None]
  return jnp.where(valid, jnp.take_along_axis(buffer, index, axis=1), pad_id)


def tokens_covering_tail(piece_bytes, tokens, end, count, tail_bytes: int):
  """How many of the ``count`` tokens ending at ``end`` (exclusive) must be dropped
  so that at least ``tail_bytes`` bytes are removed: ``[B]``."""
  width = tokens.shape[1]
  back = jnp.arange(width)[None, :]  # 0 = the last token
  index = jnp.clip(end[:, None] - 1 - back, 0, width - 1)
  sizes = jnp.where(back < count[:, None],
                    piece_bytes[jnp.take_along_axis(tokens, index, axis=1)], 0)
  removed_before = jnp.cumsum(sizes, axis=1) - sizes  # bytes removed before dropping token i
  return jnp.sum((removed_before < tail_bytes) & (back < count[:, None]), axis=1)


class Engine(Protocol):
  """The contract every engine keeps (see the module docstring)."""

  def inputs(self, questions: Sequence[str], answers: Sequence[str],
             samples_per_prompt: int = 1) -> Any: ...

  def input_shardings(self, plan) -> Any: ...

  def row_problem(self, question: str, answer: str) -> str | None: ...

  @property
  def last_error(self) -> str: ...

  def __call__(self, engine_state, inputs, query: jax.Array, query_lengths: jax.Array,
               active: jax.Array, noisy: jax.Array, rng: jax.Array) -> "EngineOutput": ...


class NoEngine:
  """The engine of a rollout that never searches (``max_turns=0``)."""

  last_error = ""

  def inputs(self, questions, answers, samples_per_prompt: int = 1):
    return None

  def input_shardings(self, plan):
    return None

  def row_problem(self, question, answer):
    return None

  def __call__(self, engine_state, inputs, query, query_lengths, active, noisy, rng):
    b = query.shape[0]
    return EngineOutput(jnp.zeros((b, 1), jnp.int32), jnp.zeros((b,), jnp.int32),
                        jnp.zeros((b,), bool))


__all__ = ["Engine", "EngineOutput", "NoEngine", "encode_texts", "decode_text", "pad_rows",
           "concat_ragged", "gather_span", "tokens_covering_tail"]
