"""The multi-turn rollout as one XLA program.

``make_rollout(...)`` returns ``rollout(policy_params, engine_state, batch, rng,
step) -> Trajectories``, jitted end to end:

  prefill the prompts into the policy KV cache;
  for turn in 0 .. max_turns (a fori_loop; the last turn may not search):
    decode (a while_loop) until every live row has closed ``</search>`` or
      ``</answer>`` (matched on bytes, see ``zsjax.template``), hit EOS, spent
      ``max_new_tokens`` or filled the context;
    classify each row's turn: answer (done), search, invalid (feedback), EOS (done);
    for searching rows draw noisy ~ Bernoulli(noise_probability(step)) and ask
      the engine for documents (the on-device simulator, or a host engine
      through io_callback);
    append ``<information>`` + documents + ``</information>`` (or the feedback
      message), capped at ``max_obs_tokens``, to every row that goes on, and
      prefill it into the cache at the row's own offset (no re-prefill).

Every buffer has a fixed size, so batches of one shape compile once.

Rows keep their tokens contiguously: row b holds ``tokens[b, :length[b]]``
(prompt, then turns and observations); ``loss_mask`` is 1 exactly on the tokens
the policy sampled. The query of a search is the tokens strictly after the token
that completed ``<search>`` and before the tokens that hold ``</search>``
(counted back on bytes); text a tokenizer merged into those boundary tokens is
not part of the query.

Shape legend: B batch, S context cap (``max_length``), P prompt, Q query, D
documents, O observation, V vocab.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from zsjax.curriculum import noise_probability
from zsjax.model import ModelConfig, Transformer, init_cache
from zsjax.sampling import Greedy, Sampling, log_prob_of, sample
from zsjax.template import (ANSWER_CLOSE, ANSWER_OPEN, CLOSING, INFORMATION_CLOSE,
                            INFORMATION_OPEN, INVALID_ACTION_FEEDBACK, SEARCH_CLOSE, SEARCH_OPEN,
                            TAGS, TagMatcher)

SEARCH_CLOSE_BYTES = len(TAGS[1])


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  """Static sizes and settings (paper: 5 turns, 500 tokens a turn, 2048-token
  observations, 4096-token context)."""

  max_turns: int = 5  # turns that may search; one final turn follows
  max_new_tokens: int = 500  # per turn
  max_obs_tokens: int = 2048  # inserted per turn, wrapper included
  max_length: int = 4096  # S: prompt + everything after it
  max_query_tokens: int = 64  # Q: longest query passed to an engine
  noise_start: float = 0.0
  noise_end: float = 0.5
  noise_base: float = 4.0
  total_steps: int = 203

  def noise_probability(self, step):
    """The curriculum's p(noisy) at ``step`` (Python or traced)."""
    return noise_probability(step, start=self.noise_start, end=self.noise_end,
                             total_steps=self.total_steps, base=self.noise_base)

  def __post_init__(self):
    for name in ("max_turns", "max_new_tokens", "max_obs_tokens", "max_length",
                 "max_query_tokens", "total_steps"):
      if getattr(self, name) < (0 if name == "max_turns" else 1):
        raise ValueError(f"RolloutConfig.{name}={getattr(self, name)} is too small.")


@flax.struct.dataclass
class RolloutBatch:
  """Host-prepared inputs (``prepare_batch``)."""

  prompt_tokens: jax.Array  # [B, P] right-padded
  prompt_lengths: jax.Array  # [B]
  row_ids: jax.Array  # [B] index of the row's question on the host
  sim_prefix: jax.Array  # [2, B, Lp] simulator prompt before the query (0 useful, 1 noisy)
  sim_prefix_lengths: jax.Array  # [2, B]
  sim_suffix: jax.Array  # [2, Ls] after the query
  sim_suffix_lengths: jax.Array  # [2]


@flax.struct.dataclass
class Trajectories:
  tokens: jax.Array  # [B, S] prompt + response, padded after `lengths`
  loss_mask: jax.Array  # [B, S] 1 on policy-sampled tokens only
  log_probs: jax.Array  # [B, S] sampling log-probs (0 where loss_mask is 0)
  prompt_lengths: jax.Array  # [B]
  lengths: jax.Array  # [B]
  turns: jax.Array  # [B] turns in which the row generated
  searches: jax.Array  # [B] search calls that returned documents
  noisy_calls: jax.Array  # [B] of those, drawn noisy
  failed_searches: jax.Array  # [B] host engine calls that gave up
  answered: jax.Array  # [B] closed an <answer> ... </answer>
  truncated: jax.Array  # [B] stopped by the context cap


