"""The multi-turn rollout as one XLA program.

``make_rollout(...)`` returns ``rollout(policy_params, engine_state, batch, rng,
step) -> Trajectories``, jitted end to end:

  prefill the prompts into the policy KV cache;
  for turn in 0 .. max_turns (a fori_loop; the last turn may not search):
    ``decode_turn``: decode (a while_loop of ``decode_step``) until every live
      row has closed ``</search>`` or ``</answer>`` (matched on bytes, see
      ``zsjax.template``), drawn an end token (which is dropped), spent
      ``max_new_tokens`` or filled the context;
    ``turn_step``: classify each row's turn by its first complete action (answer:
      done; search; anything else, an end token included: invalid, feedback,
      and the trajectory goes on until the turn limit); for searching rows draw noisy ~ Bernoulli(p) with
      ``p = curriculum(step)`` (``zsjax.curriculum``) and ask the engine for
      documents (``zsjax.simulator.SimulatorEngine`` on device, or a host engine
      of ``zsjax.search`` through io_callback), giving it the batch's per-row
      engine inputs; ``insert_observation``: append ``<information>`` +
      documents + ``</information>`` (or the feedback message), capped at
      ``max_obs_tokens``, to every row that goes on, and prefill it into the
      cache at the row's own offset (no re-prefill).

Every buffer has a fixed size, so batches of one shape compile once.

Rows keep their tokens contiguously: row b holds ``tokens[b, :length[b]]``
(prompt, then turns and observations); ``loss_mask`` is 1 exactly on the tokens
the policy sampled. The query of a search is the tokens strictly after the token
that completed ``<search>`` and before the tokens that hold ``</search>``
(counted back on bytes); text a tokenizer merged into those boundary tokens is
not part of the query.

The engine is any object that keeps the contract of ``zsjax.engine.Engine``
(``NoEngine`` when the rollout never searches).

Shape legend: B batch, S context cap (``max_length``), P prompt, Q query, D
documents, O observation, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp

from zsjax.curriculum import Curriculum
from zsjax.data import DataError
from zsjax.engine import (EngineOutput, NoEngine, concat_ragged, gather_span, pad_rows,
                          tokens_covering_tail)
from zsjax.model import (KVCache, ModelConfig, Transformer, attention_views, cached_apply,
                         init_cache, write_chunk)
from zsjax.sampling import Greedy, Sampling, sample
from zsjax.template import (ANSWER_CLOSE, ANSWER_OPEN, CLOSING, INFORMATION_CLOSE,
                            INFORMATION_OPEN, INVALID_ACTION_FEEDBACK, SEARCH_CLOSE, SEARCH_OPEN,
                            TAGS, TagMatcher, token_bytes)

SEARCH_CLOSE_BYTES = len(TAGS[1])


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  """Static sizes and settings (paper: 5 turns, 500 tokens a turn, 2048-token
  observations, 4096-token context) and the noise curriculum."""

  max_turns: int = 5  # turns that may search; one final turn follows
  max_new_tokens: int = 500  # per turn
  max_obs_tokens: int = 2048  # inserted per turn, wrapper included
  max_length: int = 4096  # S: prompt + everything after it
  max_query_tokens: int = 64  # Q: longest query passed to an engine
  curriculum: Curriculum = Curriculum()
  # Attention over the live prefix: decode and prefill read the smallest cache view
  # (S, S/2, ... down to this many slots) holding every row's tokens
  # (model.cached_apply); 0 reads the whole cache every step.
  attention_view: int = 512
  # Rows in a row of the batch's groups: consecutive rows ``g*k .. g*k+k-1`` hold the
  # same prompt (a GRPO group's samples, ``prepare_batch(samples_per_prompt=k)``), and
  # it is prefilled once per group, its cache copied to the group's rows. 1: every
  # row prefills its own prompt.
  prompt_group: int = 1

  @classmethod
  def from_config(cls, rollout, curriculum=None, total_steps: int = 1) -> "RolloutConfig":
    """The one translation of config sections into a ``RolloutConfig``: ``rollout``
    (``max_turns``, ``max_new_tokens``, ``max_obs_tokens``, ``max_length``,
    ``max_query_tokens``, ``attention_view``) and, for training,
    ``curriculum`` over ``total_steps``."""
    noise = Curriculum() if curriculum is None else Curriculum.from_config(curriculum,
                                                                          total_steps)
    return cls(max_turns=rollout.max_turns, max_new_tokens=rollout.max_new_tokens,
               max_obs_tokens=rollout.max_obs_tokens, max_length=rollout.max_length,
               max_query_tokens=rollout.max_query_tokens, curriculum=noise,
               attention_view=rollout.attention_view)

  @property
  def attention_views(self) -> tuple[int, ...]:
    """The cache views decode and prefill choose from (``model.attention_views``)."""
    if self.attention_view <= 0:
      return (self.max_length,)
    return attention_views(self.max_length, self.attention_view)

  def noise_probability(self, step):
    """The curriculum's p(noisy) at ``step`` (Python or traced)."""
    return self.curriculum(step)

  def __post_init__(self):
    for name in ("max_turns", "max_new_tokens", "max_obs_tokens", "max_length",
                 "max_query_tokens", "prompt_group"):
      if getattr(self, name) < (0 if name == "max_turns" else 1):
        raise ValueError(f"RolloutConfig.{name}={getattr(self, name)} is too small.")


