"""The Python-driven rollout: the same semantics as ``zsjax.rollout`` with a host
loop over jitted prefill / one-token decode steps and string parsing of each turn
(the way the reference code works). It is the oracle of the rollout tests and
the baseline of ``experiments/bench_rollout.py``; train with the jitted one.

Stops and actions are decided on the decoded text of the turn (``</search>`` /
``</answer>`` found in it; ``zsjax.template.parse_action``), not with the byte
automaton, so the two implementations check each other. Search calls go to a
host engine (``zsjax.search.HostEngine``); ``PythonSimulator`` is the LLM
simulator as such an engine, driven the same way (render the prompt as text,
decode token by token, look for the stop marker in the decoded text, parse the
documents out of it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from zsjax.model import ModelConfig, Transformer, cached_apply, init_cache
from zsjax.rollout import RolloutBatch, RolloutConfig, StaticTokens, Trajectories
from zsjax.sampling import Greedy, Sampling, sample
from zsjax.search import SearchRequest, SearchResult, document_tokens
from zsjax.engine import pad_rows
from zsjax.simulator import SimulatorPrompt, parse_documents
from zsjax.template import cut_after_first_close, parse_action


@functools.lru_cache(maxsize=8)
def _forward_fn(cfg: ModelConfig, views: tuple[int, ...] | None = None):
  """One jitted cached forward; with ``views`` its attention reads the live
  prefix of the cache, as the jitted rollout's does (``model.cached_apply``)."""
  model = Transformer(cfg)
  if views is None:
    return jax.jit(lambda p, tokens, segment, cache: model.apply(
        {"params": p}, tokens, segment_ids=segment, cache=cache))
  return jax.jit(lambda p, tokens, segment, cache: cached_apply(
      model, p, tokens, cache, segment_ids=segment, views=views))


class PythonSimulator:
  """The simulator LLM as a host engine (``search(requests) -> SearchResult``),
  driven from Python: each request's prompt rendered as text
  (``SimulatorPrompt.render``) and tokenized, one jitted prefill, then one
  jitted forward per token with sampling, the decoded text checked for the
  ``Doc {top_k + 1}`` marker every step, and the documents parsed from the text
  (``parse_documents``). The rows of a call are right-padded to ``prompt_width``
  tokens, so every call of one batch size shares one compiled forward."""

  def __init__(self, cfg: ModelConfig, params, tokenizer, prompt: SimulatorPrompt,
               max_new_tokens: int, prompt_width: int, sampling=Sampling(temperature=0.8),
               eos_ids: tuple[int, ...] = (), pad_id: int = 0, rng=None):
    self.cfg, self.params, self.tokenizer, self.prompt = cfg, params, tokenizer, prompt
    self.max_new_tokens, self.prompt_width = max_new_tokens, prompt_width
    self.sampling, self.eos_ids, self.pad_id = sampling, set(eos_ids), pad_id
    self.rng = jax.random.key(0) if rng is None else rng
    self.top_k, self.calls, self.generated = prompt.top_k, 0, 0

  def search(self, requests) -> SearchResult:
    forward = _forward_fn(self.cfg)
    n, width = len(requests), self.prompt_width
    ids = [self.tokenizer.encode(self.prompt.render(r.query, r.question, r.answer, r.noisy,
                                                    self.tokenizer), add_special_tokens=False)
           for r in requests]
    if max(map(len, ids)) > width:
      raise ValueError(f"PythonSimulator: a prompt of {max(map(len, ids))} tokens is wider than "
                       f"prompt_width={width}.")
    prompt, lengths = pad_rows(ids, width, self.pad_id)
    cache = init_cache(self.cfg, n, width + self.max_new_tokens)
    segment = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int32)
    logits, cache = forward(self.params, jnp.asarray(prompt), jnp.asarray(segment), cache)
    last = np.asarray(logits)[np.arange(n), lengths - 1]
    rng = jax.random.fold_in(self.rng, self.calls)
    self.calls += 1
    written = [[] for _ in range(n)]
    live = np.ones(n, bool)
    i = 0
    while i < self.max_new_tokens and live.any():
      token, _ = sample(self.sampling, jnp.asarray(last), jax.random.fold_in(rng, i),
                        position=jnp.full((n,), i))
      token = np.asarray(token)
      write = live & ~np.isin(token, list(self.eos_ids or {-1}))
      token = np.where(write, token, self.pad_id).astype(np.int32)
      logits, cache = forward(self.params, jnp.asarray(token[:, None]),
                              jnp.asarray(write[:, None].astype(np.int32)), cache)
      last = np.where(write[:, None], np.asarray(logits)[:, 0], last)
      live = write.copy()
      for r in np.flatnonzero(write):
        written[r].append(int(token[r]))
        self.generated += 1
        if self.prompt.stop_marker in self.tokenizer.decode(written[r], skip_special_tokens=False):
          live[r] = False
      i += 1
    texts = [self.tokenizer.decode(row, skip_special_tokens=False) for row in written]
    return SearchResult([parse_documents(text, self.top_k) for text in texts], [False] * n)