@flax.struct.dataclass
class StaticTokens:
  """Token ids of the fixed texts the rollout inserts (``prepare_static_tokens``)."""

  obs_open: jax.Array  # [O1] "\n\n<information>"
  obs_close: jax.Array  # [O2] "</information>\n\n"
  feedback: jax.Array  # [F] the invalid-action message
  piece_bytes: jax.Array  # [V] UTF-8 length of every token's text
  eos_ids: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())
  pad_id: int = flax.struct.field(pytree_node=False, default=0)


class EngineOutput(NamedTuple):
  tokens: jax.Array  # [B, D]
  lengths: jax.Array  # [B]
  failed: jax.Array  # [B] bool


# An engine: (engine_state, batch, query [B, Q], query_lengths [B], active [B],
# noisy [B], rng) -> EngineOutput; traced inside the rollout.
Engine = Callable[..., EngineOutput]


# ------------------------------------------------------------------- helpers


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


# -------------------------------------------------------------------- engines


def simulator_engine(sim_cfg: ModelConfig, matcher: TagMatcher, static: StaticTokens, *,
                     max_new_tokens: int, max_prompt: int, sampling=Sampling(temperature=0.8),
                     marker_bytes: int = 5) -> Engine:
  """The LLM simulator on device. ``engine_state`` is the simulator's params.

  The prompt is ``sim_prefix[noisy] + query + sim_suffix[noisy]``; generation
  stops at EOS, at ``max_new_tokens`` or when ``matcher`` (built for the single
  tag ``f"Doc {top_k + 1}"``) completes, in which case the tokens holding that
  marker (``marker_bytes`` long) are dropped. The simulator must share the
  policy's tokenizer (true within the Qwen2.5 family and in the tiny world)."""
  model = Transformer(sim_cfg)
  eos = jnp.asarray(static.eos_ids or (-1,), jnp.int32)

  def engine(params, batch: RolloutBatch, query, query_lengths, active, noisy, rng):
    b = query.shape[0]
    longest = batch.sim_prefix.shape[2] + query.shape[1] + batch.sim_suffix.shape[1]
    if longest > max_prompt:  # shapes are static: checked once, at trace time
      raise ValueError(
          f"simulator_engine(max_prompt={max_prompt}) is shorter than the longest simulator "
          f"prompt: prefix {batch.sim_prefix.shape[2]} + query {query.shape[1]} + suffix "
          f"{batch.sim_suffix.shape[1]} = {longest} tokens; raise max_prompt.")
    kind = noisy.astype(jnp.int32)  # 0 useful, 1 noisy
    prefix = jnp.where(kind[:, None] == 1, batch.sim_prefix[1], batch.sim_prefix[0])
    prefix_len = jnp.where(kind == 1, batch.sim_prefix_lengths[1], batch.sim_prefix_lengths[0])
    suffix = batch.sim_suffix[kind]  # [B, Ls]
    suffix_len = batch.sim_suffix_lengths[kind]
    prompt, prompt_len = concat_ragged([(prefix, prefix_len), (query, query_lengths),
                                        (suffix, suffix_len)], max_prompt, static.pad_id)
    cache = init_cache(sim_cfg, b, max_prompt + max_new_tokens)
    segment = (jnp.arange(max_prompt)[None, :] < prompt_len[:, None]).astype(jnp.int32)
    logits, cache = model.apply({"params": params}, prompt, segment_ids=segment, cache=cache)
    last = jnp.take_along_axis(logits, jnp.maximum(prompt_len - 1, 0)[:, None, None], 1)[:, 0]
    out = jnp.full((b, max_new_tokens), static.pad_id, jnp.int32)

    def cond(carry):
      i, _, _, live, *_ = carry
      return (i < max_new_tokens) & jnp.any(live)

    def body(carry):
      i, cache, last, live, count, state, out, hit = carry
      token, _ = sample(sampling, last, jax.random.fold_in(rng, i))
      ended = jnp.isin(token, eos)
      write = live & ~ended
      out = out.at[:, i].set(jnp.where(write, token, static.pad_id))
      state, done = matcher.step(state, jnp.where(write, token, static.pad_id))
      marker = write & (done != 0)
      count = count + write
      logits, cache = model.apply({"params": params}, token[:, None],
                                  segment_ids=write[:, None].astype(jnp.int32), cache=cache)
      last = jnp.where(write[:, None], logits[:, 0], last)
      return i + 1, cache, last, live & ~ended & ~marker, count, state, out, hit | marker

    zeros = jnp.zeros((b,), jnp.int32)
    _, _, _, _, count, _, out, hit = jax.lax.while_loop(
        cond, body, (0, cache, last, active, zeros, zeros, out, jnp.zeros((b,), bool)))
    drop = jnp.where(hit, tokens_covering_tail(static.piece_bytes, out, count, count,
                                               marker_bytes), 0)
    lengths = jnp.where(active, count - drop, 0)
    out = jnp.where(jnp.arange(max_new_tokens)[None, :] < lengths[:, None], out, static.pad_id)
    return EngineOutput(out, lengths, jnp.zeros((b,), bool))

  return engine


