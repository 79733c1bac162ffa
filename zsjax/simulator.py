"""The simulated search engine: an LLM that writes useful or noisy documents.

Everything about the simulator lives here (METHOD.md §3):

* ``SimulatorPrompt``: the prompt, a config string with ``{query}``,
  ``{question}``, ``{answer}`` and ``{quality}`` / ``{Quality}`` placeholders (the
  default wording is our own; ``"zerosearch"`` names the released simulators'
  exact prompt, ``ZEROSEARCH_TEMPLATE``);
* ``parse_documents``: post-processing of a simulator's text (cut before the
  (k+1)-th ``Doc`` marker, blank lines collapsed);
* ``SimulatorEngine``: the on-device engine of the jitted rollout. On the host
  it tokenizes each row's prompt around the query (``inputs``: the useful and the
  noisy prefix with the row's own question and answer, and the suffixes); in the
  rollout it assembles ``prefix[noisy] + query + suffix[noisy]``, generates until
  EOS, its token budget or the ``Doc {top_k + 1}`` marker, and drops the marker;
* ``engine_from_config``: the engine and its params from a config's
  ``simulator`` and ``engine`` sections.

A served simulator (an HTTP endpoint) is a host engine: ``zsjax.search``.

Shape legend: B batch, Lp prompt prefix, Ls prompt suffix, Q query, D documents.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from zsjax.engine import (EngineOutput, concat_ragged, decode_text, encode_texts, gather_span,
                          pad_rows, tokens_covering_tail)
from zsjax.model import ModelConfig, Transformer, init_cache
from zsjax.sampling import Greedy, Sampling, sample
from zsjax.template import TagMatcher, build_tag_matcher, information_block, token_bytes

DEFAULT_TEMPLATE = (
    "You act as a web search engine.\n"
    "Write five {quality} documents for the search query below.\n"
    'Context: the user is working on the question "{question}", and its answer is {answer}.\n'
    "Each document should be about 30 words long and contain {quality} information.\n"
    "\n"
    "Query: {query}\n"
    "{Quality} Output:")

# The prompt the released ZeroSearch simulators (Sim-3B/7B/14B) were fine-tuned on
# and are called with: `search_simulate_sft` in llm_agent/generation.py of
# Alibaba-NLP/ZeroSearch (commit 2d4cdca), its useful and noisy variants folded
# into {quality} / {Quality}. The question in quotes, the first gold answer, "five"
# whatever top_k is, and a final newline, character for character.
ZEROSEARCH_TEMPLATE = (
    "You are the Google search engine.\n"
    "Given a query, you need to generate five {quality} documents for the query.\n"
    "\n"
    'The user is trying to answer the question: "{question}" whose answer is {answer}.\n'
    "Each document should contain about 30 words, and these documents should contain "
    "{quality} information.\n"
    "\n"
    "Query: {query}\n"
    "{Quality} Output:\n")

# config.simulator.template: one of these names, or a template's own text; "" is "zsjax".
TEMPLATES = {"zsjax": DEFAULT_TEMPLATE, "zerosearch": ZEROSEARCH_TEMPLATE}

_DOC_MARKER = re.compile(r"Doc\s*(\d+)\s*:?", re.IGNORECASE)


# ------------------------------------------------------------------ the prompt


@dataclasses.dataclass(frozen=True)
class SimulatorPrompt:
  """Renders the simulator's prompt. Placeholders: ``{query}``, ``{question}``,
  ``{answer}`` (the first gold answer), ``{quality}`` / ``{Quality}`` (``useful``
  or ``noisy``, lower / capitalised)."""

  template: str = DEFAULT_TEMPLATE
  top_k: int = 5
  # Released simulators are chat models, called with an empty system message and the
  # prompt as the user's: True wraps the prompt in the simulator tokenizer's chat
  # template (on device), or sends it as chat messages (HTTP, /v1/chat/completions).
  chat: bool = False

  def __post_init__(self):
    if self.template.count("{query}") != 1:
      raise ValueError("SimulatorPrompt.template must contain '{query}' exactly once (found "
                       f"{self.template.count('{query}')}); the query is inserted there.")
    if "{quality}" not in self.template and "{Quality}" not in self.template:
      raise ValueError("SimulatorPrompt.template has no '{quality}' or '{Quality}' placeholder, "
                       "so useful and noisy calls would get the same prompt.")
    after_query = self.template.split("{query}")[1]
    if "{question}" in after_query or "{answer}" in after_query:
      raise ValueError("SimulatorPrompt.template has {question} or {answer} after {query}; the "
                       "part after the query must be the same for every row (move them before).")
    if self.top_k <= 0:
      raise ValueError(f"SimulatorPrompt.top_k={self.top_k} must be positive.")
    try:
      self.message("q", "question", "answer", noisy=False)
    except (KeyError, IndexError) as e:
      raise ValueError(f"SimulatorPrompt.template has an unknown placeholder {e}; use {{query}}, "
                       "{question}, {answer}, {quality}, {Quality} (double other braces).") from None

  @classmethod
  def from_config(cls, template: str, top_k: int, chat: bool = False) -> "SimulatorPrompt":
    """``template``: a name of ``TEMPLATES`` (``"zerosearch"``: the released
    simulators' prompt; ``"zsjax"`` or empty: ``DEFAULT_TEMPLATE``) or a template's
    own text (it has a ``{query}``)."""
    return cls(named_template(template), top_k=top_k, chat=chat)

  @property
  def stop_marker(self) -> str:
    """The marker of the first document past ``top_k``: generation stops there."""
    return f"Doc {self.top_k + 1}"

  def _fields(self, question: str, answer: str, noisy: bool) -> dict[str, str]:
    quality = "noisy" if noisy else "useful"
    return {"question": question.strip(), "answer": answer.strip(), "quality": quality,
            "Quality": quality.capitalize()}

  def message(self, query: str, question: str, answer: str, noisy: bool) -> str:
    """The prompt's own text (the user message when ``chat``). The query comes as
    a policy writes it after ``<search>``: one space, then its words
    (``policy_query``); spaces that end the text before ``{query}`` give way to
    it, so "Query: {query}" reads "Query: <words>"."""
    marker = "\x00QUERY\x00"
    text = self.template.replace("{query}", marker).format(**self._fields(question, answer, noisy))
    prefix, suffix = text.split(marker)
    return prefix.rstrip(" ") + policy_query(query) + suffix

  def messages(self, query: str, question: str, answer: str, noisy: bool) -> list[dict]:
    """The chat form: an empty system message, then the prompt as the user's."""
    return [{"role": "system", "content": ""},
            {"role": "user", "content": self.message(query, question, answer, noisy)}]

  def render(self, query: str, question: str, answer: str, noisy: bool, tokenizer=None) -> str:
    """The prompt as the simulator reads it: ``message``, wrapped in ``tokenizer``'s
    chat template when ``chat`` (with the generation prompt). The one rendering:
    the on-device engine reproduces it in token ids."""
    if not self.chat:
      return self.message(query, question, answer, noisy)
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
      raise ValueError("SimulatorPrompt(chat=True) needs the simulator's tokenizer with a chat "
                       "template (config.simulator.chat_template=True); use False for a raw "
                       "prompt.")
    return tokenizer.apply_chat_template(self.messages(query, question, answer, noisy),
                                         tokenize=False, add_generation_prompt=True)

  def split(self, question: str, answer: str, noisy: bool, tokenizer=None) -> tuple[str, str]:
    """The rendering before the query (without the space the query brings) and
    after it, for assembly around the policy's query tokens."""
    marker = "\x00QUERY\x00"
    text = self.render(marker, question, answer, noisy, tokenizer)
    prefix, suffix = text.split(policy_query(marker))
    return prefix, suffix


def named_template(template: str) -> str:
  """The text of ``config.simulator.template``: a name of ``TEMPLATES``, empty
  (``DEFAULT_TEMPLATE``) or a template's own text."""
  if template in TEMPLATES or not template:
    return TEMPLATES[template or "zsjax"]
  if "{query}" not in template:
    raise ValueError(f"config.simulator.template={template!r} is neither a template name "
                     f"({', '.join(sorted(TEMPLATES))}) nor a template (no '{{query}}'); use "
                     "'zerosearch' for the released simulators' prompt.")
  return template


def policy_query(query: str) -> str:
  """A query as a policy writes it between ``<search>`` and ``</search>``, with
  the outer whitespace that the engine drops: one leading space, then the words.
  Byte-level BPE tokenizers merge that space into the first word, as in the
  policy's own tokens."""
  return " " + query.strip()


def reference_text(text: str, top_k: int) -> str:
  """A simulator's text as the reference passes it on (llm_agent/generation.py,
  ``search_simulate_sft``): each ``\\n\\n`` made one newline, and everything from
  ``Doc {top_k + 1}`` on cut away."""
  return text.replace("\n\n", "\n").split(f"Doc {top_k + 1}")[0]


def parse_documents(text: str, top_k: int) -> list[str]:
  """Documents from a simulator's output: cut before the (top_k + 1)-th ``Doc``
  marker, blank lines collapsed, split at the markers (text before the first
  marker, if any, counts as one document)."""
  markers = list(_DOC_MARKER.finditer(text))
  if len(markers) > top_k:
    text = text[:markers[top_k].start()]
    markers = markers[:top_k]
  text = re.sub(r"\n\s*\n+", "\n", text)
  markers = list(_DOC_MARKER.finditer(text))
  if not markers:
    return [text.strip()] if text.strip() else []
  docs = [text[:markers[0].start()].strip()] if text[:markers[0].start()].strip() else []
  for i, m in enumerate(markers):
    end = markers[i + 1].start() if i + 1 < len(markers) else len(text)
    body = text[m.end():end].strip()
    if body:
      docs.append(body)
  return docs[:top_k]


# ------------------------------------------------------------ on-device engine


@flax.struct.dataclass
class SimulatorInputs:
  """Each row's simulator prompt around the query (``SimulatorEngine.inputs``)."""

  prefix: jax.Array  # [2, B, Lp] before the query (0 useful, 1 noisy), right-padded
  prefix_lengths: jax.Array  # [2, B]
  suffix: jax.Array  # [2, Ls] after the query
  suffix_lengths: jax.Array  # [2]
  # question and first gold answer as UTF-8 bytes ([B, 2, W], [B, 2]) when the prompt
  # is tokenized on the host (``retokenize``); [B, 2, 1] zeros otherwise
  text: jax.Array
  text_lengths: jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class SimulatorEngine:
  """The LLM simulator on device; its ``engine_state`` is the simulator's params.

  ``tokenizer`` is the simulator's own (its chat template renders the prompt);
  it must give every id the policy's gives (``hf.partner_tokenizer`` checks it:
  true within the Qwen2.5 family and in the tiny world). ``max_prompt`` (prefix + query + suffix widths)
  and ``max_new_tokens`` fix the shapes of its generation."""

  cfg: ModelConfig
  tokenizer: Any
  prompt: SimulatorPrompt
  piece_bytes: jax.Array  # [V] UTF-8 length of every token (zsjax.template.token_bytes)
  max_new_tokens: int
  prefix_width: int  # Lp, fixed so every batch has one shape
  query_width: int  # Q, the rollout's max_query_tokens
  sampling: Greedy | Sampling = Sampling(temperature=0.8)
  eos_ids: tuple[int, ...] = ()
  pad_id: int = 0
  # True (config.rollout.retokenize): what the reference tokenizes as one string is
  # tokenized on the host as one string, through a host callback each call: the
  # prompt around the decoded query, and the observation block (wrapper included)
  # around the post-processed text; False: both assembled in token space on device
  retokenize: bool = False
  text_width: int = 1024  # bytes of a question or answer (config.engine.max_text_bytes)
  # Built from the tokenizer when the engine is made (on the host, never in a trace):
  matcher: TagMatcher = dataclasses.field(init=False)  # the stop marker's automaton
  blank: np.ndarray = dataclasses.field(init=False)  # [V] bool: text is whitespace only
  newlines: np.ndarray = dataclasses.field(init=False)  # [V] newlines in the token's text
  newline_id: int = dataclasses.field(init=False)  # the token of "\n" (-1: none single)

  def __post_init__(self):
    pieces = token_bytes(self.tokenizer, self.cfg.vocab_size)
    object.__setattr__(self, "matcher", build_tag_matcher(pieces=pieces,
                                                          tags=(self.prompt.stop_marker,)))
    object.__setattr__(self, "blank", np.asarray([bool(p) and not p.strip() for p in pieces]))
    object.__setattr__(self, "newlines", np.asarray([p.count(b"\n") for p in pieces], np.int32))
    newline = self.tokenizer.encode("\n", add_special_tokens=False)
    object.__setattr__(self, "newline_id", newline[0] if len(newline) == 1 else -1)

  def _encode(self, text: str) -> list[int]:
    return self.tokenizer.encode(text, add_special_tokens=False)

  @functools.cached_property
  def suffix_width(self) -> int:
    return max(len(self._encode(self.prompt.split("q", "a", noisy, self.tokenizer)[1]))
               for noisy in (0, 1))

  @property
  def max_prompt(self) -> int:
    return self.prefix_width + self.query_width + self.suffix_width

  # -- host side

  def inputs(self, questions: Sequence[str], answers: Sequence[str],
             samples_per_prompt: int = 1) -> SimulatorInputs:
    """The per-row prompt pieces; row ``g * n + j`` is sample j of question g."""
    rows = [i for i in range(len(questions)) for _ in range(samples_per_prompt)]
    prefixes, suffixes = [[], []], []
    for noisy in (0, 1):
      for i in rows:
        prefixes[noisy].append(self._encode(
            self.prompt.split(questions[i], answers[i], bool(noisy), self.tokenizer)[0]))
      suffixes.append(self._encode(
          self.prompt.split(questions[0], answers[0], bool(noisy), self.tokenizer)[1]))
    every = prefixes[0] + prefixes[1]
    if min(len(r) for r in every) == 0:
      raise ValueError("SimulatorEngine.inputs: a simulator prefix tokenized to nothing.")
    longest = max(len(r) for r in every)
    if longest > self.prefix_width:
      raise ValueError(f"a simulator prefix has {longest} tokens, more than the fixed width "
                       f"{self.prefix_width} (config.simulator.max_prefix_tokens); raise it "
                       "or shorten the simulator template.")
    pre = [pad_rows(p, self.prefix_width, self.pad_id) for p in prefixes]
    suffix, suffix_lengths = pad_rows(suffixes, pad_id=self.pad_id)
    if self.retokenize:
      text, text_lengths = encode_texts([(questions[i], answers[i]) for i in rows],
                                        self.text_width, "config.engine.max_text_bytes")
    else:
      text, text_lengths = np.zeros((len(rows), 2, 1), np.uint8), np.zeros((len(rows), 2), np.int32)
    return SimulatorInputs(prefix=jnp.asarray(np.stack([p[0] for p in pre])),
                           prefix_lengths=jnp.asarray(np.stack([p[1] for p in pre])),
                           suffix=jnp.asarray(suffix), suffix_lengths=jnp.asarray(suffix_lengths),
                           text=jnp.asarray(text), text_lengths=jnp.asarray(text_lengths))

  @property
  def last_error(self) -> str:
    return ""  # an on-device engine has no call that can fail

  def row_problem(self, question: str, answer: str) -> str | None:
    """Why a row cannot go through ``inputs`` (its simulator prompt is wider than
    the fixed prefix width), or None."""
    for noisy in (False, True):
      n = len(self._encode(self.prompt.split(question, answer, noisy, self.tokenizer)[0]))
      if n > self.prefix_width:
        return (f"its simulator prompt is {n} tokens, more than "
                f"config.simulator.max_prefix_tokens={self.prefix_width}")
    return None

  def input_shardings(self, plan) -> SimulatorInputs:
    return SimulatorInputs(prefix=plan.rows(3, axis=1), prefix_lengths=plan.rows(2, axis=1),
                           suffix=plan.replicated(), suffix_lengths=plan.replicated(),
                           text=plan.rows(3), text_lengths=plan.rows(2))

  # -- device side

  def __call__(self, params, inputs: SimulatorInputs, query, query_lengths, active, noisy,
               rng) -> EngineOutput:
    """Documents for the rows in ``active``: ``query [B, Q]``, ``query_lengths [B]``,
    ``active`` / ``noisy [B]`` bool -> ``EngineOutput``."""
    width = self.max_prompt
    longest = inputs.prefix.shape[2] + query.shape[1] + inputs.suffix.shape[1]
    if longest > width:  # shapes are static: checked once, at trace time
      raise ValueError(
          f"SimulatorEngine: prefix {inputs.prefix.shape[2]} + query {query.shape[1]} + suffix "
          f"{inputs.suffix.shape[1]} = {longest} tokens exceed max_prompt={width}; build the "
          "engine with the widths of the batch (config.simulator.max_prefix_tokens, "
          "config.rollout.max_query_tokens).")
    prompt, prompt_lengths = self.assemble(inputs, query, query_lengths, noisy)
    if self.retokenize:
      prompt, prompt_lengths = self.host_prompt(inputs, query, query_lengths, noisy, active,
                                                prompt, prompt_lengths)
    b = query.shape[0]
    # No row searching (the final turn, or every row answered): skip the prefill too,
    # which costs about as much as a whole batch's documents at 0.1B scale. The
    # output is what generating for no row gives: nothing written.
    tokens, count, hit = jax.lax.cond(
        jnp.any(active), lambda: _generate(self, params, prompt, prompt_lengths, active, rng),
        lambda: (jnp.full((b, self.max_new_tokens), self.pad_id, jnp.int32),
                 jnp.zeros((b,), jnp.int32), jnp.zeros((b,), bool)))
    if self.retokenize:
      return self.host_observation(tokens, jnp.where(active, count, 0))
    marker_bytes = len(self.prompt.stop_marker)
    drop = jnp.where(hit, tokens_covering_tail(self.piece_bytes, tokens, count, count,
                                               marker_bytes), 0)
    lengths = jnp.where(active, count - drop, 0)
    # METHOD §3's post-processing, in token space: blank lines collapsed, then stripped
    tokens, lengths = collapse_blank_lines(tokens, lengths, jnp.asarray(self.blank),
                                           jnp.asarray(self.newlines), self.newline_id,
                                           self.pad_id)
    tokens, lengths = strip_blank(tokens, lengths, jnp.asarray(self.blank), self.pad_id)
    return EngineOutput(tokens, lengths, jnp.zeros((query.shape[0],), bool))

  # -- retokenize: host callbacks

  @property
  def observation_width(self) -> int:
    """The width of a host-tokenized observation block: the budget, the wrapper
    and room for a tokenization of the decoded text longer than the sampled one."""
    wrapper = len(self._encode(information_block("")))
    return self.max_new_tokens + wrapper + 16

  def _host_prompt(self, text, text_lengths, query, query_lengths, noisy, active):
    b, width = query.shape[0], self.max_prompt
    ids = np.full((b, width), self.pad_id, np.int32)
    lengths = np.full((b,), -1, np.int32)  # -1: keep the device's assembly
    for i in range(b):
      if not active[i]:
        continue
      words = self.tokenizer.decode(query[i, :query_lengths[i]].tolist(),
                                    skip_special_tokens=True)
      row = self._encode(self.prompt.render(words, decode_text(text, text_lengths, i, 0),
                                            decode_text(text, text_lengths, i, 1),
                                            bool(noisy[i]), self.tokenizer))
      if len(row) <= width:
        ids[i, :len(row)], lengths[i] = row, len(row)
    return ids, lengths

  def host_prompt(self, inputs, query, query_lengths, noisy, active, assembled, assembled_lengths):
    """Each active row's prompt tokenized as one string (``SimulatorPrompt.render``
    of the decoded query), as the reference does; a row whose string would not fit
    ``max_prompt`` keeps its device assembly."""
    b, width = query.shape[0], self.max_prompt
    shapes = (jax.ShapeDtypeStruct((b, width), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.int32))
    ids, lengths = io_callback(self._host_prompt, shapes, inputs.text, inputs.text_lengths,
                               query, query_lengths, noisy, active, ordered=True)
    ok = lengths >= 0
    return (jnp.where(ok[:, None], ids, assembled), jnp.where(ok, lengths, assembled_lengths))

  def _host_observation(self, tokens, count):
    b, width = tokens.shape[0], self.observation_width
    ids = np.full((b, width), self.pad_id, np.int32)
    lengths = np.zeros((b,), np.int32)
    for i in range(b):
      if count[i] <= 0:
        continue
      text = self.tokenizer.decode(tokens[i, :count[i]].tolist(), skip_special_tokens=True)
      row = self._encode(information_block(reference_text(text, self.prompt.top_k)))[:width]
      ids[i, :len(row)], lengths[i] = row, len(row)
    return ids, lengths

  def host_observation(self, tokens, count) -> EngineOutput:
    """Each row's observation block as the reference makes it: the generated text
    decoded, post-processed (``reference_text``) and wrapped
    (``template.information_block``), tokenized as one string."""
    b, width = tokens.shape[0], self.observation_width
    shapes = (jax.ShapeDtypeStruct((b, width), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.int32))
    ids, lengths = io_callback(self._host_observation, shapes, tokens, count, ordered=True)
    return EngineOutput(ids, lengths, jnp.zeros((b,), bool), wrapped=True)

  def assemble(self, inputs: SimulatorInputs, query, query_lengths, noisy):
    """Each row's prompt ids, ``([B, max_prompt], lengths [B])``: the token form of
    ``SimulatorPrompt.render`` (the query's outer whitespace-only tokens dropped;
    the prefix ends before the space that the query's first token carries)."""
    query, query_lengths = strip_blank(query, query_lengths, jnp.asarray(self.blank),
                                       self.pad_id)
    return _assemble_prompt(inputs, query, query_lengths, noisy, self.max_prompt, self.pad_id)


def collapse_blank_lines(tokens, lengths, blank, newlines, newline_id: int, pad_id: int):
  """Each run of whitespace-only tokens that holds two or more newlines becomes one
  newline token (blank lines collapsed, as ``parse_documents`` does on text):
  ``tokens [B, D]``, ``lengths [B]``, ``blank`` / ``newlines [V]`` -> same shapes.
  A tokenizer without a one-token newline (``newline_id`` -1) is left as is."""
  if newline_id < 0:
    return tokens, lengths
  b, width = tokens.shape
  position = jnp.arange(width)[None, :]
  valid = position < lengths[:, None]
  is_blank = blank[tokens] & valid  # [B, D]
  starts = is_blank & ~jnp.pad(is_blank, ((0, 0), (1, 0)))[:, :-1]  # first token of a run
  run = jnp.where(is_blank, jnp.cumsum(starts, axis=1), 0)  # [B, D] 1.. for runs, 0 else
  segment = (jnp.arange(b)[:, None] * (width + 1) + run).ravel()
  totals = jax.ops.segment_sum(jnp.where(is_blank, newlines[tokens], 0).ravel(), segment,
                               num_segments=b * (width + 1)).reshape(b, width + 1)
  collapse = is_blank & (jnp.take_along_axis(totals, run, axis=1) >= 2)
  keep = valid & (~collapse | starts)
  tokens = jnp.where(collapse & starts, newline_id, tokens)
  target = jnp.where(keep, jnp.cumsum(keep, axis=1) - 1, width)  # kept tokens move left
  out = jnp.full_like(tokens, pad_id).at[jnp.arange(b)[:, None], target].set(tokens, mode="drop")
  return out, keep.sum(axis=1).astype(lengths.dtype)


def strip_blank(tokens, lengths, blank, pad_id: int):
  """Drops the whitespace-only tokens at both ends of each row: ``tokens [B, Q]``,
  ``lengths [B]``, ``blank [V]`` -> ``(tokens [B, Q], lengths [B])``."""
  width = tokens.shape[1]
  position = jnp.arange(width)[None, :]
  is_blank = blank[tokens] & (position < lengths[:, None])  # [B, Q]
  lead = jnp.sum(jnp.cumprod(is_blank.astype(jnp.int32), axis=1), axis=1)  # [B]
  back = jnp.clip(lengths[:, None] - 1 - position, 0, width - 1)  # last token first
  tail_blank = jnp.take_along_axis(is_blank, back, axis=1) & (position < lengths[:, None])
  trail = jnp.sum(jnp.cumprod(tail_blank.astype(jnp.int32), axis=1), axis=1)
  kept = jnp.maximum(lengths - lead - trail, 0)
  return gather_span(tokens, lead, kept, width, pad_id), kept


def _assemble_prompt(inputs: SimulatorInputs, query, query_lengths, noisy, width: int,
                     pad_id: int):
  """``prefix[noisy] + query + suffix[noisy]`` per row: ``([B, width], lengths [B])``."""
  kind = noisy.astype(jnp.int32)  # 0 useful, 1 noisy
  prefix = jnp.where(kind[:, None] == 1, inputs.prefix[1], inputs.prefix[0])
  prefix_len = jnp.where(kind == 1, inputs.prefix_lengths[1], inputs.prefix_lengths[0])
  suffix = inputs.suffix[kind]  # [B, Ls]
  suffix_len = inputs.suffix_lengths[kind]
  return concat_ragged([(prefix, prefix_len), (query, query_lengths), (suffix, suffix_len)],
                       width, pad_id)


@flax.struct.dataclass
class _GenerationState:
  i: jax.Array  # [] tokens generated so far (all rows)
  cache: Any  # the simulator's KV cache
  last_logits: jax.Array  # [B, V]
  live: jax.Array  # [B] still generating
  count: jax.Array  # [B] tokens written
  matcher_state: jax.Array  # [B] stop-marker automaton
  tokens: jax.Array  # [B, D]
  hit_marker: jax.Array  # [B] stopped at the stop marker


def _generate(engine: SimulatorEngine, params, prompt, prompt_lengths, active, rng):
  """Prefills ``prompt`` and samples until EOS, the stop marker or the budget."""
  model = Transformer(engine.cfg)
  matcher = engine.matcher
  b, width = prompt.shape
  eos = jnp.asarray(engine.eos_ids or (-1,), jnp.int32)
  cache = init_cache(engine.cfg, b, width + engine.max_new_tokens)
  segment = (jnp.arange(width)[None, :] < prompt_lengths[:, None]).astype(jnp.int32)
  logits, cache = model.apply({"params": params}, prompt, segment_ids=segment, cache=cache,
                              logits_at=jnp.maximum(prompt_lengths - 1, 0))  # last position's
  last = logits[:, 0]

  def step(s: _GenerationState) -> _GenerationState:
    token, _ = sample(engine.sampling, s.last_logits, jax.random.fold_in(rng, s.i),
                      position=jnp.full((b,), s.i))
    ended = jnp.isin(token, eos)
    write = s.live & ~ended
    written = jnp.where(write, token, engine.pad_id)
    matcher_state, done = matcher.step(s.matcher_state, written)
    marker = write & (done != 0)
    logits, cache = model.apply({"params": params}, token[:, None],
                                segment_ids=write[:, None].astype(jnp.int32), cache=s.cache)
    return _GenerationState(
        i=s.i + 1, cache=cache, last_logits=jnp.where(write[:, None], logits[:, 0], s.last_logits),
        live=s.live & ~ended & ~marker, count=s.count + write, matcher_state=matcher_state,
        tokens=s.tokens.at[:, s.i].set(written), hit_marker=s.hit_marker | marker)

  zeros = jnp.zeros((b,), jnp.int32)
  state = _GenerationState(
      i=jnp.int32(0), cache=cache, last_logits=last, live=active, count=zeros,
      matcher_state=zeros, tokens=jnp.full((b, engine.max_new_tokens), engine.pad_id, jnp.int32),
      hit_marker=jnp.zeros((b,), bool))
  state = jax.lax.while_loop(lambda s: (s.i < engine.max_new_tokens) & jnp.any(s.live), step,
                             state)
  return state.tokens, state.count, state.hit_marker


def simulator_sampling(temperature: float, method: str = "gumbel", greedy: bool = False,
                       top_p: float = 1.0) -> Greedy | Sampling:
  """How a simulator draws its documents: greedy at temperature 0 (or when
  ``greedy``: evaluation), else at ``temperature`` and ``top_p`` with ``method``."""
  if greedy or temperature <= 0:
    return Greedy()
  return Sampling(temperature=temperature, top_p=top_p, method=method)


def engine_from_config(config, tokenizer, *, cfg: ModelConfig, piece_bytes, eos_ids, pad_id: int,
                       query_width: int, greedy: bool = False) -> SimulatorEngine:
  """The on-device engine of a config: ``config.simulator`` (``template``,
  ``max_prefix_tokens``, ``max_new_tokens``, ``temperature``: 0 = greedy;
  ``top_p``; ``sampling_method``, ``zsjax.sampling.Sampling.method``) and
  ``config.engine.top_k``. ``greedy`` overrides the temperature (evaluation)."""
  sim = config.simulator
  sampling = simulator_sampling(sim.temperature, sim.sampling_method, greedy, sim.top_p)
  return SimulatorEngine(
      cfg=cfg, tokenizer=tokenizer,
      prompt=SimulatorPrompt.from_config(sim.template, config.engine.top_k, sim.chat_template),
      piece_bytes=piece_bytes, max_new_tokens=sim.max_new_tokens,
      prefix_width=sim.max_prefix_tokens, query_width=query_width, sampling=sampling,
      eos_ids=tuple(eos_ids), pad_id=pad_id, retokenize=config.rollout.retokenize,
      text_width=config.engine.max_text_bytes)


__all__ = ["DEFAULT_TEMPLATE", "ZEROSEARCH_TEMPLATE", "TEMPLATES", "named_template",
           "reference_text",
           "SimulatorPrompt", "policy_query", "strip_blank",
           "collapse_blank_lines",
           "parse_documents", "SimulatorInputs",
           "SimulatorEngine", "simulator_sampling", "engine_from_config"]
