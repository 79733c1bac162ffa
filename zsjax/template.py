"""The policy's tagged template, and tag matching in token space.

The policy reasons in ``<think>…</think>``, may search with
``<search> query </search>``, receives documents in
``<information>…</information>`` and ends with ``<answer> … </answer>``
(METHOD.md §2). The wording here is our own.

Token-space matching
--------------------
Tags are ordinary text, several tokens long, and a tokenizer may merge a tag's
first or last characters with neighbouring text (``" </"``, ``">\\n"``). So tags
are matched on bytes, not on token ids: an Aho-Corasick automaton over bytes
recognises all tags at once, and ``TagMatcher`` lifts it to tokens by
precomputing, for every automaton state s and token id t,

  transitions[s, t]  the state after reading t's bytes from s,
  completed[s, t]    a bitmask of the tags whose last byte lies inside t.

Inside the jitted decode loop one gather per step then says whether the token
just sampled closed ``</search>`` or ``</answer>`` (or opened ``<search>``),
however the tokenizer split or merged the tag. Tables are ``[S, V]`` with S = 1 +
the total length of the tags (~35 states): ~21 MB of int32 for a 150k vocab.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections import deque
from pathlib import Path
from typing import NamedTuple, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

INSTRUCTION = (
    "Answer the question below. Each time you receive new information, reason about it "
    "inside <think> and </think>. When you lack some knowledge, look it up by writing a "
    "query between <search> and </search>; the results will come back between <information> "
    "and </information>. You may search as many times as you need. When you know the answer, "
    "write only the answer, with no explanation, between <answer> and </answer>, for example "
    "<answer> Lisbon </answer>.")

INVALID_ACTION_FEEDBACK = (
    "\nThat action was not valid. To search, put a query between <search> and </search>. To "
    "answer, put the answer between <answer> and </answer>. Try again.\n")

# The reference's policy prompt and feedback, exactly: Search-R1's `make_prefix`
# (template 'base') in scripts/data_process/nq_search.py, the prompt of the NQ +
# HotpotQA parquets ZeroSearch and Search-R1 train on (ZeroSearch's inference.py
# has the same text), and the invalid-action observation of
# llm_agent/generation.py (both repositories). "as your want" is theirs.
SEARCH_R1_INSTRUCTION = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first "
    "every time you get new information. After reasoning, if you find you lack some knowledge, "
    "you can call a search engine by <search> query </search> and it will return the top "
    "searched results between <information> and </information>. You can search as many times "
    "as your want. If you find no further external knowledge needed, you can directly provide "
    "the answer inside <answer> and </answer>, without detailed illustrations. For example, "
    "<answer> Beijing </answer>.")
SEARCH_R1_FEEDBACK = (
    "\nMy previous action is invalid. If I want to search, I should put the query between "
    "<search> and </search>. If I want to give the final answer, I should put the answer "
    "between <answer> and </answer>. Let me try again.\n")


@dataclasses.dataclass(frozen=True)
class PromptStyle:
  """The policy's wording: its default instruction, what joins the instruction to
  ``Question: …`` and the invalid-action feedback (``config.data.prompt_style``)."""

  instruction: str
  separator: str
  feedback: str


PROMPT_STYLES = {
    "zsjax": PromptStyle(INSTRUCTION, "\n", INVALID_ACTION_FEEDBACK),  # our wording
    "search_r1": PromptStyle(SEARCH_R1_INSTRUCTION, " ", SEARCH_R1_FEEDBACK),  # the reference's
}


def prompt_style(name: str, field: str = "config.data.prompt_style") -> PromptStyle:
  if name not in PROMPT_STYLES:
    raise ValueError(f"{field}={name!r} is not one of {sorted(PROMPT_STYLES)}; 'search_r1' is "
                     "the prompt the released ZeroSearch / Search-R1 policies were trained on.")
  return PROMPT_STYLES[name]


INFORMATION_OPEN, INFORMATION_CLOSE = "<information>", "</information>"

# Tags tracked in token space; bit i of a ``completed`` mask is TAGS[i].
TAGS = ("<search>", "</search>", "<answer>", "</answer>")
SEARCH_OPEN, SEARCH_CLOSE, ANSWER_OPEN, ANSWER_CLOSE = (1 << i for i in range(len(TAGS)))
CLOSING = SEARCH_CLOSE | ANSWER_CLOSE  # a turn ends at the first of these

_ACTION = re.compile(r"<(search|answer)>(.*?)</\1>", re.DOTALL)


# ------------------------------------------------------------------------- text


def format_question(question: str) -> str:
  """Stripped, with a question mark appended when it has none."""
  question = question.strip()
  return question if question.endswith("?") else question + "?"


def instruction_of(style: str, instruction: str = "",
                   field: str = "config.data.prompt_style") -> str:
  """The policy's instruction: ``instruction``, or the style's when it is empty."""
  return instruction or prompt_style(style, field).instruction


def user_message(question: str, instruction: str = "", style: str = "zsjax") -> str:
  """``instruction`` (empty: the style's), the style's separator, then
  ``Question: <question>?`` and a newline. In style ``search_r1`` this is, character
  for character, the ``prompt`` of the reference's training parquet."""
  separator = prompt_style(style).separator
  return f"{instruction_of(style, instruction)}{separator}Question: {format_question(question)}\n"


def render_prompt(question: str, tokenizer=None, instruction: str = "",
                  use_chat_template: bool = True, style: str = "zsjax") -> str:
  """The policy's prompt; wrapped in the tokenizer's chat template (with the
  generation prompt, no system message: the reference's rl_dataset.py) when it has
  one, base models included."""
  message = user_message(question, instruction, style)
  if use_chat_template and tokenizer is not None and getattr(tokenizer, "chat_template", None):
    return tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                         add_generation_prompt=True)
  return message