def python_rollout(policy_cfg: ModelConfig, policy_params, tokenizer, static: StaticTokens,
                   engine, config: RolloutConfig, sampling: Greedy | Sampling,
                   batch: RolloutBatch, questions, answers, rng, step: int) -> Trajectories:
  """Host-driven rollout; arguments as ``zsjax.rollout`` plus the host ``engine``
  and the questions / first gold answers of the batch's prompts (row r holds
  prompt ``r // samples_per_prompt``)."""
  forward = _forward_fn(policy_cfg, config.attention_views)
  s_len = config.max_length
  prompt = np.asarray(batch.prompt_tokens)
  prompt_len = np.asarray(batch.prompt_lengths)
  b, p = prompt.shape
  if b % len(questions):
    raise ValueError(f"python_rollout: {b} rows are not {len(questions)} prompts x n samples.")
  row_ids = np.arange(b) // (b // len(questions))
  eos = set(static.eos_ids)
  obs_open, obs_close = list(np.asarray(static.obs_open)), list(np.asarray(static.obs_close))
  feedback = list(np.asarray(static.feedback))
  p_noise = float(config.noise_probability(jnp.asarray(step)))

  seqs = [list(prompt[i, :prompt_len[i]]) for i in range(b)]
  mask = [[0] * int(prompt_len[i]) for i in range(b)]
  logps = [[0.0] * int(prompt_len[i]) for i in range(b)]
  cache = init_cache(policy_cfg, b, s_len)
  segment = (np.arange(p)[None, :] < prompt_len[:, None]).astype(np.int32)
  logits, cache = forward(policy_params, jnp.asarray(prompt), jnp.asarray(segment), cache)
  last = np.asarray(logits)[np.arange(b), prompt_len - 1]
  done = np.zeros(b, bool)
  answered, truncated = np.zeros(b, bool), np.zeros(b, bool)
  turns, searches, noisy_calls, failed, end_turns = (np.zeros(b, np.int32) for _ in range(5))
  generated = np.zeros(b, np.int32)

  for turn in range(config.max_turns + 1):
    turn_rng = jax.random.fold_in(rng, turn)
    decode_rng = jax.random.fold_in(turn_rng, 0)
    active = ~done
    live = active.copy()
    turn_tokens = [[] for _ in range(b)]
    hit_eos = np.zeros(b, bool)
    i = 0
    while i < config.max_new_tokens and live.any():
      sampled, logp = sample(sampling, jnp.asarray(last), jax.random.fold_in(decode_rng, i),
                             position=jnp.asarray(generated))
      sampled, logp = np.asarray(sampled), np.asarray(logp)
      room = live & np.array([len(s) < s_len for s in seqs])
      truncated |= live & ~room
      # an end token ends the turn and is dropped (the turn is then an invalid action)
      hit_eos |= room & np.isin(sampled, list(eos))
      write = room & ~np.isin(sampled, list(eos))
      token = np.where(write, sampled, static.pad_id).astype(np.int32)
      for r in np.flatnonzero(write):
        seqs[r].append(int(token[r]))
        mask[r].append(1)
        logps[r].append(float(logp[r]))
        turn_tokens[r].append(int(token[r]))
      logits, cache = forward(policy_params, jnp.asarray(token[:, None]),
                              jnp.asarray(write[:, None].astype(np.int32)), cache)
      last = np.where(write[:, None], np.asarray(logits)[:, 0], last)
      generated += room
      still = write.copy()
      for r in np.flatnonzero(write):
        text = tokenizer.decode(turn_tokens[r], skip_special_tokens=False)
        if "</search>" in text or "</answer>" in text:
          still[r] = False
      live = still
      i += 1

    final = turn == config.max_turns
    noisy_draw = np.asarray(jax.random.uniform(jax.random.fold_in(turn_rng, 1), (b,))) < p_noise
    requests, search_rows = [], []
    inserts = {}
    for r in np.flatnonzero(active):
      turns[r] += 1
      text = cut_after_first_close(tokenizer.decode(turn_tokens[r], skip_special_tokens=False))
      end_turns[r] += hit_eos[r]
      kind = "invalid" if hit_eos[r] else parse_action(text).kind  # the first complete action
      if kind == "answer":
        answered[r] = True
      if kind == "answer" or truncated[r] or final:
        done[r] = True
        continue
      if kind == "search":  # the query, unstripped: from the first <search> to </search>
        query = text[:-len("</search>")].split("<search>", 1)[1]
        requests.append(SearchRequest(query, questions[row_ids[r]], answers[row_ids[r]],
                                      bool(noisy_draw[r])))
        search_rows.append(r)
      else:
        inserts[r] = feedback
    if requests:
      result = engine.search(requests)
      cap = config.max_obs_tokens - len(obs_open) - len(obs_close)
      for r, docs, fail in zip(search_rows, result.documents, result.failed):
        inserts[r] = obs_open + document_tokens(tokenizer, docs)[:cap] + obs_close
        failed[r] += fail
        searches[r] += 1
        noisy_calls[r] += bool(noisy_draw[r])
    width = config.max_obs_tokens
    obs = np.full((b, width), static.pad_id, np.int32)
    obs_len = np.zeros(b, np.int32)
    for r, ids in inserts.items():
      if len(seqs[r]) + len(ids) > s_len:
        truncated[r] = done[r] = True
        if r in search_rows:
          searches[r] -= 1
          noisy_calls[r] -= bool(noisy_draw[r])
        continue
      obs[r, :len(ids)] = ids
      obs_len[r] = len(ids)
      seqs[r].extend(int(t) for t in ids)
      mask[r].extend([0] * len(ids))
      logps[r].extend([0.0] * len(ids))
    inserted = obs_len > 0
    if inserted.any():  # nothing to prefill on the final turn
      segment = (np.arange(width)[None, :] < obs_len[:, None]).astype(np.int32)
      logits, cache = forward(policy_params, jnp.asarray(obs), jnp.asarray(segment), cache)
      last = np.where(inserted[:, None],
                      np.asarray(logits)[np.arange(b), np.maximum(obs_len - 1, 0)], last)

  tokens = np.full((b, s_len), static.pad_id, np.int32)
  loss_mask = np.zeros((b, s_len), np.int32)
  log_probs = np.zeros((b, s_len), np.float32)
  for r in range(b):
    n = len(seqs[r])
    tokens[r, :n], loss_mask[r, :n], log_probs[r, :n] = seqs[r], mask[r], logps[r]
  return Trajectories(
      tokens=tokens, loss_mask=loss_mask, log_probs=log_probs, prompt_lengths=prompt_len,
      lengths=np.asarray([len(s) for s in seqs], np.int32), turns=turns, searches=searches,
      noisy_calls=noisy_calls, failed_searches=failed, end_token_turns=end_turns,
      answered=answered, truncated=truncated)
