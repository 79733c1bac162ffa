"""Search engines that run on the host, and the bridge from jitted code.

* Host engines, called from jitted code through ``jax.experimental.io_callback``
  (``HostSearch``):
    - ``BM25Engine``: BM25 (the ``bm25s`` package) over a local corpus;
    - ``HttpSimulatorEngine``: an OpenAI-compatible completion server (e.g. a
      simulator served by sglang or vLLM). Its settings are checked and one
      test call made before any work (``check_engine_config``,
      ``health_check``); every attempt has a wall-clock deadline and a call a
      bounded number of retries, so a call that still fails returns no
      documents and is counted, it never hangs training. Its prompt is
      ``zsjax.simulator.SimulatorPrompt``, the on-device simulator's;
    - ``RetrieverEngine``: a Search-R1 retrieval server (``POST /retrieve``; the
      e5 + wiki-18 server of the reference), its documents formatted as the
      reference's client formats them, with the same deadlines, retries,
      health check and failure accounting (``HttpClient``).

A failing engine is loud: RL reports the share of failed search calls per step
(``rollout/failed_share``), prints it when it is not zero and stops after
``max_failed_steps`` steps in a row above ``max_failed_share``; evaluation
reports it per set and exits non-zero above it (``failure_limits``).

Shape legend: B batch, Q query tokens, D document tokens.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import http.client
import json
import logging
import socket
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import flax.struct
from jax.experimental import io_callback

from zsjax import data as data_lib
from zsjax import hf, simulator
from zsjax.engine import EngineOutput, decode_text, encode_texts
from zsjax.simulator import SimulatorPrompt, parse_documents, reference_text
from zsjax.template import information_block, render_documents

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
  # per request, the text the reference would put inside <information> (a served
  # simulator's post-processed output); None: the documents rendered
  texts: list[str] | None = None


class HostEngine(Protocol):
  top_k: int
  # Whether search() reads each request's question and answer (a simulator's prompt
  # does; a retriever does not). HostSearch ships them into the jitted call only
  # when it does; an engine without the attribute counts as reading them.
  reads_context: bool

  def search(self, requests: Sequence[SearchRequest]) -> SearchResult: ...


class BM25Engine:
  """BM25 over a local corpus (``bm25s``); documents are returned as stored."""

  reads_context = False  # the query alone

  def __init__(self, corpus: Sequence[str], top_k: int = 5, k1: float = 1.5, b: float = 0.75,
               source: str = "the corpus"):
    import bm25s

    # bm25s sets its logger to DEBUG on import; follow the application's level instead
    logging.getLogger("bm25s").setLevel(logging.getLogger().getEffectiveLevel())
    if not corpus:
      raise ValueError(f"BM25Engine: {source} holds no documents; give a corpus with one JSON "
                       "object per line (engine.corpus, its text in engine.text_field).")
    self.corpus = list(corpus)
    self.top_k = top_k
    self._bm25s = bm25s
    self._retriever = bm25s.BM25(k1=k1, b=b)
    tokens = bm25s.tokenize(self.corpus, show_progress=False)
    if not tokens.vocab:  # empty or stop-word-only documents: bm25s fails on max() of nothing
      raise ValueError(f"BM25Engine: {source} ({len(self.corpus)} documents) has no word to "
                       "index: every document is empty or only stop words. Check "
                       "engine.text_field names the documents' text.")
    self._retriever.index(tokens, show_progress=False)
    self.stats = {"calls": 0, "queries": 0}

  @classmethod
  def from_jsonl(cls, path: str | Path, text_field: str = "contents", **kwargs) -> "BM25Engine":
    """A corpus file with one JSON object per line (Search-R1's ``contents`` field by
    default). A row without the field is an error naming the file, line and field."""
    path = Path(path)
    if not path.exists():
      raise FileNotFoundError(f"BM25 corpus {path} does not exist.")
    corpus = []
    for line_no, line in data_lib.text_lines(path):  # UTF-8, gzip or not, line by line
      if isinstance(line, data_lib.DataError):
        raise ValueError(f"{path}:{line_no}: {line}. A corpus line is a document: "
                         "none is dropped.") from None
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
    return cls(corpus, source=str(path), **kwargs)

  def search(self, requests: Sequence[SearchRequest]) -> SearchResult:
    self.stats["calls"] += 1
    self.stats["queries"] += len(requests)
    k = min(self.top_k, len(self.corpus))
    tokens = self._bm25s.tokenize([r.query for r in requests], show_progress=False)
    ids, scores = self._retriever.retrieve(tokens, k=k, show_progress=False)
    documents = [[self.corpus[int(i)] for i, s in zip(row, score_row) if s > 0]
                 for row, score_row in zip(ids, scores)]
    return SearchResult(documents, [False] * len(requests))


def _console(message: str) -> None:
  from zsjax.metrics import console  # (metrics imports jax; this module is imported early)
  console(message)


class EngineError(RuntimeError):
  """A search engine that cannot serve; the message names it, the error and the fix."""


HOST_ENGINES = ("bm25", "http", "retriever")


def failure_limits(engine) -> tuple[float, int]:
  """``(max_failed_share, max_failed_steps)`` of an engine config section: a step (or
  an evaluation set) whose share of failed search calls is above the share counts as
  failing; RL stops after that many failing steps in a row, evaluation at once."""
  return float(engine.max_failed_share), int(engine.max_failed_steps)


@dataclasses.dataclass
class FailingSteps:
  """RL's count of failing steps in a row (``failure_limits``), from which it stops."""

  share: float  # config.engine.max_failed_share
  steps: int  # config.engine.max_failed_steps
  failing: int = 0

  @classmethod
  def from_config(cls, engine) -> "FailingSteps":
    return cls(*failure_limits(engine))

  def observe(self, step: int, share: float, error: str, log=None) -> None:
    """Counts RL step ``step``, whose search calls failed at ``share`` (``error``
    the engine's last), telling ``log`` when any failed; raises ``EngineError``
    at the ``steps``-th failing step in a row."""
    if share <= 0:
      self.failing = 0
      return
    error = error or "no error recorded"
    if log is not None:
      log(f"RL step {step}: {share:.0%} of search calls failed (last error: {error})")
    self.failing = self.failing + 1 if share > self.share else 0
    if self.failing >= self.steps:
      raise EngineError(
          f"RL step {step}: more than config.engine.max_failed_share={self.share:.0%} of search "
          f"calls failed for {self.failing} steps in a row (config.engine.max_failed_steps="
          f"{self.steps}); the engine's last error: {error}. Fix the engine (its URL: "
          "config.engine.url) and rerun the same command to resume")


