"""Search engines: the simulator's prompt, and the engines that run on the host.

* ``SimulatorPrompt``: the prompt that asks an LLM to act as a search engine and
  write useful or noisy documents (METHOD.md §3). The template is a config
  string, so the exact wording a released simulator was tuned on can be pasted
  in; the default is in our own words. The on-device simulator of the jitted
  rollout is fed this prompt split around the query (``split``).
* Host engines, called from jitted code through ``jax.experimental.io_callback``
  (``HostSearch``):
    - ``BM25Engine``: BM25 (the ``bm25s`` package) over a local corpus;
    - ``HttpSimulatorEngine``: an OpenAI-compatible completion server (e.g. a
      simulator served by sglang or vLLM). Every request has a timeout and a
      bounded number of retries; a call that still fails returns no documents
      and is counted, it never hangs training.

Shape legend: B batch, Q query tokens, D document tokens.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from zsjax.template import render_documents

DEFAULT_SIMULATOR_TEMPLATE = (
    "You act as a web search engine.\n"
    "Write five {quality} documents for the search query below.\n"
    'Context: the user is working on the question "{question}", and its answer is {answer}.\n'
    "Each document should be about 30 words long and contain {quality} information.\n"
    "\n"
    "Query: {query}\n"
    "{Quality} Output:")

_DOC_MARKER = re.compile(r"Doc\s*(\d+)\s*:?", re.IGNORECASE)


# ------------------------------------------------------------------ the prompt


@dataclasses.dataclass(frozen=True)
class SimulatorPrompt:
  """Renders the simulator's prompt. Placeholders: ``{query}``, ``{question}``,
  ``{answer}`` (the first gold answer), ``{quality}`` / ``{Quality}`` (``useful``
  or ``noisy``, lower / capitalised)."""

  template: str = DEFAULT_SIMULATOR_TEMPLATE
  top_k: int = 5

  def __post_init__(self):
    if self.template.count("{query}") != 1:
      raise ValueError("SimulatorPrompt.template must contain '{query}' exactly once (found "
                       f"{self.template.count('{query}')}); the query is inserted there.")
    if "{quality}" not in self.template and "{Quality}" not in self.template:
      raise ValueError("SimulatorPrompt.template has no '{quality}' or '{Quality}' placeholder, "
                       "so useful and noisy calls would get the same prompt.")
    if self.top_k <= 0:
      raise ValueError(f"SimulatorPrompt.top_k={self.top_k} must be positive.")
    try:
      self.render("q", "question", "answer", noisy=False)
    except (KeyError, IndexError) as e:
      raise ValueError(f"SimulatorPrompt.template has an unknown placeholder {e}; use {{query}}, "
                       "{question}, {answer}, {quality}, {Quality} (double other braces).") from None

  def _fields(self, question: str, answer: str, noisy: bool) -> dict[str, str]:
    quality = "noisy" if noisy else "useful"
    return {"question": question.strip(), "answer": answer.strip(), "quality": quality,
            "Quality": quality.capitalize()}

  def render(self, query: str, question: str, answer: str, noisy: bool) -> str:
    return self.template.format(query=query.strip(), **self._fields(question, answer, noisy))

  def split(self, question: str, answer: str, noisy: bool) -> tuple[str, str]:
    """The prompt before and after the query, for assembly around query tokens."""
    marker = "\x00QUERY\x00"
    text = self.template.replace("{query}", marker).format(**self._fields(question, answer, noisy))
    prefix, suffix = text.split(marker)
    return prefix, suffix


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


# ---------------------------------------------------------------- host engines


@dataclasses.dataclass
class SearchRequest:
  """One search call: the query and, for a simulator, the trajectory's context."""

  query: str
  question: str = ""
  answer: str = ""
  noisy: bool = False
  row: int = -1  # the batch row that searched (HostSearch sets it)


@dataclasses.dataclass
class SearchResult:
  documents: list[list[str]]  # per request, at most top_k
  failed: list[bool]  # per request: gave up after retries (documents empty)


class HostEngine(Protocol):
  top_k: int

  def search(self, requests: Sequence[SearchRequest]) -> SearchResult: ...