@flax.struct.dataclass
class RolloutBatch:
  """Host-prepared inputs (``prepare_batch``)."""

  prompt_tokens: jax.Array  # [B, P] right-padded
  prompt_lengths: jax.Array  # [B]
  engine_inputs: Any  # the engine's per-row inputs (engine.inputs), batch on the rows


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
  end_token_turns: jax.Array  # [B] turns ended by an end token (dropped; an invalid action)
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


# -------------------------------------------------------------- the program


@dataclasses.dataclass(frozen=True, eq=False)
class RolloutSpec:
  """What the rollout is built from (static: closed over, never traced)."""

  policy_cfg: ModelConfig
  matcher: TagMatcher
  static: StaticTokens
  engine: Any
  config: RolloutConfig
  sampling: Any  # Greedy | Sampling, or any strategy zsjax.sampling.sample accepts

  @property
  def model(self) -> Transformer:
    return Transformer(self.policy_cfg)


@flax.struct.dataclass
class RolloutState:
  """Everything the rollout carries from turn to turn."""

  tokens: jax.Array  # [B, S]
  loss_mask: jax.Array  # [B, S]
  log_probs: jax.Array  # [B, S]
  cache: Any  # the policy's KV cache (zsjax.model.init_cache), S slots
  last_logits: jax.Array  # [B, V] logits after each row's last token
  length: jax.Array  # [B] tokens held
  generated: jax.Array  # [B] tokens the policy drew over all turns (end tokens included)
  done: jax.Array  # [B] bool
  answered: jax.Array  # [B] bool
  truncated: jax.Array  # [B] bool
  turns: jax.Array  # [B]
  searches: jax.Array  # [B]
  noisy: jax.Array  # [B]
  failed: jax.Array  # [B]
  end_turns: jax.Array  # [B] turns ended by an end token


@flax.struct.dataclass
class TurnState:
  """One turn of decoding: the rollout state plus what the turn has seen."""

  rollout: RolloutState
  i: jax.Array  # [] decode steps taken this turn
  live: jax.Array  # [B] bool: still decoding this turn
  matcher_state: jax.Array  # [B] tag automaton state
  open_end: jax.Array  # [B] position after the token that completed <search>; -1 = none
  answer_open: jax.Array  # [B] bool: an <answer> was opened
  close: jax.Array  # [B] the first closing tag (SEARCH_CLOSE / ANSWER_CLOSE), 0 = none
  eos: jax.Array  # [B] bool: drew an end token (dropped; the turn is an invalid action)