def host_engine(host_search) -> Engine:
  """A ``zsjax.search.HostSearch`` (BM25, HTTP simulator, ...) as a rollout engine."""

  def engine(_, batch: RolloutBatch, query, query_lengths, active, noisy, rng):
    del rng
    return EngineOutput(*host_search(batch.row_ids, query, query_lengths, active, noisy))

  return engine


# -------------------------------------------------------------------- rollout


def make_rollout(policy_cfg: ModelConfig, matcher: TagMatcher, static: StaticTokens,
                 engine: Engine, config: RolloutConfig, sampling: Greedy | Sampling):
  """Builds ``rollout(policy_params, engine_state, batch, rng, step, script=None)``
  (not yet jitted: wrap it in ``jax.jit`` with the shardings you need).

  ``script [B, T]`` (tests): when given, the policy's g-th generated token of row
  b is ``script[b, g]`` instead of a sample (its log-prob is still the model's)."""
  model = Transformer(policy_cfg)
  s_len = config.max_length
  eos = jnp.asarray(static.eos_ids or (-1,), jnp.int32)
  obs_width = config.max_obs_tokens
  wrapper = static.obs_open.shape[0] + static.obs_close.shape[0]
  if wrapper >= obs_width:
    raise ValueError(f"RolloutConfig.max_obs_tokens={obs_width} leaves no room for documents "
                     f"inside the {wrapper}-token <information> wrapper.")
  if static.feedback.shape[0] > obs_width:
    raise ValueError(f"RolloutConfig.max_obs_tokens={obs_width} is shorter than the "
                     f"{static.feedback.shape[0]}-token invalid-action feedback.")
  feedback_width = int(static.feedback.shape[0])

  def rollout(policy_params, engine_state, batch: RolloutBatch, rng, step, script=None):
    b, p = batch.prompt_tokens.shape
    if p > s_len:
      raise ValueError(f"prompts of {p} tokens exceed RolloutConfig.max_length={s_len}.")
    p_noise = config.noise_probability(jnp.asarray(step))
    tokens = jnp.full((b, s_len), static.pad_id, jnp.int32).at[:, :p].set(batch.prompt_tokens)
    segment = (jnp.arange(p)[None, :] < batch.prompt_lengths[:, None]).astype(jnp.int32)
    cache = init_cache(policy_cfg, b, s_len)
    logits, cache = model.apply({"params": policy_params}, batch.prompt_tokens,
                                segment_ids=segment, cache=cache)
    last = jnp.take_along_axis(logits, (batch.prompt_lengths - 1)[:, None, None], 1)[:, 0]
    zeros = jnp.zeros((b,), jnp.int32)
    false = jnp.zeros((b,), bool)
    state = dict(tokens=tokens, mask=jnp.zeros((b, s_len), jnp.int32),
                 logp=jnp.zeros((b, s_len), jnp.float32), cache=cache, last=last,
                 length=batch.prompt_lengths.astype(jnp.int32), generated=zeros,
                 done=false, answered=false, truncated=false, turns=zeros, searches=zeros,
                 noisy=zeros, failed=zeros)
    rows = jnp.arange(b)

    def decode_turn(state, turn_rng):
      """One turn of policy decoding; returns the state and per-row turn facts."""

      def cond(c):
        return (c["i"] < config.max_new_tokens) & jnp.any(c["live"])

      def body(c):
        sampled, logp = sample(sampling, c["last"], jax.random.fold_in(turn_rng, c["i"]))
        if script is not None:
          forced = script[rows, jnp.minimum(c["generated"], script.shape[1] - 1)]
          sampled = jnp.where(forced >= 0, forced, sampled)
          logp = log_prob_of(sampling, c["last"], sampled)
        full = c["length"] >= s_len
        write = c["live"] & ~full
        token = jnp.where(write, sampled, static.pad_id)
        pos = c["length"]
        c["tokens"] = c["tokens"].at[rows, pos].set(token, mode="drop")
        c["mask"] = c["mask"].at[rows, pos].set(write.astype(jnp.int32), mode="drop")
        c["logp"] = c["logp"].at[rows, pos].set(jnp.where(write, logp, 0.0), mode="drop")
        m_state, done_tags = matcher.step(c["m_state"], token)
        done_tags = jnp.where(write, done_tags, 0)
        c["m_state"] = m_state
        c["open_end"] = jnp.where(write & (done_tags & SEARCH_OPEN != 0), pos + 1, c["open_end"])
        c["answer_open"] = c["answer_open"] | (write & (done_tags & ANSWER_OPEN != 0))
        closed = write & (done_tags & CLOSING != 0)
        c["close"] = jnp.where(closed & (c["close"] == 0), done_tags & CLOSING, c["close"])
        ended = write & jnp.isin(token, eos)
        c["eos"] = c["eos"] | ended
        c["truncated"] = c["truncated"] | (c["live"] & full)
        logits, c["cache"] = model.apply({"params": policy_params}, token[:, None],
                                         segment_ids=write[:, None].astype(jnp.int32),
                                         cache=c["cache"])
        c["last"] = jnp.where(write[:, None], logits[:, 0], c["last"])
        c["length"] = c["length"] + write
        c["generated"] = c["generated"] + write
        c["live"] = write & ~closed & ~ended
        c["i"] = c["i"] + 1
        return c

      live = ~state["done"]
      carry = dict(state, i=jnp.int32(0), live=live, m_state=zeros, open_end=jnp.full((b,), -1),
                   answer_open=false, close=zeros, eos=false, turn_start=state["length"])
      carry = jax.lax.while_loop(cond, body, carry)
      facts = {k: carry.pop(k) for k in ("i", "live", "m_state", "open_end", "answer_open",
                                         "close", "eos", "turn_start")}
      return carry, facts, live

    def turn_body(turn, state):
      turn_rng = jax.random.fold_in(rng, turn)
      state, f, active = decode_turn(state, jax.random.fold_in(turn_rng, 0))
      final = turn == config.max_turns
      answered = active & (f["close"] == ANSWER_CLOSE) & f["answer_open"]
      searched = active & (f["close"] == SEARCH_CLOSE) & (f["open_end"] >= 0)
      stopped = active & (f["eos"] | state["truncated"])
      invalid = active & ~answered & ~searched & ~stopped
      state["turns"] = state["turns"] + active
      state["answered"] = state["answered"] | answered
      done = state["done"] | answered | stopped | (final & active)

      # The query: after the token that completed <search>, before the tokens of </search>.
      close_end = state["length"]  # the closing token is the last one written
      span = jnp.maximum(close_end - f["open_end"], 0)
      tag_tokens = tokens_covering_tail(static.piece_bytes, state["tokens"], close_end, span,
                                        SEARCH_CLOSE_BYTES)
      query_len = jnp.clip(span - tag_tokens, 0, config.max_query_tokens)
      query = gather_span(state["tokens"], f["open_end"], query_len, config.max_query_tokens,
                          static.pad_id)
      do_search = searched & ~final
      noisy = do_search & (jax.random.uniform(jax.random.fold_in(turn_rng, 1), (b,)) < p_noise)
      docs = engine(engine_state, batch, query, query_len, do_search, noisy,
                    jax.random.fold_in(turn_rng, 2))
      doc_cap = obs_width - wrapper
      doc_len = jnp.minimum(docs.lengths, doc_cap)
      obs_docs, obs_docs_len = concat_ragged(
          [(static.obs_open[None], static.obs_open.shape[0]), (docs.tokens, doc_len),
           (static.obs_close[None], static.obs_close.shape[0])], obs_width, static.pad_id)
      feedback, feedback_len = concat_ragged(
          [(static.feedback[None], static.feedback.shape[0])], obs_width, static.pad_id)
      insert = (do_search | invalid) & ~done
      obs = jnp.where(do_search[:, None], obs_docs, feedback)
      obs_len = jnp.where(do_search, obs_docs_len, feedback_len)
      overflow = insert & (state["length"] + obs_len > s_len)
      insert = insert & ~overflow
      obs_len = jnp.where(insert, obs_len, 0)
      state["truncated"] = state["truncated"] | overflow
      state["done"] = done | overflow
      state["searches"] = state["searches"] + (do_search & insert)
      state["noisy"] = state["noisy"] + (noisy & insert)
      state["failed"] = state["failed"] + (do_search & docs.failed)

      slots = state["length"][:, None] + jnp.arange(obs_width)[None, :]
      in_obs = jnp.arange(obs_width)[None, :] < obs_len[:, None]
      state["tokens"] = state["tokens"].at[rows[:, None], jnp.where(in_obs, slots, s_len)].set(
          obs, mode="drop")

      def prefill(width):
        def run(operand):
          cache, last = operand
          logits, cache = model.apply({"params": policy_params}, obs[:, :width],
                                      segment_ids=in_obs[:, :width].astype(jnp.int32),
                                      cache=cache)
          index = jnp.clip(obs_len - 1, 0, width - 1)[:, None, None]
          last_obs = jnp.take_along_axis(logits, index, 1)[:, 0]
          return cache, jnp.where(insert[:, None], last_obs, last)
        return run

      # Prefill only what is inserted: nothing (final turn, all rows done), the
      # feedback alone (a short chunk), or documents (the full observation width).
      branch = jnp.where(~jnp.any(insert), 0, jnp.where(jnp.any(insert & do_search), 2, 1))
      state["cache"], state["last"] = jax.lax.switch(
          branch, [lambda operand: operand, prefill(feedback_width), prefill(obs_width)],
          (state["cache"], state["last"]))
      state["length"] = state["length"] + obs_len
      return state

    state = jax.lax.fori_loop(0, config.max_turns + 1, turn_body, state)
    valid = jnp.arange(s_len)[None, :] < state["length"][:, None]
    return Trajectories(
        tokens=jnp.where(valid, state["tokens"], static.pad_id),
        loss_mask=state["mask"] * valid, log_probs=state["logp"] * valid,
        prompt_lengths=batch.prompt_lengths, lengths=state["length"], turns=state["turns"],
        searches=state["searches"], noisy_calls=state["noisy"], failed_searches=state["failed"],
        answered=state["answered"], truncated=state["truncated"])

  return rollout