class BM25Engine:
  """BM25 over a local corpus (``bm25s``); documents are returned as stored."""

  def __init__(self, corpus: Sequence[str], top_k: int = 5, k1: float = 1.5, b: float = 0.75):
    import bm25s

    if not corpus:
      raise ValueError("BM25Engine: the corpus is empty.")
    self.corpus = list(corpus)
    self.top_k = top_k
    self._bm25s = bm25s
    self._retriever = bm25s.BM25(k1=k1, b=b)
    self._retriever.index(bm25s.tokenize(self.corpus, show_progress=False), show_progress=False)
    self.stats = {"calls": 0, "queries": 0}

  @classmethod
  def from_jsonl(cls, path: str | Path, text_field: str = "contents", **kwargs) -> "BM25Engine":
    """A corpus file with one JSON object per line (Search-R1's ``contents`` field by
    default). A row without the field is an error naming the file, line and field."""
    path = Path(path)
    if not path.exists():
      raise FileNotFoundError(f"BM25 corpus {path} does not exist.")
    corpus = []
    with open(path, encoding="utf-8") as f:
      for line_no, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          row = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{line_no}: not valid JSON ({e}).") from None
        if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
          raise ValueError(f"{path}:{line_no}: no string field {text_field!r} (keys: "
                           f"{sorted(row) if isinstance(row, dict) else type(row).__name__}); "
                           "pass text_field= to name the document text field.")
        corpus.append(row[text_field])
    return cls(corpus, **kwargs)

  def search(self, requests: Sequence[SearchRequest]) -> SearchResult:
    self.stats["calls"] += 1
    self.stats["queries"] += len(requests)
    k = min(self.top_k, len(self.corpus))
    tokens = self._bm25s.tokenize([r.query for r in requests], show_progress=False)
    ids, scores = self._retriever.retrieve(tokens, k=k, show_progress=False)
    documents = [[self.corpus[int(i)] for i, s in zip(row, score_row) if s > 0]
                 for row, score_row in zip(ids, scores)]
    return SearchResult(documents, [False] * len(requests))