def check_engine_config(engine) -> None:
  """Fails before any work on engine settings that could only fail later (or
  silently), naming the field, the value and the fix."""
  if engine.kind not in ("simulator", *HOST_ENGINES):
    raise ValueError(f"config.engine.kind={engine.kind!r} is not one of "
                     f"{('simulator', *HOST_ENGINES)}.")
  share, steps = failure_limits(engine)
  if not 0.0 <= share <= 1.0:
    raise ValueError(f"config.engine.max_failed_share={share} must lie in [0, 1] (the share of "
                     "failed search calls above which a step or an evaluation set fails).")
  if steps < 1:
    raise ValueError(f"config.engine.max_failed_steps={steps} must be >= 1 (failing steps in a "
                     "row before RL stops).")
  if engine.kind not in ("http", "retriever"):
    return
  url = engine.url
  if not url:
    server = "simulator" if engine.kind == "http" else "retrieval"
    raise ValueError(f"config.engine.kind={engine.kind!r} but config.engine.url is empty: give "
                     f"the {server} server's base URL, e.g. --config.engine.url=http://127.0.0.1:"
                     "8000 (or use --config.engine.kind=simulator for the on-device simulator).")
  parts = urllib.parse.urlsplit(url)
  if parts.scheme not in ("http", "https") or not parts.hostname:
    raise ValueError(f"config.engine.url={url!r} is not an http(s) URL with a host; write the "
                     "server's base URL with its scheme, e.g. http://127.0.0.1:8000 (without "
                     "/v1/completions).")
  if engine.kind == "http" and not engine.model:
    raise ValueError("config.engine.kind='http' but config.engine.model is empty: give the "
                     "model name the server serves the simulator under (its --served-model-name).")
  if engine.timeout_s <= 0 or engine.max_retries < 0:
    raise ValueError(f"config.engine.timeout_s={engine.timeout_s} must be > 0 and "
                     f"config.engine.max_retries={engine.max_retries} >= 0 (a search must never "
                     "wait forever).")