def shard_rollout(rollout, plan, policy_cfg: ModelConfig, *, engine_state_shardings=None):
  """``jax.jit`` of a rollout with explicit shardings from a
  ``zsjax.sharding.ShardingPlan``: policy params by the plan's rules, rows split
  over ``data`` x ``fsdp``, traced inside the plan's context (activation
  constraints). ``engine_state_shardings``: e.g. ``plan.params(sim_cfg)`` for the
  on-device simulator, None (replicated) otherwise."""
  rows, rows2, repl = plan.rows(1), plan.rows(2), plan.replicated()
  batch_shardings = RolloutBatch(
      prompt_tokens=rows2, prompt_lengths=rows, row_ids=rows,
      sim_prefix=plan.rows(3, axis=1), sim_prefix_lengths=plan.rows(2, axis=1),
      sim_suffix=repl, sim_suffix_lengths=repl)
  out_shardings = Trajectories(tokens=rows2, loss_mask=rows2, log_probs=rows2,
                               prompt_lengths=rows, lengths=rows, turns=rows, searches=rows,
                               noisy_calls=rows, failed_searches=rows, answered=rows,
                               truncated=rows)

  def run(policy_params, engine_state, batch, rng, step):
    with plan.context():
      return rollout(policy_params, engine_state, batch, rng, step)

  jitted = jax.jit(run, in_shardings=(plan.params(policy_cfg), engine_state_shardings or repl,
                                      batch_shardings, repl, repl),
                   out_shardings=out_shardings)

  def call(policy_params, engine_state, batch: RolloutBatch, rng, step):
    rows_in_batch = batch.prompt_tokens.shape[0]
    if rows_in_batch % plan.batch_divisor:  # before JAX places anything
      raise ValueError(f"rollout batch of {rows_in_batch} rows is not divisible by data x fsdp "
                       f"= {plan.batch_divisor} (mesh {plan.sizes}); use a multiple of it.")
    return jitted(policy_params, engine_state, batch, rng, step)

  call.jitted = jitted
  return call