def decode_step(spec: RolloutSpec, params, turn_rng, t: TurnState) -> TurnState:
  """Samples one token for every live row, writes it, and advances the cache."""
  s, static = t.rollout, spec.static
  s_len = spec.config.max_length
  rows = jnp.arange(s.length.shape[0])
  sampled, logp = sample(spec.sampling, s.last_logits, jax.random.fold_in(turn_rng, t.i),
                         position=s.generated)
  full = s.length >= s_len
  # An end token ends the row's turn without an action; it is not kept (not in the
  # sequence, no loss), like the reference, whose responses drop special tokens.
  ended = t.live & ~full & jnp.isin(sampled, jnp.asarray(static.eos_ids or (-1,), jnp.int32))
  write = t.live & ~full & ~ended
  token = jnp.where(write, sampled, static.pad_id)
  pos = s.length
  tokens = s.tokens.at[rows, pos].set(token, mode="drop")
  loss_mask = s.loss_mask.at[rows, pos].set(write.astype(jnp.int32), mode="drop")
  log_probs = s.log_probs.at[rows, pos].set(jnp.where(write, logp, 0.0), mode="drop")
  matcher_state, done_tags = spec.matcher.step(t.matcher_state, token)
  done_tags = jnp.where(write, done_tags, 0)
  # The first complete action decides: the query starts after the turn's first <search>.
  open_end = jnp.where(write & (done_tags & SEARCH_OPEN != 0) & (t.open_end < 0), pos + 1,
                       t.open_end)
  answer_open = t.answer_open | (write & (done_tags & ANSWER_OPEN != 0))
  closed = write & (done_tags & CLOSING != 0)
  close = jnp.where(closed & (t.close == 0), done_tags & CLOSING, t.close)
  truncated = s.truncated | (t.live & full)
  logits, cache = cached_apply(spec.model, params, token[:, None], s.cache,
                               segment_ids=write[:, None].astype(jnp.int32),
                               views=spec.config.attention_views)
  state = s.replace(tokens=tokens, loss_mask=loss_mask, log_probs=log_probs, cache=cache,
                    last_logits=jnp.where(write[:, None], logits[:, 0], s.last_logits),
                    length=s.length + write, generated=s.generated + (write | ended),
                    truncated=truncated)
  return TurnState(rollout=state, i=t.i + 1, live=write & ~closed & ~ended,
                   matcher_state=matcher_state, open_end=open_end, answer_open=answer_open,
                   close=close, eos=t.eos | ended)


def decode_turn(spec: RolloutSpec, params, state: RolloutState, turn_rng) -> TurnState:
  """Decodes one turn for every row not yet done."""
  b = state.length.shape[0]
  zeros, false = jnp.zeros((b,), jnp.int32), jnp.zeros((b,), bool)
  t = TurnState(rollout=state, i=jnp.int32(0), live=~state.done, matcher_state=zeros,
                open_end=jnp.full((b,), -1), answer_open=false, close=zeros, eos=false)
  return jax.lax.while_loop(
      lambda t: (t.i < spec.config.max_new_tokens) & jnp.any(t.live),
      functools.partial(decode_step, spec, params, turn_rng), t)


def search_query(spec: RolloutSpec, state: RolloutState, open_end):
  """The query each row wrote: after the token that completed ``<search>``,
  before the tokens of ``</search>`` (the last ones written). ``([B, Q], [B])``."""
  close_end = state.length
  span = jnp.maximum(close_end - open_end, 0)
  tag_tokens = tokens_covering_tail(spec.static.piece_bytes, state.tokens, close_end, span,
                                    SEARCH_CLOSE_BYTES)
  width = spec.config.max_query_tokens
  query_len = jnp.clip(span - tag_tokens, 0, width)
  return gather_span(state.tokens, open_end, query_len, width, spec.static.pad_id), query_len


def observation_width(config: RolloutConfig, static: StaticTokens, doc_width: int,
                      wrapped: bool = False) -> int:
  """O, the width of an inserted observation: as wide as the widest the engine can
  return (``doc_width`` document tokens inside the wrapper) or the feedback, never
  wider than ``config.max_obs_tokens``. An on-device simulator writes at most its
  ``max_new_tokens`` (600 in the paper), so its observations are prefilled ~600
  wide, not 2048. ``wrapped``: the engine's tokens hold the wrapper already."""
  wrapper = 0 if wrapped else static.obs_open.shape[0] + static.obs_close.shape[0]
  return min(config.max_obs_tokens, max(wrapper + doc_width, static.feedback.shape[0]))