PROMPT_FORMAT_FILE = "zsjax_prompt.json"


def save_prompt_format(directory, *, chat_template: bool, instruction: str,
                       style: str = "zsjax") -> None:
  """Records beside an exported policy how its prompts were rendered in training,
  so that evaluation renders them the same way (``load_prompt_format``)."""
  (Path(directory) / PROMPT_FORMAT_FILE).write_text(json.dumps(
      {"chat_template": bool(chat_template), "instruction": instruction, "style": style},
      indent=2) + "\n")


def load_prompt_format(directory) -> dict | None:
  """``{"chat_template": bool, "instruction": str, "style": str}`` of an exported
  policy (``style`` "zsjax" in files written before it was recorded), or None."""
  path = Path(directory) / PROMPT_FORMAT_FILE
  if not path.exists():
    return None
  return {"style": "zsjax", **json.loads(path.read_text())}


def render_documents(documents: Sequence[str]) -> str:
  return "\n".join(f"Doc {i + 1}: {doc.strip()}" for i, doc in enumerate(documents))


def render_observation(documents: Sequence[str]) -> str:
  """What is appended after a search: the documents inside information tags."""
  return information_block(render_documents(documents))


def information_block(text: str) -> str:
  """The observation of a search as the reference writes it (llm_agent/generation.py:
  ``f'\\n\\n<information>{result.strip()}</information>\\n\\n'``)."""
  return f"\n\n{INFORMATION_OPEN}{text.strip()}{INFORMATION_CLOSE}\n\n"


class Action(NamedTuple):
  kind: str  # "search" | "answer" | "invalid"
  content: str


def parse_action(turn: str) -> Action:
  """The first complete ``<search>…</search>`` or ``<answer>…</answer>`` of a turn
  decides; anything else is an invalid action."""
  match = _ACTION.search(turn)
  if match is None:
    return Action("invalid", "")
  return Action(match.group(1), match.group(2).strip())


def cut_after_first_close(turn: str) -> str:
  """A turn's text up to and including its first ``</search>`` or ``</answer>``
  (generation stops there; anything after it is discarded)."""
  ends = [turn.find(tag) + len(tag) for tag in ("</search>", "</answer>") if tag in turn]
  return turn[:min(ends)] if ends else turn


# --------------------------------------------------------- token-space matching