# ------------------------------------------------------------- host preparation


def prepare_static_tokens(tokenizer, vocab_size: int | None = None,
                          eos_ids: tuple[int, ...] | None = None,
                          pad_id: int | None = None) -> StaticTokens:
  """Token ids of the inserted texts, and the byte length of every token."""
  from zsjax.template import token_bytes

  def ids(text):
    return jnp.asarray(tokenizer.encode(text, add_special_tokens=False), jnp.int32)

  pieces = token_bytes(tokenizer, vocab_size)
  if eos_ids is None:
    eos_ids = tuple(i for i in (tokenizer.eos_token_id,) if i is not None)
  if pad_id is None:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_ids or (0,))[0]
  return StaticTokens(obs_open=ids("\n\n" + INFORMATION_OPEN),
                      obs_close=ids(INFORMATION_CLOSE + "\n\n"),
                      feedback=ids(INVALID_ACTION_FEEDBACK),
                      piece_bytes=jnp.asarray([len(x) for x in pieces], jnp.int32),
                      eos_ids=tuple(int(i) for i in eos_ids), pad_id=int(pad_id))


def _pad_rows(rows, width=None, pad_id=0):
  width = max(1, max((len(r) for r in rows), default=1)) if width is None else width
  out = np.full((len(rows), width), pad_id, np.int32)
  for i, r in enumerate(rows):
    out[i, :len(r)] = r[:width]
  return out, np.asarray([min(len(r), width) for r in rows], np.int32)