class HttpSimulatorEngine:
  """A simulator behind an OpenAI-compatible ``/v1/completions`` endpoint.

  One POST per call carries every prompt of the batch. Each attempt has
  ``timeout_s``; up to ``max_retries`` more attempts follow with a doubling
  ``backoff_s``. A call that still fails returns empty documents for every
  request, ``failed=True``, and increments ``stats["failures"]``."""

  def __init__(self, base_url: str, model: str, prompt: SimulatorPrompt = SimulatorPrompt(), *,
               timeout_s: float = 30.0, max_retries: int = 2, backoff_s: float = 1.0,
               max_tokens: int = 600, temperature: float = 0.8):
    if timeout_s <= 0 or max_retries < 0:
      raise ValueError(f"HttpSimulatorEngine: timeout_s={timeout_s} must be > 0 and "
                       f"max_retries={max_retries} >= 0 (a search must never wait forever).")
    self.url = base_url.rstrip("/") + "/v1/completions"
    self.model, self.prompt = model, prompt
    self.top_k = prompt.top_k
    self.timeout_s, self.max_retries, self.backoff_s = timeout_s, max_retries, backoff_s
    self.max_tokens, self.temperature = max_tokens, temperature
    self.stats = {"calls": 0, "queries": 0, "retries": 0, "failures": 0, "last_error": ""}

  def _post(self, payload: dict) -> dict:
    request = urllib.request.Request(self.url, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
      return json.loads(response.read())

  def search(self, requests: Sequence[SearchRequest]) -> SearchResult:
    self.stats["calls"] += 1
    self.stats["queries"] += len(requests)
    prompts = [self.prompt.render(r.query, r.question, r.answer, r.noisy) for r in requests]
    payload = {"model": self.model, "prompt": prompts, "max_tokens": self.max_tokens,
               "temperature": self.temperature}
    for attempt in range(self.max_retries + 1):
      try:
        body = self._post(payload)
        texts = [""] * len(prompts)
        for choice in body["choices"]:
          texts[int(choice.get("index", 0))] = choice["text"]
        return SearchResult([parse_documents(t, self.top_k) for t in texts], [False] * len(prompts))
      except (urllib.error.URLError, TimeoutError, OSError, ValueError, KeyError, TypeError) as e:
        self.stats["last_error"] = f"{type(e).__name__}: {e}"
        if attempt < self.max_retries:
          self.stats["retries"] += 1
          time.sleep(self.backoff_s * 2 ** attempt)
    self.stats["failures"] += 1
    return SearchResult([[] for _ in prompts], [True] * len(prompts))


def engine_from_config(engine, prompt: SimulatorPrompt = SimulatorPrompt()) -> HostEngine:
  """The host engine a config's ``engine`` section names: ``kind="bm25"`` (BM25 over
  ``corpus``) or ``kind="http"`` (``url``, ``model``, ``timeout_s``, ``max_retries``)."""
  if engine.kind == "bm25":
    if not engine.corpus:
      raise ValueError("config.engine.kind='bm25' needs config.engine.corpus (a jsonl file).")
    return BM25Engine.from_jsonl(engine.corpus, top_k=engine.top_k, text_field=engine.text_field)
  if engine.kind == "http":
    return HttpSimulatorEngine(engine.url, engine.model, prompt, timeout_s=engine.timeout_s,
                               max_retries=engine.max_retries)
  raise ValueError(f"config.engine.kind={engine.kind!r} is not a host engine; use 'bm25' or "
                   "'http'.")


# ------------------------------------------------------------- from jitted code


def document_tokens(tokenizer, documents: Sequence[str]) -> list[int]:
  """Token ids of documents as inserted into the policy's context: rendered
  ``Doc 1: …\nDoc 2: …`` (none for no documents)."""
  if not documents:
    return []
  return tokenizer.encode(render_documents(documents), add_special_tokens=False)


class HostSearch:
  """Calls a host engine from jitted code (``io_callback``) and returns the
  documents as tokens.

  ``set_context`` gives the questions and first gold answers of the batch about
  to be rolled out; the jitted side passes row ids, query tokens and the
  useful/noisy draw. Documents come back rendered ``Doc 1: …\\nDoc 2: …``,
  tokenized, cut to ``max_doc_tokens`` and right-padded with ``pad_id``."""

  def __init__(self, engine: HostEngine, tokenizer, max_doc_tokens: int, pad_id: int = 0):
    self.engine, self.tokenizer = engine, tokenizer
    self.max_doc_tokens, self.pad_id = max_doc_tokens, pad_id
    self.questions: list[str] = []
    self.answers: list[str] = []

  def set_context(self, questions: Sequence[str], answers: Sequence[str]) -> None:
    self.questions, self.answers = list(questions), list(answers)

  def _callback(self, row_ids, query_tokens, query_lengths, active, noisy):
    b = query_tokens.shape[0]
    tokens = np.full((b, self.max_doc_tokens), self.pad_id, np.int32)
    lengths = np.zeros((b,), np.int32)
    failed = np.zeros((b,), bool)
    rows = [i for i in range(b) if active[i]]
    if not rows:
      return tokens, lengths, failed
    requests = []
    for i in rows:
      r = int(row_ids[i])
      query = self.tokenizer.decode(query_tokens[i, :query_lengths[i]].tolist(),
                                    skip_special_tokens=True)
      requests.append(SearchRequest(query, self.questions[r] if r < len(self.questions) else "",
                                    self.answers[r] if r < len(self.answers) else "",
                                    bool(noisy[i]), row=i))
    result = self.engine.search(requests)
    for i, docs, fail in zip(rows, result.documents, result.failed):
      ids = document_tokens(self.tokenizer, docs)[:self.max_doc_tokens]
      tokens[i, :len(ids)] = ids
      lengths[i] = len(ids)
      failed[i] = fail
    return tokens, lengths, failed

  def __call__(self, row_ids, query_tokens, query_lengths, active, noisy):
    """``row_ids [B]``, ``query_tokens [B, Q]``, ``query_lengths [B]``, ``active [B]``,
    ``noisy [B]`` -> ``doc_tokens [B, D]``, ``doc_lengths [B]``, ``failed [B]``."""
    b = query_tokens.shape[0]
    shapes = (jax.ShapeDtypeStruct((b, self.max_doc_tokens), jnp.int32),
              jax.ShapeDtypeStruct((b,), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.bool_))
    return io_callback(self._callback, shapes, row_ids, query_tokens,
                                        query_lengths, active, noisy, ordered=True)