def build_automaton(tags: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """Aho-Corasick over bytes: ``delta [S, 256]`` next state, ``output [S]`` bitmask
  of the tags ending at each state (bit i = tags[i])."""
  for tag in tags:
    if not tag or not tag.isascii():
      raise ValueError(f"tag {tag!r} must be a non-empty ASCII string.")
  goto: list[dict[int, int]] = [{}]
  output = [0]
  for i, tag in enumerate(tags):
    state = 0
    for byte in tag.encode():
      if byte not in goto[state]:
        goto.append({})
        output.append(0)
        goto[state][byte] = len(goto) - 1
      state = goto[state][byte]
    output[state] |= 1 << i
  num_states = len(goto)
  delta = np.zeros((num_states, 256), np.int32)
  fail = [0] * num_states
  queue = deque()
  for byte in range(256):
    if byte in goto[0]:
      delta[0, byte] = goto[0][byte]
      queue.append(goto[0][byte])
  while queue:  # breadth first: a state's fail link is resolved before its children
    state = queue.popleft()
    output[state] |= output[fail[state]]
    for byte in range(256):
      child = goto[state].get(byte)
      if child is None:
        delta[state, byte] = delta[fail[state], byte]
      else:
        fail[child] = delta[fail[state], byte]
        delta[state, byte] = child
        queue.append(child)
  return delta, np.asarray(output, np.int32)


@functools.lru_cache(maxsize=4)
def token_bytes(tokenizer, vocab_size: int | None = None) -> tuple[bytes, ...]:
  """The UTF-8 bytes of every token id's text (ids the tokenizer lacks: empty).
  Exact for ASCII tags with byte-level BPE tokenizers (Qwen2, Llama 3): a token
  holding part of a multi-byte character decodes to U+FFFD, which no tag contains.
  Cached: a job's static tokens, tag matcher and simulator engine all read it, and
  decoding a 150k vocabulary one id at a time takes about a second."""
  size = vocab_size or len(tokenizer)
  known = min(size, len(tokenizer))
  texts = tokenizer.batch_decode([[i] for i in range(known)], skip_special_tokens=False,
                                 clean_up_tokenization_spaces=False)
  return tuple(t.encode("utf-8") for t in texts) + (b"",) * (size - known)


@flax.struct.dataclass
class TagMatcher:
  """Per-token automaton tables; see the module docstring. A pytree (jit argument)."""

  transitions: jax.Array  # [S, V] int32
  completed: jax.Array  # [S, V] int32 bitmask over TAGS
  tags: tuple[str, ...] = flax.struct.field(pytree_node=False, default=TAGS)

  def step(self, state: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``state [B]``, ``tokens [B]`` -> new state ``[B]``, completed-tag mask ``[B]``."""
    return self.transitions[state, tokens], self.completed[state, tokens]

  def scan(self, tokens: jax.Array, state: jax.Array | None = None) -> jax.Array:
    """Completed-tag masks ``[B, L]`` for a token block ``[B, L]`` read left to right."""
    state = jnp.zeros(tokens.shape[:1], jnp.int32) if state is None else state

    def body(state, column):
      state, done = self.step(state, column)
      return state, done

    _, done = jax.lax.scan(body, state, tokens.T)
    return done.T


def build_tag_matcher(tokenizer=None, *, vocab_size: int | None = None,
                      pieces: Sequence[bytes] | None = None, tags: Sequence[str] = TAGS
                      ) -> TagMatcher:
  """Tables for ``tags`` over a tokenizer's vocabulary (or explicit byte ``pieces``
  per id). ``vocab_size`` pads to the model's (often larger) vocabulary."""
  if pieces is None:
    if tokenizer is None:
      raise ValueError("build_tag_matcher needs a tokenizer or the byte pieces of each id.")
    pieces = token_bytes(tokenizer, vocab_size)
  delta, output = build_automaton(tags)
  num_states, vocab = delta.shape[0], len(pieces)
  transitions = np.empty((num_states, vocab), np.int32)
  completed = np.zeros((num_states, vocab), np.int32)
  by_length: dict[int, list[int]] = {}
  for token_id, piece in enumerate(pieces):
    by_length.setdefault(len(piece), []).append(token_id)
  for length, ids in by_length.items():  # all tokens of one length at once
    ids_array = np.asarray(ids)
    state = np.repeat(np.arange(num_states, dtype=np.int32)[:, None], len(ids), axis=1)
    hits = np.zeros_like(state)
    if length:
      data = np.frombuffer(b"".join(pieces[i] for i in ids), np.uint8).reshape(len(ids), length)
      for j in range(length):
        state = delta[state, data[None, :, j]]
        hits |= output[state]
    transitions[:, ids_array] = state
    completed[:, ids_array] = hits
  return TagMatcher(transitions=jnp.asarray(transitions), completed=jnp.asarray(completed),
                    tags=tuple(tags))