def prepare_batch(tokenizer, prompts, questions, answers, sim_prompt=None, *,
                  samples_per_prompt: int = 1, pad_id: int = 0, prompt_width: int | None = None,
                  sim_prefix_width: int | None = None) -> RolloutBatch:
  """Tokenizes prompts (already rendered with ``zsjax.template.render_prompt``) and
  the simulator's per-row prompt pieces; repeats each prompt ``samples_per_prompt``
  times (group sampling: rows g*n .. g*n+n-1 share prompt g). Fixed
  ``prompt_width`` / ``sim_prefix_width`` keep every batch one shape (one compile)."""
  from zsjax.search import SimulatorPrompt

  if not len(prompts) == len(questions) == len(answers):
    raise ValueError(f"prepare_batch: {len(prompts)} prompts, {len(questions)} questions and "
                     f"{len(answers)} answers; give one question and first gold answer per prompt.")
  sim_prompt = sim_prompt or SimulatorPrompt()
  n = samples_per_prompt
  encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
  prompt_ids = [encode(p) for p in prompts for _ in range(n)]
  row_ids = [i for i in range(len(prompts)) for _ in range(n)]
  prefixes, suffixes = [[], []], []
  for noisy in (0, 1):
    for i in row_ids:
      prefix, suffix = sim_prompt.split(questions[i], answers[i], bool(noisy))
      prefixes[noisy].append(encode(prefix))
    suffixes.append(encode(suffix))
  for name, rows, width in (("prompt", prompt_ids, prompt_width),
                            ("simulator prefix", prefixes[0] + prefixes[1], sim_prefix_width)):
    longest = max(len(r) for r in rows)
    if min(len(r) for r in rows) == 0:
      raise ValueError(f"prepare_batch: a {name} tokenized to nothing.")
    if width is not None and longest > width:
      raise ValueError(f"prepare_batch: a {name} has {longest} tokens, more than the fixed "
                       f"width {width}; raise the width or shorten the text.")
  tokens, lengths = _pad_rows(prompt_ids, prompt_width, pad_id)
  width = sim_prefix_width or max(len(r) for rows in prefixes for r in rows)
  pre = [_pad_rows(rows, width, pad_id) for rows in prefixes]
  suf, suf_len = _pad_rows(suffixes, pad_id=pad_id)
  return RolloutBatch(
      prompt_tokens=jnp.asarray(tokens), prompt_lengths=jnp.asarray(lengths),
      row_ids=jnp.asarray(row_ids, jnp.int32),
      sim_prefix=jnp.asarray(np.stack([p[0] for p in pre])),
      sim_prefix_lengths=jnp.asarray(np.stack([p[1] for p in pre])),
      sim_suffix=jnp.asarray(suf), sim_suffix_lengths=jnp.asarray(suf_len))


__all__ = ["RolloutConfig", "RolloutBatch", "Trajectories", "StaticTokens", "EngineOutput",
           "make_rollout", "shard_rollout", "simulator_engine", "host_engine",
           "prepare_static_tokens",
           "prepare_batch", "concat_ragged", "gather_span", "tokens_covering_tail"]