class HttpClient:
  """POSTs of JSON with bounded time, shared by the served engines.

  ``timeout_s`` is a deadline on each attempt's whole exchange (connect, send,
  every byte of the answer; a server that trickles bytes is cut off at it), up to
  ``max_retries`` more attempts follow with a doubling ``backoff_s``, so a request
  ends within ``call_deadline_s``. A request that still fails gives None;
  ``stats`` counts calls, queries, retries and failures and keeps the last error.

  A server that stops answering is found out in one wave, not one deadline per
  request: once ``concurrency`` requests in a row (all of a call's, if fewer) have
  failed, the server counts as down and the call's other requests fail at once,
  unsent. (The first wave of a call completes before more requests are sent, so
  a server down from the start costs one request deadline, ``call_deadline_s``.) The next call first sends one request, one attempt: if it is answered
  the server is up again and the call goes on, else the whole call fails. (For
  an engine that sends one POST a call, or ``concurrency=1``, one request that
  spends its retries is enough: its next call starts with the probe.) While
  a call has been waiting longer than ``timeout_s``, a line every ``timeout_s``
  seconds says how long, how many requests are answered and the last error
  (``log``, the console by default)."""

  def __init__(self, url: str, *, timeout_s: float = 30.0, max_retries: int = 2,
               backoff_s: float = 1.0):
    if timeout_s <= 0 or max_retries < 0:
      raise ValueError(f"{type(self).__name__}: timeout_s={timeout_s} must be > 0 and "
                       f"max_retries={max_retries} >= 0 (a search must never wait forever).")
    self.url = url
    self.timeout_s, self.max_retries, self.backoff_s = timeout_s, max_retries, backoff_s
    self.stats = {"calls": 0, "queries": 0, "retries": 0, "failures": 0, "unsent": 0,
                  "last_error": ""}
    self._lock = threading.Lock()
    self.down = False  # the last requests failed in a row: probe before sending more
    self.log = _console

  @property
  def call_deadline_s(self) -> float:
    """The longest one request can take, retries and backoffs included (a
    completions call is one request; chat calls send theirs ``concurrency`` at a
    time: ``call_bound_s``)."""
    return (self.max_retries + 1) * self.timeout_s + self.backoff_s * (2 ** self.max_retries - 1)

  def call_bound_s(self, requests: int) -> float:
    """The longest a ``search`` of ``requests`` requests can take (one POST here; a
    server found down first gets a one-attempt probe)."""
    del requests
    return self.call_deadline_s + (self.timeout_s if self.down else 0.0)

  def _post(self, payload: dict, timeout_s: float) -> dict:
    """One POST whose whole exchange ends within ``timeout_s``: a timer shuts the
    socket down at the deadline, which ends any read in progress."""
    parts = urllib.parse.urlsplit(self.url)
    connection_type = (http.client.HTTPSConnection if parts.scheme == "https"
                       else http.client.HTTPConnection)
    connection = connection_type(parts.hostname, parts.port, timeout=timeout_s)
    expired = threading.Event()
    opened = []  # the socket, kept: http.client drops connection.sock once it has the headers

    def expire():
      expired.set()
      for sock in opened:
        try:
          sock.shutdown(socket.SHUT_RDWR)
        except OSError:
          pass

    timer = threading.Timer(timeout_s, expire)
    timer.daemon = True
    timer.start()
    try:
      connection.connect()
      opened.append(connection.sock)
      if expired.is_set():
        raise TimeoutError
      connection.request("POST", parts.path, body=json.dumps(payload).encode(),
                         headers={"Content-Type": "application/json"})
      response = connection.getresponse()
      body = response.read()
      if expired.is_set():
        raise TimeoutError
      if response.status != 200:
        raise EngineError(f"HTTP {response.status} {response.reason}: "
                          f"{body[:200].decode('utf-8', 'replace')!r}")
      return json.loads(body)
    except (OSError, http.client.HTTPException) as e:
      if expired.is_set():
        raise TimeoutError(f"no complete answer within config.engine.timeout_s={timeout_s:.3g} "
                           "s") from None
      raise e
    finally:
      timer.cancel()
      connection.close()

  def _count(self, key: str, error: str | None = None) -> None:
    with self._lock:  # chat requests run in worker threads
      self.stats[key] += 1
      if error is not None:
        self.stats["last_error"] = error

  def _with_retries(self, payload: dict, read, attempts: int | None = None) -> list[str] | None:
    """``read(response body)`` after at most ``attempts`` (default ``max_retries + 1``)
    attempts (each within ``timeout_s``, with doubling backoffs between them), or None."""
    attempts = self.max_retries + 1 if attempts is None else attempts
    for attempt in range(attempts):
      try:
        return read(self._post(payload, self.timeout_s))
      except (OSError, http.client.HTTPException, EngineError, ValueError, KeyError, TypeError,
              IndexError, AttributeError) as e:
        error = f"{type(e).__name__}: {e}"
        if attempt < attempts - 1:
          self._count("retries", error)
          time.sleep(self.backoff_s * 2 ** attempt)
        else:
          self._count("failures", error)
    return None

  def _send_all(self, items: Sequence, send, workers: int = 1) -> list:
    """``send(item, attempts)`` (a result or None) for every item, ``workers`` at a
    time, with the down-server rule of the class docstring; None for each item
    that failed or was not sent."""
    results: list = [None] * len(items)
    if not items:
      return results
    answered, failed_in_a_row = [0], [0]
    threshold = max(1, min(workers, len(items)))

    def one(i, attempts=None):
      if self.down and attempts is None:  # found down during this call: fail unsent
        with self._lock:
          self.stats["failures"] += 1
          self.stats["unsent"] += 1
        return None
      out = send(items[i], self.max_retries + 1 if attempts is None else attempts)
      with self._lock:
        if out is None:
          failed_in_a_row[0] += 1
          if failed_in_a_row[0] >= threshold:
            self.down = True
        else:
          failed_in_a_row[0] = 0
          answered[0] += 1
      return out

    with self._progress(len(items), answered):
      start = 0
      if self.down:  # the last call found the server down: one request, one attempt
        results[0] = one(0, attempts=1)
        if results[0] is None:
          for i in range(1, len(items)):
            results[i] = one(i)
          return results
        self.down, start = False, 1
      rest = list(range(start, len(items)))
      if workers <= 1 or len(rest) <= 1:
        for i in rest:
          results[i] = one(i)
      else:
        # the first wave completes before more are sent: a server that fails all of it
        # is down, and nothing more waits out a deadline in this call
        with concurrent.futures.ThreadPoolExecutor(min(workers, len(rest))) as pool:
          for wave in (rest[:workers], rest[workers:]):
            for i, out in zip(wave, pool.map(one, wave)):
              results[i] = out
    return results

  @contextlib.contextmanager
  def _progress(self, requests: int, answered: list):
    """A line every ``timeout_s`` seconds while the body (one call) still runs."""
    done, started = threading.Event(), time.perf_counter()

    def report():
      while not done.wait(self.timeout_s):
        with self._lock:
          error = self.stats["last_error"] or "none yet"
        self.log(f"search engine at {self.url}: a call of {requests} requests has waited "
                 f"{time.perf_counter() - started:.0f} s; {answered[0]} answered so far "
                 f"(last error: {error}). It ends within {self.call_bound_s(requests):.0f} s.")

    watcher = threading.Thread(target=report, daemon=True)
    watcher.start()
    try:
      yield
    finally:
      done.set()

  def _start_call(self, requests: int) -> None:
    with self._lock:
      self.stats["calls"] += 1
      self.stats["queries"] += requests

  def health_check(self) -> None:
    """One search call (with its retries) before any work: raises ``EngineError``
    with the URL, the last error and the fix when the server cannot answer it."""
    failures = self.stats["failures"]
    result = self.search([SearchRequest("health check", "health check", "ok")])
    for key in ("calls", "queries"):
      self.stats[key] -= 1
    if self.stats["failures"] > failures or result.failed[0]:
      raise EngineError(
          f"the search engine at {self.url} ({self.describe()}) did not answer a test "
          f"request within {self.call_deadline_s:.3g} s: {self.stats['last_error']}. Start the "
          "server there, or fix config.engine.url / config.engine.model "
          "(config.engine.timeout_s and max_retries bound the wait).")
    self.stats["last_error"] = ""