def observations(spec: RolloutSpec, docs: EngineOutput, do_search):
  """Per row, ``<information>`` + documents + ``</information>`` where it searched,
  else the invalid-action feedback: ``([B, O], lengths [B])``, O =
  ``observation_width``."""
  static = spec.static
  width = observation_width(spec.config, static, docs.tokens.shape[1], docs.wrapped)
  if docs.wrapped:  # one string tokenized on the host; cut at the width, as the reference
    obs_docs, obs_docs_len = concat_ragged([(docs.tokens, jnp.minimum(docs.lengths, width))],
                                           width, static.pad_id)
  else:
    wrapper = static.obs_open.shape[0] + static.obs_close.shape[0]
    doc_len = jnp.minimum(docs.lengths, width - wrapper)
    obs_docs, obs_docs_len = concat_ragged(
        [(static.obs_open[None], static.obs_open.shape[0]), (docs.tokens, doc_len),
         (static.obs_close[None], static.obs_close.shape[0])], width, static.pad_id)
  feedback, feedback_len = concat_ragged(
      [(static.feedback[None], static.feedback.shape[0])], width, static.pad_id)
  return (jnp.where(do_search[:, None], obs_docs, feedback),
          jnp.where(do_search, obs_docs_len, feedback_len))


def insert_observation(spec: RolloutSpec, params, state: RolloutState, obs, obs_len, insert,
                       any_documents) -> RolloutState:
  """Writes ``obs`` after each inserting row's tokens (loss mask 0) and prefills
  it into the cache at the row's offset (``obs [B, O]``)."""
  width, s_len = obs.shape[1], spec.config.max_length
  rows = jnp.arange(obs.shape[0])
  slots = state.length[:, None] + jnp.arange(width)[None, :]
  in_obs = jnp.arange(width)[None, :] < obs_len[:, None]
  tokens = state.tokens.at[rows[:, None], jnp.where(in_obs, slots, s_len)].set(obs, mode="drop")

  cfg = spec.policy_cfg
  chunk_shape = (cfg.num_layers, obs.shape[0], width, cfg.num_kv_heads, cfg.head_dim)

  def pad(chunk_kv):  # [Y, B, c, K, H] -> [Y, B, width, K, H]
    return jnp.pad(chunk_kv, ((0, 0), (0, 0), (0, width - chunk_kv.shape[2]), (0, 0), (0, 0)))

  def prefill(chunk):
    def run(operand):
      cache, last = operand
      index = jnp.clip(obs_len - 1, 0, chunk - 1)
      logits, (k, v, advance) = cached_apply(  # the logits of each row's last position only
          spec.model, params, obs[:, :chunk], cache,
          segment_ids=in_obs[:, :chunk].astype(jnp.int32), views=spec.config.attention_views,
          write=False, logits_at=index)
      last = jnp.where(insert[:, None], logits[:, 0], last)
      return last, (pad(k).astype(cache.k.dtype), pad(v).astype(cache.v.dtype), advance)
    return run

  def nothing(operand):
    cache, last = operand
    empty = jnp.zeros(chunk_shape, cache.k.dtype)
    return last, (empty, empty, jnp.zeros_like(cache.lengths))

  # Prefill only what is inserted: nothing (final turn, all rows done), the
  # feedback alone (a short chunk), or documents (the full observation width).
  # The branches only read the cache and the one write follows the switch, so
  # XLA updates the buffer in place instead of copying it through the branch.
  branch = jnp.where(~jnp.any(insert), 0, jnp.where(any_documents, 2, 1))
  last, chunk = jax.lax.switch(
      branch, [nothing, prefill(int(spec.static.feedback.shape[0])), prefill(width)],
      (state.cache, state.last_logits))
  return state.replace(tokens=tokens, cache=write_chunk(state.cache, *chunk), last_logits=last,
                       length=state.length + obs_len)