class HttpSimulatorEngine(HttpClient):
  """A simulator behind an OpenAI-compatible endpoint: ``/v1/completions`` (one
  POST per call carries every prompt of the batch) or, for a prompt with
  ``chat=True``, ``/v1/chat/completions`` (one POST per request, sent
  concurrently, the server applying its own chat template; released simulators
  are chat models). Time is bounded as ``HttpClient`` says; a call ends within
  ``call_bound_s`` (chat requests go ``concurrency`` at a time)."""

  def __init__(self, base_url: str, model: str, prompt: SimulatorPrompt = SimulatorPrompt(), *,
               timeout_s: float = 30.0, max_retries: int = 2, backoff_s: float = 1.0,
               max_tokens: int = 600, temperature: float = 0.8, top_p: float = 1.0,
               concurrency: int = 16):
    super().__init__(base_url.rstrip("/") + ("/v1/chat/completions" if prompt.chat
                                             else "/v1/completions"),
                     timeout_s=timeout_s, max_retries=max_retries, backoff_s=backoff_s)
    self.model, self.prompt = model, prompt
    self.top_k = prompt.top_k
    self.max_tokens, self.temperature, self.top_p = max_tokens, temperature, top_p
    self.concurrency = concurrency

  def describe(self) -> str:
    return f"model {self.model!r}"

  def search(self, requests: Sequence[SearchRequest]) -> SearchResult:
    self._start_call(len(requests))
    settings = {"model": self.model, "max_tokens": self.max_tokens,
                "temperature": self.temperature, "top_p": self.top_p}
    if self.prompt.chat:
      def one(r, attempts):
        out = self._with_retries(
            {**settings, "messages": self.prompt.messages(r.query, r.question, r.answer,
                                                          r.noisy)},
            lambda body: [_generated(_choices(body, 1)[0]["message"]["content"])], attempts)
        return None if out is None else out[0]

      texts = self._send_all(list(requests), one, workers=self.concurrency)
    else:
      prompts = [self.prompt.render(r.query, r.question, r.answer, r.noisy) for r in requests]

      def read(body):
        choices = _choices(body, len(prompts))
        indices = [choice.get("index") for choice in choices]
        if sorted(i for i in indices if isinstance(i, int)) != list(range(len(prompts))):
          raise ValueError(f"the {len(prompts)} choices do not carry the indices 0..."
                           f"{len(prompts) - 1} once each (got {indices[:8]}); the server must "
                           "answer every prompt, in order or indexed")
        out = [""] * len(prompts)
        for choice in choices:
          out[choice["index"]] = _generated(choice["text"])
        return out

      sent = self._send_all([{**settings, "prompt": prompts}],
                            lambda payload, attempts: self._with_retries(payload, read, attempts))
      texts = sent[0] or [None] * len(prompts)
    return SearchResult([[] if t is None else parse_documents(t, self.top_k) for t in texts],
                        [t is None for t in texts],
                        ["" if t is None else reference_text(t, self.top_k) for t in texts])

  def call_bound_s(self, requests: int) -> float:
    """The longest a ``search`` of ``requests`` requests can take: one request's
    ``call_deadline_s``, times the waves of ``concurrency`` chat requests."""
    waves = -(-requests // self.concurrency) if self.prompt.chat else 1
    return waves * self.call_deadline_s + (self.timeout_s if self.down else 0.0)  # + probe


def retriever_document(item) -> str:
  """One document of a Search-R1 retrieval server's answer as the reference's
  client shows it (search_r1/llm_agent/generation.py, ``_passages2string``): its
  ``contents``' first line is the title, the rest the text, written
  ``(Title: <title>) <text>`` after ``Doc i``. ``item`` is ``{"document": {...},
  "score": s}`` (``return_scores``) or the corpus row itself."""
  row = item["document"] if isinstance(item, dict) and "document" in item else item
  contents = _text(row["contents"])
  title, _, text = contents.partition("\n")
  return f"(Title: {title}) {text}"


class RetrieverEngine(HttpClient):
  """A retrieval server that speaks Search-R1's contract (its
  search_r1/search/retrieval_server.py: the e5 + wiki-18 server users already run):
  one ``POST {url}/retrieve`` per call with ``{"queries": [...], "topk": k,
  "return_scores": true}``, answered ``{"result": [[{"document": {"contents": ...},
  "score": s}, ...] per query]}``. Documents read ``Doc i(Title: …) …`` as in the
  reference (``format_documents``). Deadlines, retries and failure accounting
  are ``HttpClient``'s, as for a served simulator."""

  reads_context = False  # the query alone

  def __init__(self, base_url: str, top_k: int = 3, *, timeout_s: float = 30.0,
               max_retries: int = 2, backoff_s: float = 1.0):
    super().__init__(base_url.rstrip("/") + "/retrieve", timeout_s=timeout_s,
                     max_retries=max_retries, backoff_s=backoff_s)
    self.top_k = top_k

  def describe(self) -> str:
    return "a Search-R1 retrieval server"

  def search(self, requests: Sequence[SearchRequest]) -> SearchResult:
    self._start_call(len(requests))
    queries = [r.query.strip() for r in requests]

    def read(body):
      result = body["result"]
      if not isinstance(result, list) or len(result) != len(queries):
        raise ValueError(f"'result' holds {len(result) if isinstance(result, list) else result!r}"
                         f" lists for {len(queries)} queries")
      empty = [i for i, docs in enumerate(result) if not isinstance(docs, list) or not docs]
      if empty:  # a retriever returns top-k for every query: nothing is a failed call
        raise ValueError(f"the server returned no documents for query {empty[0]} "
                         f"({queries[empty[0]]!r}) and {len(empty) - 1} more")
      return [[retriever_document(item) for item in docs[:self.top_k]] for docs in result]

    docs = self._send_all([{"queries": queries, "topk": self.top_k, "return_scores": True}],
                          lambda payload, attempts: self._with_retries(payload, read,
                                                                       attempts))[0]
    if docs is None:
      return SearchResult([[] for _ in requests], [True] * len(requests))
    return SearchResult(docs, [False] * len(requests))

  @staticmethod
  def format_documents(documents: Sequence[str]) -> str:
    """``Doc 1(Title: …) …\nDoc 2(Title: …) …``: no colon after the number."""
    return "\n".join(f"Doc {i + 1}{doc}" for i, doc in enumerate(documents))

  def call_bound_s(self, requests: int) -> float:
    return self.call_deadline_s + (self.timeout_s if self.down else 0.0)  # + the probe


def engine_from_config(engine, prompt: SimulatorPrompt = SimulatorPrompt(), *,
                       simulator=None, greedy: bool = False,
                       health_check: bool = True) -> HostEngine:
  """The host engine a config's ``engine`` section names: ``kind="bm25"`` (BM25 over
  ``corpus``) or ``kind="http"`` (``url``, ``model``, ``timeout_s``, ``max_retries``;
  checked with one test call unless ``health_check=False``). A served simulator
  samples as the config's ``simulator`` section says (``max_new_tokens``,
  ``temperature``, ``top_p``; temperature 0 when ``greedy``: evaluation); without
  that section, as the reference's trainer calls it (600 tokens, temperature 0.8)."""
  check_engine_config(engine)
  if engine.kind == "bm25":
    if not engine.corpus:
      raise ValueError("config.engine.kind='bm25' needs config.engine.corpus (a jsonl file).")
    return BM25Engine.from_jsonl(engine.corpus, top_k=engine.top_k, text_field=engine.text_field)
  if engine.kind == "http":
    sampling = {} if simulator is None else {
        "max_tokens": simulator.max_new_tokens, "top_p": simulator.top_p,
        "temperature": max(float(simulator.temperature), 0.0)}
    if greedy:
      sampling["temperature"] = 0.0
    served = HttpSimulatorEngine(engine.url, engine.model, prompt, timeout_s=engine.timeout_s,
                                 max_retries=engine.max_retries, backoff_s=engine.backoff_s,
                                 concurrency=engine.concurrency, **sampling)
  elif engine.kind == "retriever":
    served = RetrieverEngine(engine.url, engine.top_k, timeout_s=engine.timeout_s,
                             max_retries=engine.max_retries, backoff_s=engine.backoff_s)
  else:
    raise ValueError(f"config.engine.kind={engine.kind!r} is not a host engine; use one of "
                     f"{HOST_ENGINES}.")
  if health_check:
    served.health_check()
  return served


def _choices(body, expected: int) -> list:
  """A completion answer's ``choices``, which must hold ``expected`` entries (one
  per prompt): a 200 with fewer is a failed call, never a silent empty search."""
  choices = body["choices"]
  if not isinstance(choices, list) or len(choices) != expected:
    got = len(choices) if isinstance(choices, list) else repr(choices)
    raise ValueError(f"the server answered {got} choices for {expected} prompts")
  return choices


def _generated(value) -> str:
  """A completion's text, which must say something: an empty or blank answer is a
  failed call (retried, counted), not a search that found nothing."""
  text = _text(value)
  if not text.strip():
    raise ValueError("the server's completion is empty")
  return text


def _text(value) -> str:
  """A server's generated text, which must be a string."""
  if not isinstance(value, str):
    raise TypeError(f"the server's text is a {type(value).__name__}, not a string")
  return value


def failed_share(failed, searches) -> float:
  """Failed search calls over search calls (0 when there were none)."""
  total = float(np.sum(searches))
  return float(np.sum(failed)) / total if total else 0.0


def build_engine(config, tokenizer, static, rollout_config, plan, rng, *, greedy: bool = False,
                 prebuilt: HostEngine | None = None):
  """The rollout engine a config names (``config.engine.kind``):
  ``(engine, engine_state, engine_state_shardings)``. ``simulator``: the
  on-device ``zsjax.simulator.SimulatorEngine`` with the params of
  ``config.simulator`` (a checkpoint, or a random model drawn from ``rng``);
  ``bm25`` / ``http``: a ``HostSearch``. ``static``: the policy's
  ``zsjax.rollout.StaticTokens``; ``greedy``: the simulator decodes greedily
  (evaluation); ``prebuilt``: a host engine already built for ``bm25`` / ``http``."""

  if config.engine.kind == "simulator":
    # the simulator renders its prompt with its own tokenizer (its chat template),
    # which must give every id the policy's does (checked here, both paths named)
    sim_tokenizer = hf.partner_tokenizer(config.simulator.checkpoint, tokenizer,
                                         config.tokenizer or config.policy.checkpoint,
                                         what="simulator")
    sim_cfg, sim_params = hf.load_model(config.simulator, plan, rng, len(tokenizer),
                                        static.eos_ids, what="simulator")
    # The simulator stops at its own end tokens (an instruct simulator's <|im_end|>
    # is not a base policy's <|endoftext|>).
    engine = simulator.engine_from_config(
        config, sim_tokenizer, cfg=sim_cfg, piece_bytes=static.piece_bytes,
        eos_ids=hf.end_tokens(sim_cfg, sim_tokenizer),
        pad_id=static.pad_id, query_width=rollout_config.max_query_tokens, greedy=greedy)
    return engine, sim_params, plan.params(sim_cfg)
  prompt = SimulatorPrompt.from_config(config.simulator.template, config.engine.top_k,
                                       config.simulator.chat_template)
  engine = HostSearch(prebuilt or engine_from_config(config.engine, prompt,
                                                     simulator=config.simulator, greedy=greedy),
                      tokenizer, rollout_config.max_obs_tokens, pad_id=static.pad_id,
                      text_width=config.engine.max_text_bytes,
                      retokenize=config.rollout.retokenize)
  return engine, jnp.zeros((), jnp.int32), None


# ------------------------------------------------------------- from jitted code


def document_tokens(tokenizer, documents: Sequence[str], render=render_documents,
                    max_chars: int | None = None) -> list[int]:
  """Token ids of documents as inserted into the policy's context: ``render``ed
  (``Doc 1: …\nDoc 2: …``, or an engine's ``format_documents``; none for no
  documents), the text cut to its first ``max_chars`` characters first."""
  if not documents:
    return []
  return tokenizer.encode(render(documents)[:max_chars], add_special_tokens=False)


@flax.struct.dataclass
class HostInputs:
  """Each row's question and first gold answer as UTF-8 bytes, for a host engine
  (a simulator prompt needs them; BM25 does not)."""

  text: jax.Array  # [B, 2, W] uint8: question, answer; zero-padded
  lengths: jax.Array  # [B, 2] bytes of each


# Characters kept per token of an observation before it is tokenized and cut
# (``HostSearch``): far more than any vocabulary's tokens span.
HEAD_CHARS_PER_TOKEN = 64


class HostSearch:
  """A host engine as a rollout engine: ``inputs`` carries each row's question
  and answer into the jitted call, where ``io_callback`` hands them to the
  engine with the row's decoded query and useful/noisy draw. Documents come back
  rendered ``Doc 1: …\nDoc 2: …``, tokenized, cut to ``max_doc_tokens`` and
  right-padded with ``pad_id``."""

  def __init__(self, engine: HostEngine, tokenizer, max_doc_tokens: int, pad_id: int = 0,
               text_width: int = 1024, retokenize: bool = False):
    """``text_width``: the fixed byte width of each question and answer (one shape,
    one compile; ``config.engine.max_text_bytes``). ``retokenize``
    (``config.rollout.retokenize``): each observation block, wrapper included,
    tokenized as one string (``template.information_block`` of the engine's text,
    as the reference tokenizes it), at most ``max_doc_tokens`` long; else the
    documents alone, the rollout adding the wrapper's tokens."""
    self.engine, self.tokenizer, self.retokenize = engine, tokenizer, retokenize
    self.max_doc_tokens, self.pad_id = max_doc_tokens, pad_id
    # Only an engine that reads them gets the questions and answers: their bytes
    # reach the callback as arrays that XLA:CPU copies on its worker threads, and a
    # copy above ~100 KB (64 rows of 2 x 1024 bytes) waits for a thread that the
    # computation calling back holds: on a 1-core CPU the RL step against BM25 hung
    # (issue 27). A retriever gets zero-width text instead.
    self.reads_context = getattr(engine, "reads_context", True)
    self.text_width = text_width if self.reads_context else 0
    self.render = getattr(engine, "format_documents", render_documents)

  def inputs(self, questions: Sequence[str], answers: Sequence[str],
             samples_per_prompt: int = 1) -> HostInputs:
    rows = [(q, a) if self.reads_context else ("", "") for q, a in zip(questions, answers)
            for _ in range(samples_per_prompt)]
    text, lengths = encode_texts(rows, self.text_width,
                                 "the host engine's, config.engine.max_text_bytes")
    return HostInputs(text=jnp.asarray(text), lengths=jnp.asarray(lengths))

  def input_shardings(self, plan) -> HostInputs:
    return HostInputs(text=plan.rows(3), lengths=plan.rows(2))

  @property
  def last_error(self) -> str:
    """The host engine's last error ("" when none, or when it keeps no stats)."""
    return getattr(self.engine, "stats", {}).get("last_error", "")

  def row_problem(self, question: str, answer: str) -> str | None:
    """Why a row cannot go through ``inputs`` (its text is wider than the fixed
    width), or None. An engine that does not read them takes any."""
    if not self.reads_context:
      return None
    for field, text in (("question", question), ("golden_answers", answer)):
      size = len(text.encode("utf-8"))
      if size > self.text_width:
        return (f"field {field!r} is {size} UTF-8 bytes, more than the host engine's text width "
                f"{self.text_width} (config.engine.max_text_bytes)")
    return None

  def _callback(self, text, text_lengths, query_tokens, query_lengths, active, noisy):
    b = query_tokens.shape[0]
    tokens = np.full((b, self.max_doc_tokens), self.pad_id, np.int32)
    lengths = np.zeros((b,), np.int32)
    failed = np.zeros((b,), bool)
    rows = [i for i in range(b) if active[i]]
    if not rows:
      return tokens, lengths, failed

    requests = [SearchRequest(
        self.tokenizer.decode(query_tokens[i, :query_lengths[i]].tolist(),
                              skip_special_tokens=True),
        decode_text(text, text_lengths, i, 0), decode_text(text, text_lengths, i, 1),
        bool(noisy[i]), row=i) for i in rows]
    result = self.engine.search(requests)
    # A token spans at most a few dozen characters: cutting the text well past
    # max_doc_tokens of them leaves the kept tokens as they were and spares
    # tokenizing a huge document whole.
    head = self.max_doc_tokens * HEAD_CHARS_PER_TOKEN
    for k, (i, docs, fail) in enumerate(zip(rows, result.documents, result.failed)):
      if self.retokenize:  # the engine's own text when it has one (a served simulator's)
        text = result.texts[k] if result.texts is not None else self.render(docs)
        ids = self.tokenizer.encode(information_block(text)[:head], add_special_tokens=False)
      else:
        ids = document_tokens(self.tokenizer, docs, self.render, max_chars=head)
      ids = ids[:self.max_doc_tokens]
      tokens[i, :len(ids)] = ids
      lengths[i] = len(ids)
      failed[i] = fail
    return tokens, lengths, failed

  def __call__(self, engine_state, inputs: HostInputs, query_tokens, query_lengths, active, noisy,
               rng):
    """``query_tokens [B, Q]``, ``query_lengths [B]``, ``active [B]``, ``noisy [B]``
    -> ``EngineOutput`` (``tokens [B, D]``, ``lengths [B]``, ``failed [B]``)."""
    del engine_state, rng
    b = query_tokens.shape[0]
    shapes = (jax.ShapeDtypeStruct((b, self.max_doc_tokens), jnp.int32),
              jax.ShapeDtypeStruct((b,), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.bool_))
    return EngineOutput(*io_callback(self._callback, shapes, inputs.text, inputs.lengths,
                                     query_tokens, query_lengths, active, noisy, ordered=True),
                        wrapped=self.retokenize)