def turn_step(spec: RolloutSpec, params, engine_state, batch: RolloutBatch, rng, p_noise, turn,
              state: RolloutState) -> RolloutState:
  """One turn: decode, act on what each row wrote, insert documents or feedback."""
  turn_rng = jax.random.fold_in(rng, turn)
  active = ~state.done
  t = decode_turn(spec, params, state, jax.random.fold_in(turn_rng, 0))
  state = t.rollout
  final = turn == spec.config.max_turns
  answered = active & (t.close == ANSWER_CLOSE) & t.answer_open
  searched = active & (t.close == SEARCH_CLOSE) & (t.open_end >= 0)
  stopped = active & state.truncated
  invalid = active & ~answered & ~searched & ~stopped
  done = state.done | answered | stopped | (final & active)

  query, query_len = search_query(spec, state, t.open_end)
  do_search = searched & ~final
  b = query.shape[0]
  noisy = do_search & (jax.random.uniform(jax.random.fold_in(turn_rng, 1), (b,)) < p_noise)
  docs = spec.engine(engine_state, batch.engine_inputs, query, query_len, do_search, noisy,
                     jax.random.fold_in(turn_rng, 2))
  obs, obs_len = observations(spec, docs, do_search)
  insert = (do_search | invalid) & ~done
  overflow = insert & (state.length + obs_len > spec.config.max_length)
  insert = insert & ~overflow
  obs_len = jnp.where(insert, obs_len, 0)
  state = state.replace(
      turns=state.turns + active, answered=state.answered | answered,
      truncated=state.truncated | overflow, done=done | overflow,
      searches=state.searches + (do_search & insert), noisy=state.noisy + (noisy & insert),
      failed=state.failed + (do_search & docs.failed), end_turns=state.end_turns + t.eos)
  return insert_observation(spec, params, state, obs, obs_len, insert,
                            jnp.any(insert & do_search))


def initial_state(spec: RolloutSpec, params, batch: RolloutBatch) -> RolloutState:
  """The prompts prefilled into a fresh cache."""
  b, p = batch.prompt_tokens.shape
  s_len, pad_id = spec.config.max_length, spec.static.pad_id
  if p > s_len:
    raise ValueError(f"prompts of {p} tokens exceed RolloutConfig.max_length={s_len}.")
  g = spec.config.prompt_group
  if b % g:
    raise ValueError(f"a rollout batch of {b} rows does not split into groups of "
                     f"RolloutConfig.prompt_group={g} rows sharing a prompt.")
  prompts, prompt_lengths = batch.prompt_tokens[::g], batch.prompt_lengths[::g]  # [B/g, P]
  segment = (jnp.arange(p)[None, :] < prompt_lengths[:, None]).astype(jnp.int32)
  cache = init_cache(spec.policy_cfg, b // g, s_len)
  # A fresh cache holds nothing: attention reads none of its slots.
  logits, cache = spec.model.apply({"params": params}, prompts, segment_ids=segment,
                                   cache=cache, attend=0,
                                   logits_at=prompt_lengths - 1)  # the last position's
  last = logits[:, 0]
  if g > 1:  # each group's prefill, copied to its rows
    cache = KVCache(k=jnp.repeat(cache.k, g, axis=1), v=jnp.repeat(cache.v, g, axis=1),
                    lengths=jnp.repeat(cache.lengths, g))
    last = jnp.repeat(last, g, axis=0)
  zeros, false = jnp.zeros((b,), jnp.int32), jnp.zeros((b,), bool)
  return RolloutState(
      tokens=jnp.full((b, s_len), pad_id, jnp.int32).at[:, :p].set(batch.prompt_tokens),
      loss_mask=jnp.zeros((b, s_len), jnp.int32), log_probs=jnp.zeros((b, s_len), jnp.float32),
      cache=cache, last_logits=last, length=batch.prompt_lengths.astype(jnp.int32),
      generated=zeros, done=false, answered=false, truncated=false, turns=zeros,
      searches=zeros, noisy=zeros, failed=zeros, end_turns=zeros)


def run_rollout(spec: RolloutSpec, policy_params, engine_state, batch: RolloutBatch, rng,
                step) -> Trajectories:
  """The whole rollout (trace it under ``jax.jit``)."""
  p_noise = spec.config.noise_probability(jnp.asarray(step))
  state = initial_state(spec, policy_params, batch)
  state = jax.lax.fori_loop(
      0, spec.config.max_turns + 1,
      functools.partial(turn_step, spec, policy_params, engine_state, batch, rng, p_noise), state)
  valid = jnp.arange(spec.config.max_length)[None, :] < state.length[:, None]
  return Trajectories(
      tokens=jnp.where(valid, state.tokens, spec.static.pad_id),
      loss_mask=state.loss_mask * valid, log_probs=state.log_probs * valid,
      prompt_lengths=batch.prompt_lengths, lengths=state.length, turns=state.turns,
      searches=state.searches, noisy_calls=state.noisy, failed_searches=state.failed,
      end_token_turns=state.end_turns,
      answered=state.answered, truncated=state.truncated)


def make_rollout(policy_cfg: ModelConfig, matcher: TagMatcher, static: StaticTokens,
                 engine, config: RolloutConfig, sampling: Greedy | Sampling):
  """``rollout(policy_params, engine_state, batch, rng, step) -> Trajectories``
  (not yet jitted: wrap it in ``jax.jit``, or use ``shard_rollout``)."""
  width = config.max_obs_tokens
  wrapper = static.obs_open.shape[0] + static.obs_close.shape[0]
  if wrapper >= width:
    raise ValueError(f"RolloutConfig.max_obs_tokens={width} leaves no room for documents "
                     f"inside the {wrapper}-token <information> wrapper.")
  if static.feedback.shape[0] > width:
    raise ValueError(f"RolloutConfig.max_obs_tokens={width} is shorter than the "
                     f"{static.feedback.shape[0]}-token invalid-action feedback.")
  spec = RolloutSpec(policy_cfg, matcher, static, engine, config, sampling)
  return functools.partial(run_rollout, spec)


def shard_rollout(rollout, plan, policy_cfg: ModelConfig, *, engine=None,
                  engine_state_shardings=None):
  """``jax.jit`` of a rollout with explicit shardings from a
  ``zsjax.sharding.ShardingPlan``: policy params by the plan's rules, rows split
  over ``data`` x ``fsdp``, traced inside the plan's context (activation
  constraints). ``engine``: the rollout's engine (its ``input_shardings``);
  ``engine_state_shardings``: e.g. ``plan.params(sim_cfg)`` for the on-device
  simulator, None (replicated) otherwise."""
  rows, rows2, repl = plan.rows(1), plan.rows(2), plan.replicated()
  batch_shardings = RolloutBatch(prompt_tokens=rows2, prompt_lengths=rows,
                                 engine_inputs=(engine or NoEngine()).input_shardings(plan))
  out_shardings = Trajectories(tokens=rows2, loss_mask=rows2, log_probs=rows2,
                               prompt_lengths=rows, lengths=rows, turns=rows, searches=rows,
                               noisy_calls=rows, failed_searches=rows, end_token_turns=rows,
                               answered=rows,
                               truncated=rows)

  def sharded_rollout(policy_params, engine_state, batch, rng, step):
    with plan.context():
      return rollout(policy_params, engine_state, batch, rng, step)

  jitted = jax.jit(sharded_rollout,
                   in_shardings=(plan.params(policy_cfg), engine_state_shardings or repl,
                                 batch_shardings, repl, repl),
                   out_shardings=out_shardings)

  @functools.wraps(sharded_rollout)
  def checked_rollout(policy_params, engine_state, batch: RolloutBatch, rng, step):
    rows_in_batch = batch.prompt_tokens.shape[0]
    if rows_in_batch % plan.batch_divisor:  # before JAX places anything
      raise ValueError(f"rollout batch of {rows_in_batch} rows is not divisible by data x fsdp "
                       f"= {plan.batch_divisor} (mesh {plan.sizes}); use a multiple of it.")
    return jitted(policy_params, engine_state, batch, rng, step)

  return checked_rollout


# ------------------------------------------------------------- host preparation


def prepare_static_tokens(tokenizer, vocab_size: int | None = None,
                          eos_ids: tuple[int, ...] | None = None,
                          pad_id: int | None = None,
                          feedback: str = INVALID_ACTION_FEEDBACK) -> StaticTokens:
  """Token ids of the inserted texts (``feedback``: the invalid-action
  observation of the prompt style, ``zsjax.template.PROMPT_STYLES``), and the byte
  length of every token."""

  def ids(text):
    return jnp.asarray(tokenizer.encode(text, add_special_tokens=False), jnp.int32)

  pieces = token_bytes(tokenizer, vocab_size)
  if eos_ids is None:
    eos_ids = tuple(i for i in (tokenizer.eos_token_id,) if i is not None)
  if pad_id is None:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_ids or (0,))[0]
  return StaticTokens(obs_open=ids("\n\n" + INFORMATION_OPEN),
                      obs_close=ids(INFORMATION_CLOSE + "\n\n"),
                      feedback=ids(feedback),
                      piece_bytes=jnp.asarray([len(x) for x in pieces], jnp.int32),
                      eos_ids=tuple(int(i) for i in eos_ids), pad_id=int(pad_id))


def prompt_too_wide(tokenizer, prompt: str, width: int, width_field: str,
                    kind: str = "") -> str | None:
  """Why a row's ``prompt`` (made from its field 'question') cannot join a batch of
  ``width`` tokens (the config's ``width_field``), or None when it fits."""
  n = len(tokenizer.encode(prompt, add_special_tokens=False))
  if n <= width:
    return None
  return (f"field 'question' makes a {kind + ' ' if kind else ''}prompt of {n} tokens, more "
          f"than {width_field}={width}; raise it to keep such rows")


def row_check(tokenizer, engine, render, prompt_width: int, width_field: str):
  """A ``data.load_qa`` row check: raises ``data.DataError`` naming the field when
  the row could not go through ``prepare_batch`` (its prompt, ``render(question)``,
  is wider than ``prompt_width``, or the engine cannot take its text), so a bad row
  is skipped or reported when the data loads, not at the step that draws it."""

  def check(row: dict) -> None:
    problem = (prompt_too_wide(tokenizer, render(row["question"]), prompt_width, width_field)
               or (engine or NoEngine()).row_problem(row["question"], row["golden_answers"][0]))
    if problem:
      raise DataError(problem)

  return check


def prepare_batch(tokenizer, prompts: Sequence[str], questions: Sequence[str],
                  answers: Sequence[str], engine=None, *, samples_per_prompt: int = 1,
                  pad_id: int = 0, prompt_width: int | None = None) -> RolloutBatch:
  """Tokenizes prompts (already rendered with ``zsjax.template.render_prompt``),
  repeats each ``samples_per_prompt`` times (group sampling: rows g*n .. g*n+n-1
  share prompt g), and adds the engine's per-row inputs built from each prompt's
  question and first gold answer. A fixed ``prompt_width`` keeps every batch one
  shape (one compile)."""
  if not len(prompts) == len(questions) == len(answers):
    raise ValueError(f"prepare_batch: {len(prompts)} prompts, {len(questions)} questions and "
                     f"{len(answers)} answers; give one question and first gold answer per prompt.")
  n = samples_per_prompt
  prompt_ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts for _ in range(n)]
  if min(len(r) for r in prompt_ids) == 0:
    raise ValueError("prepare_batch: a prompt tokenized to nothing.")
  longest = max(len(r) for r in prompt_ids)
  if prompt_width is not None and longest > prompt_width:
    raise ValueError(f"prepare_batch: a prompt has {longest} tokens, more than the fixed "
                     f"width {prompt_width}; raise the width or shorten the text.")
  tokens, lengths = pad_rows(prompt_ids, prompt_width, pad_id)
  return RolloutBatch(prompt_tokens=jnp.asarray(tokens), prompt_lengths=jnp.asarray(lengths),
                      engine_inputs=(engine or NoEngine()).inputs(list(questions), list(answers),
                                                                  n))


def prepare_qa_batch(tokenizer, examples: Sequence[dict], render, engine=None, *,
                     samples_per_prompt: int = 1, pad_id: int = 0, prompt_width: int | None = None,
                     widths: str = ""):
  """``prepare_batch`` of QA rows (``question``, ``golden_answers``, ``data_source``),
  each prompt ``render(question)``: ``(RolloutBatch, golds per row, data source per
  row)``. ``widths`` names the config fields whose widths a failure may need."""
  questions = [e["question"] for e in examples]
  try:
    batch = prepare_batch(tokenizer, [render(q) for q in questions], questions,
                          [e["golden_answers"][0] for e in examples], engine,
                          samples_per_prompt=samples_per_prompt, pad_id=pad_id,
                          prompt_width=prompt_width)
  except ValueError as e:
    if not widths:
      raise
    raise ValueError(f"{e} The widths are {widths}.") from None
  n = samples_per_prompt
  golds = [list(e["golden_answers"]) for e in examples for _ in range(n)]
  return batch, golds, [e["data_source"] for e in examples for _ in range(n)]


__all__ = ["RolloutConfig", "RolloutBatch", "Trajectories", "StaticTokens", "RolloutSpec",
           "RolloutState", "TurnState", "make_rollout", "run_rollout", "prompt_too_wide",
           "prepare_qa_batch",
           "shard_rollout", "prepare_static_tokens", "prepare_batch", "row_check",
           "decode_step", "decode_turn", "turn_step", "observation_width", "insert_observation",
           "initial_state"]
