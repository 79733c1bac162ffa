"""Search engines: the simulator prompt, document parsing, BM25 over a local
corpus, the HTTP engine's timeouts and retries (against a local server), and the
io_callback bridge from jitted code."""

import json
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zsjax import search as S
from zsjax import simulator as SIM
from zsjax.template import information_block, render_documents
from config_files import load_config
from stub_server import StubServer

transformers = pytest.importorskip("transformers")


def test_prompt_keyword_is_the_only_difference():
  prompt = SIM.SimulatorPrompt()
  useful = prompt.render(" capital of France ", "What is the capital of France?", "Paris", False)
  noisy = prompt.render(" capital of France ", "What is the capital of France?", "Paris", True)
  assert useful.count("useful") + useful.count("Useful") == 3
  assert noisy.replace("noisy", "useful").replace("Noisy", "Useful") == useful
  assert "Query: capital of France\n" in useful and useful.endswith("Useful Output:")
  assert '"What is the capital of France?"' in useful and "answer is Paris" in useful
  prefix, suffix = prompt.split("What is the capital of France?", "Paris", noisy=True)
  # the query brings its own leading space, as a policy writes it after <search>
  assert prefix.endswith("Query:") and prefix + " capital of France" + suffix == noisy


@pytest.mark.parametrize("template,needle", [
    ("no query here {quality}", "'{query}' exactly once"),
    ("{query} without the keyword", "no '{quality}'"),
    ("{query} {quality} {colour}", "unknown placeholder 'colour'"),
])
def test_bad_templates_are_named(template, needle):
  with pytest.raises(ValueError, match=needle):
    SIM.SimulatorPrompt(template)


def test_parse_documents_cuts_at_top_k_and_collapses_blank_lines():
  text = "Doc 1: first\n\n\nline two\nDoc 2: second\nDoc 3: third\nDoc 4: fourth"
  assert SIM.parse_documents(text, 2) == ["first\nline two", "second"]
  assert SIM.parse_documents(text, 5) == ["first\nline two", "second", "third", "fourth"]
  assert SIM.parse_documents("just one paragraph", 5) == ["just one paragraph"]
  assert SIM.parse_documents("", 5) == []


@pytest.fixture()
def corpus_file(tmp_path):
  rows = [{"id": str(i), "contents": text} for i, text in enumerate([
      "Paris is the capital and largest city of France.",
      "Berlin is the capital of Germany.",
      "The Seine is a river that flows through Paris.",
      "Mount Fuji is the highest mountain in Japan."])]
  path = tmp_path / "corpus.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  return path


def test_bm25_ranks_the_matching_document_first(corpus_file):
  engine = S.BM25Engine.from_jsonl(corpus_file, top_k=2)
  result = engine.search([S.SearchRequest("capital of Germany"), S.SearchRequest("highest mountain Japan"),
                          S.SearchRequest("zzzz unknown")])
  assert result.documents[0][0] == "Berlin is the capital of Germany."
  assert len(result.documents[0]) == 2
  assert result.documents[1] == ["Mount Fuji is the highest mountain in Japan."]  # only score > 0
  assert result.documents[2] == [] and result.failed == [False] * 3


def test_bm25_corpus_errors_name_file_line_and_field(tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"contents": "ok"}\n{"text": "wrong field"}\n')
  with pytest.raises(ValueError, match=r"bad\.jsonl:2: no string field 'contents'.*\['text'\]"):
    S.BM25Engine.from_jsonl(bad)
  bad.write_text('{"contents": "ok"}\nnot json\n')
  with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
    S.BM25Engine.from_jsonl(bad)
  with pytest.raises(FileNotFoundError, match="missing.jsonl"):
    S.BM25Engine.from_jsonl(tmp_path / "missing.jsonl")
  # an empty corpus, and one with nothing to index, name the file (issue 30 item 12)
  bad.write_text("\n")
  with pytest.raises(ValueError, match=r"bad\.jsonl holds no documents"):
    S.BM25Engine.from_jsonl(bad)
  bad.write_text('{"contents": ""}\n{"contents": "the of and"}\n')
  with pytest.raises(ValueError, match=r"bad\.jsonl \(2 documents\) has no word to index"):
    S.BM25Engine.from_jsonl(bad)


@pytest.fixture()
def server():
  s = StubServer()
  yield s
  s.close()


def test_http_engine_sends_the_trajectory_context_and_parses_documents(server):
  engine = S.HttpSimulatorEngine(server.url, "sim", timeout_s=2.0, max_retries=0)
  result = engine.search([S.SearchRequest("capital of France", "Capital of France?", "Paris", False),
                          S.SearchRequest("river in Paris", "Which river?", "Seine", True)])
  assert result.failed == [False, False]
  assert result.documents[0] == ["about capital of France", "more", "x", "y", "z"]
  prompts = server.requests[0]["prompt"]
  assert "Useful Output:" in prompts[0] and '"Capital of France?"' in prompts[0]
  assert "Noisy Output:" in prompts[1] and "answer is Seine" in prompts[1]
  assert server.requests[0]["temperature"] == 0.8 and server.requests[0]["max_tokens"] == 600


def test_http_engine_calls_a_chat_simulator_with_chat_messages(server):
  """Released simulators are chat models: the reference calls them through a
  chat-completions endpoint with an empty system message."""
  prompt = SIM.SimulatorPrompt(chat=True)
  engine = S.HttpSimulatorEngine(server.url, "sim", prompt, timeout_s=2.0, max_retries=0)
  requests = [S.SearchRequest(" capital of France ", "Capital of France?", "Paris", False),
              S.SearchRequest("river in Paris", "Which river?", "Seine", True)]
  result = engine.search(requests)
  assert result.failed == [False, False] and server.paths == ["/v1/chat/completions"] * 2
  assert result.documents[0] == ["about capital of France", "more", "x", "y", "z"]
  # Chat requests go out concurrently, so the server may see them in any order.
  expected = sorted(prompt.message(r.query, r.question, r.answer, r.noisy) for r in requests)
  assert all(sent["messages"][0] == {"role": "system", "content": ""} for sent in server.requests)
  assert all(sent["messages"][1]["role"] == "user" for sent in server.requests)
  assert sorted(sent["messages"][1]["content"] for sent in server.requests) == expected
  assert sum("Noisy Output:" in text for text in expected) == 1


@pytest.mark.parametrize("mode", ["slow", "error", "garbage"])
def test_http_engine_gives_up_after_bounded_retries(server, mode):
  server.mode, server.delay_s = mode, 10.0  # slow: each answer 10 s late
  engine = S.HttpSimulatorEngine(server.url, "sim", timeout_s=0.3, max_retries=2, backoff_s=0.05)
  start = time.perf_counter()
  result = engine.search([S.SearchRequest("q")])
  elapsed = time.perf_counter() - start
  assert result.documents == [[]] and result.failed == [True]
  assert engine.stats["failures"] == 1 and engine.stats["retries"] == 2
  assert len(server.requests) == 3 and engine.stats["last_error"]
  # three timeouts and two backoffs (about 1 s), not three 10 s answers; the margin is
  # for a loaded machine
  assert elapsed < 10.0


def test_unreachable_server_fails_fast():
  engine = S.HttpSimulatorEngine("http://127.0.0.1:9", "sim", timeout_s=0.5, max_retries=1,
                                 backoff_s=0.01)
  result = engine.search([S.SearchRequest("q")])
  assert result.failed == [True] and engine.stats["failures"] == 1


def test_host_search_from_jitted_code(corpus_file):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator([corpus_file.read_text()] * 3, trainers.BpeTrainer(
      vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok)
  host = S.HostSearch(S.BM25Engine.from_jsonl(corpus_file, top_k=1), tokenizer, max_doc_tokens=64)
  inputs = host.inputs(["q0", "q1"], ["a0", "a1"])
  queries = ["capital of Germany", "highest mountain"]
  encoded = [tokenizer.encode(q) for q in queries]
  width = max(map(len, encoded))
  query_tokens = np.zeros((2, width), np.int32)
  for i, ids in enumerate(encoded):
    query_tokens[i, :len(ids)] = ids
  lengths = np.array([len(e) for e in encoded], np.int32)

  @jax.jit
  def call(inputs, tokens, lengths, active, noisy):
    out = host(None, inputs, tokens, lengths, active, noisy, None)
    return out.tokens, out.lengths + 0, out.failed  # traced work after the callback

  docs, doc_lengths, failed = call(inputs, query_tokens, lengths,
                                   jnp.array([True, False]), jnp.array([False, False]))
  text = tokenizer.decode(np.asarray(docs[0, :doc_lengths[0]]).tolist())
  assert text == "Doc 1: Berlin is the capital of Germany."
  assert int(doc_lengths[1]) == 0 and not bool(failed.any())  # the inactive row is not searched

  # BM25 reads the query alone: no question or answer bytes enter the jitted call (a
  # large text array there hung the RL step on a 1-core CPU), and any length passes
  assert inputs.text.shape == (2, 2, 0) and host.row_problem("q" * 5000, "a") is None

  class Reading:  # an engine that reads the context (a simulator) gets it, to the width
    top_k = 1

    def __init__(self):
      self.requests = []

    def search(self, requests):
      self.requests += requests
      return S.SearchResult(documents=[["d"] for _ in requests], failed=[False] * len(requests))

  reading = Reading()
  simulated = S.HostSearch(reading, tokenizer, max_doc_tokens=8, text_width=16)
  assert simulated.inputs(["q0"], ["a0"]).text.shape == (1, 2, 16)
  assert "17 UTF-8 bytes" in simulated.row_problem("q" * 17, "a")
  jax.jit(lambda i, t, n: simulated(None, i, t, n, jnp.array([True]), jnp.array([True]),
                                    None).tokens)(simulated.inputs(["q0"], ["a0"]),
                                                  query_tokens[:1], lengths[:1])
  assert [(r.question, r.answer, r.noisy) for r in reading.requests] == [("q0", "a0", True)]

  # A huge document is cut before it is tokenized, to the same kept tokens (issue 30 item 12).
  huge = "Berlin is the capital of Germany. " * 20_000
  seen = []

  class Counting:
    def __init__(self, inner):
      self.inner = inner

    def encode(self, text, **kwargs):
      seen.append(len(text))
      return self.inner.encode(text, **kwargs)

    def decode(self, *args, **kwargs):
      return self.inner.decode(*args, **kwargs)

  class Huge:
    def search(self, requests):
      return S.SearchResult([[huge] for _ in requests], [False] * len(requests))

  for retokenize in (False, True):
    seen.clear()
    cut = S.HostSearch(Huge(), Counting(tokenizer), max_doc_tokens=64, retokenize=retokenize)
    ids, n, _ = cut._callback(np.asarray(inputs.text), np.asarray(inputs.lengths), query_tokens,
                              lengths, np.array([True, False]), np.array([False, False]))
    whole = render_documents([huge])
    if retokenize:
      whole = information_block(whole)
    want = tokenizer.encode(whole, add_special_tokens=False)[:64]
    assert ids[0, :n[0]].tolist() == want and n[0] == 64
    assert seen and max(seen) <= 64 * S.HEAD_CHARS_PER_TOKEN < len(huge)


# ------------------------------------------------------- a failing engine is loud


def http_section(**fields):
  import ml_collections

  section = dict(kind="http", url="http://127.0.0.1:8000", model="sim", timeout_s=1.0,
                 max_retries=0, backoff_s=0.01, max_failed_share=0.2, max_failed_steps=3,
                 concurrency=4, top_k=5, corpus="", text_field="contents")
  return ml_collections.ConfigDict({**section, **fields})


@pytest.mark.parametrize("fields,needle", [
    (dict(url=""), "config.engine.url is empty"),
    (dict(url="127.0.0.1:8000"), "config.engine.url='127.0.0.1:8000' is not an http"),
    (dict(url="ftp://host"), "is not an http"),
    (dict(model=""), "config.engine.model is empty"),
    (dict(timeout_s=0.0), "config.engine.timeout_s=0.0"),
    (dict(max_failed_share=1.5), "config.engine.max_failed_share=1.5"),
    (dict(max_failed_steps=0), "config.engine.max_failed_steps=0")])
def test_engine_settings_are_checked_before_any_work(fields, needle):
  with pytest.raises(ValueError, match=re.escape(needle)):
    S.check_engine_config(http_section(**fields))


@pytest.mark.parametrize("mode", ["dead", "error"])
def test_health_check_names_the_url_the_error_and_the_fix(mode):
  server = StubServer(mode if mode != "dead" else "ok")
  if mode == "dead":
    server.close()
  try:
    with pytest.raises(S.EngineError) as caught:
      S.engine_from_config(http_section(url=server.url, timeout_s=0.5))
  finally:
    server.close()
  message = str(caught.value)
  assert server.url in message and "config.engine.url" in message
  assert ("HTTP 500" if mode == "error" else "Connection") in message


def test_each_call_ends_by_its_deadline_even_when_the_server_trickles(server):
  """A server sending 4 bytes every 0.1 s never trips a per-read timeout; the
  deadline covers the whole exchange: one call <= (retries + 1) x timeout + backoff."""
  server.mode, server.trickle_s = "trickle", 0.1
  engine = S.HttpSimulatorEngine(server.url, "sim", timeout_s=0.4, max_retries=1, backoff_s=0.05)
  start = time.perf_counter()
  result = engine.search([S.SearchRequest("q")] * 4)
  elapsed = time.perf_counter() - start
  assert result.failed == [True] * 4 and "timeout_s=0.4" in engine.stats["last_error"]
  assert engine.call_deadline_s == pytest.approx(0.85)
  # the answer alone would take > 10 s (the margin is for a loaded machine)
  assert elapsed < engine.call_deadline_s + 5.0


def test_a_chat_call_is_bounded_by_waves_of_concurrent_requests(server):
  """Chat requests go ``concurrency`` at a time, each with its own time limit: a
  slow healthy server answers every one, a server past the limit fails them all
  within ceil(requests / concurrency) x the per-request bound."""
  server.mode, server.delay_s = "slow", 0.3
  prompt = SIM.SimulatorPrompt(chat=True)
  patient = S.HttpSimulatorEngine(server.url, "sim", prompt, timeout_s=1.0, max_retries=0,
                                  concurrency=2)
  assert not any(patient.search([S.SearchRequest(f"q{i}") for i in range(8)]).failed)
  server.delay_s = 1.0
  engine = S.HttpSimulatorEngine(server.url, "sim", prompt, timeout_s=0.3, max_retries=0,
                                 concurrency=4)
  bound = engine.call_bound_s(24)
  assert bound == pytest.approx(6 * 0.3)
  start = time.perf_counter()
  result = engine.search([S.SearchRequest(f"q{i}") for i in range(24)])
  assert all(result.failed) and engine.stats["failures"] == 24
  assert engine.call_bound_s(24) == pytest.approx(6 * 0.3 + 0.3)  # found down: + a probe
  # the failing server is found out in one wave; 24 requests one after another would
  # take 7.2 s (the margin is for a loaded machine)
  assert time.perf_counter() - start < bound + 4.0


def test_a_server_that_dies_mid_run_fails_its_later_calls():
  server = StubServer(die_after=1)
  try:
    engine = S.HttpSimulatorEngine(server.url, "sim", timeout_s=0.5, max_retries=1,
                                   backoff_s=0.01)
    first = engine.search([S.SearchRequest("q")])
    second = engine.search([S.SearchRequest("q")])
  finally:
    server.close()
  assert first.failed == [False] and second.failed == [True]
  assert engine.stats["failures"] == 1 and engine.stats["last_error"]


# The released ZeroSearch simulators' prompt, as `search_simulate_sft` in
# llm_agent/generation.py of Alibaba-NLP/ZeroSearch (commit 2d4cdca) builds it for
# query 'capital of France', problem 'What is the capital of France?' and
# ground_truth[0] 'Paris': written out here as data, one string per quality.
REFERENCE_USEFUL = """You are the Google search engine.
Given a query, you need to generate five useful documents for the query.

The user is trying to answer the question: "What is the capital of France?" whose answer is Paris.
Each document should contain about 30 words, and these documents should contain useful information.

Query: capital of France
Useful Output:
"""
REFERENCE_NOISY = """You are the Google search engine.
Given a query, you need to generate five noisy documents for the query.

The user is trying to answer the question: "What is the capital of France?" whose answer is Paris.
Each document should contain about 30 words, and these documents should contain noisy information.

Query: capital of France
Noisy Output:
"""


def test_the_zerosearch_template_is_the_released_simulators_prompt():
  prompt = SIM.SimulatorPrompt.from_config("zerosearch", top_k=5)
  question = "What is the capital of France?"
  # the policy's query as it stands between <search> and </search>
  assert prompt.render(" capital of France ", question, "Paris", False) == REFERENCE_USEFUL
  assert prompt.render("capital of France", question, "Paris", True) == REFERENCE_NOISY
  assert prompt.messages("capital of France", question, "Paris", True) == [
      {"role": "system", "content": ""}, {"role": "user", "content": REFERENCE_NOISY}]
  prefix, suffix = prompt.split(question, "Paris", noisy=False)
  assert prefix + " capital of France" + suffix == REFERENCE_USEFUL
  assert SIM.SimulatorPrompt.from_config("", 5).template == SIM.DEFAULT_TEMPLATE
  assert SIM.SimulatorPrompt.from_config("zsjax", 5).template == SIM.DEFAULT_TEMPLATE
  with pytest.raises(ValueError, match=r"simulator.template='zerosarch'.*zerosearch"):
    SIM.SimulatorPrompt.from_config("zerosarch", 5)


@pytest.mark.parametrize("name,arg,field", [
    ("zerosearch", "qwen2.5-3b", "simulator.template"),
    ("zerosearch", "llama3.2-3b", "simulator.template"),
    ("eval", "paper", "simulator.template"),
    ("sim_tuning", "qwen2.5-7b", "simulator_template")])
def test_paper_configs_send_the_released_prompt(name, arg, field):
  config = load_config(name, arg)
  section, key = field.rsplit(".", 1) if "." in field else ("", field)
  value = (config[section] if section else config)[key]
  assert value == "zerosearch", (name, arg, value)
  assert load_config("tiny_world").simulator_template != "zerosearch"


def _sampling_section(**fields):
  import ml_collections

  return ml_collections.ConfigDict({**dict(max_new_tokens=21, temperature=0.3, top_p=0.9),
                                    **fields})


@pytest.mark.parametrize("chat", [False, True])
def test_a_served_simulator_samples_as_the_config_says(server, chat):
  prompt = SIM.SimulatorPrompt.from_config("zerosearch", 5, chat=chat)
  engine = S.engine_from_config(http_section(url=server.url), prompt,
                                simulator=_sampling_section())
  engine.search([S.SearchRequest("q", "Q?", "A", False)])
  greedy = S.engine_from_config(http_section(url=server.url), prompt,
                                simulator=_sampling_section(), greedy=True)
  greedy.search([S.SearchRequest("q", "Q?", "A", False)])
  # the health checks' requests come first; every request carries the settings
  sent = server.requests
  assert len(sent) == 4
  for body in sent[:2]:
    assert (body["temperature"], body["max_tokens"], body["top_p"]) == (0.3, 21, 0.9)
  for body in sent[2:]:
    assert (body["temperature"], body["max_tokens"], body["top_p"]) == (0.0, 21, 0.9)
  assert server.paths[-1] == ("/v1/chat/completions" if chat else "/v1/completions")


def test_a_search_r1_retrieval_server_is_a_host_engine(server, tokenizer_for_docs):
  """POST /retrieve with queries, topk and return_scores (the contract of
  Search-R1's retrieval_server.py); each document shown as the reference's client
  shows it: ``Doc i(Title: <first line>) <rest>``, the title's quotes kept."""
  section = http_section(kind="retriever", url=server.url, model="", top_k=2)
  S.check_engine_config(section)
  engine = S.engine_from_config(section)  # health-checked
  result = engine.search([S.SearchRequest(" capital of France "), S.SearchRequest("Seine")])
  assert server.paths[-1] == "/retrieve"
  assert server.requests[-1] == {"queries": ["capital of France", "Seine"], "topk": 2,
                                 "return_scores": True}
  assert result.failed == [False, False]
  assert engine.format_documents(result.documents[0]) == (
      'Doc 1(Title: "Title 0") Text 0 about capital of France.\n'
      'Doc 2(Title: "Title 1") Text 1 about capital of France.')
  # through the rollout's bridge the policy reads that text between the tags
  host = S.HostSearch(engine, tokenizer_for_docs, 64)
  assert host.render == engine.format_documents
  assert S.retriever_document({"id": "1", "contents": "T\nbody\nmore"}) == "(Title: T) body\nmore"
  # the same deadlines and accounting as a served simulator
  server.mode = "error"
  failed = engine.search([S.SearchRequest("q")])
  assert failed.failed == [True] and "HTTP 500" in engine.stats["last_error"]
  with pytest.raises(ValueError, match="config.engine.kind='retriever' but config.engine.url"):
    S.check_engine_config(http_section(kind="retriever", url=""))


@pytest.fixture()
def tokenizer_for_docs():
  class Chars:
    def encode(self, text, add_special_tokens=False):
      return [ord(c) for c in text]

  return Chars()


@pytest.mark.parametrize("mode,needle", [
    ("no_choices", "0 choices for"), ("empty_text", "completion is empty"),
    ("fewer", "1 choices for 2 prompts"), ("no_index", "indices")])
@pytest.mark.parametrize("chat", [False, True])
def test_a_200_without_usable_completions_is_a_failed_call(server, mode, needle, chat):
  """No choices, empty text, fewer choices than prompts, choices without an index:
  each is a counted failure with the reason, never documents silently missing
  (nor row 0 given the last row's documents)."""
  if chat and mode in ("fewer", "no_index"):
    needle = "0 choices for" if mode == "fewer" else None  # one choice a chat request
  server.mode = mode
  prompt = SIM.SimulatorPrompt(chat=chat)
  engine = S.HttpSimulatorEngine(server.url, "sim", prompt, timeout_s=2.0, max_retries=0)
  result = engine.search([S.SearchRequest("capital of France", "Q?", "Paris", False),
                          S.SearchRequest("river in Paris", "Q?", "Seine", True)])
  if needle is None:  # a chat answer without an index is still one answer to one request
    assert result.failed == [False, False]
    return
  assert result.failed == [True, True] and result.documents == [[], []]
  assert needle in engine.stats["last_error"] and engine.stats["failures"] >= 1
  # the health check (one prompt) refuses such a server before any work
  with pytest.raises(S.EngineError, match="choices for|completion is empty|indices"):
    engine.health_check()


def test_a_retriever_that_finds_nothing_is_a_failed_call(server):
  """A retrieval server answering 200 with empty hit lists: a failed, counted call
  naming the query, and a health check that refuses it."""
  server.mode = "no_hits"
  engine = S.RetrieverEngine(server.url, top_k=2, timeout_s=2.0, max_retries=0)
  result = engine.search([S.SearchRequest("capital of France"), S.SearchRequest("x")])
  assert result.failed == [True, True] and result.documents == [[], []]
  assert "no documents for query 0 ('capital of France')" in engine.stats["last_error"]
  with pytest.raises(S.EngineError, match="no documents for query 0"):
    engine.health_check()
  server.mode = "ok"
  result = engine.search([S.SearchRequest("capital of France")])
  assert result.failed == [False] and len(result.documents[0]) == 2


def test_a_server_that_stops_answering_is_found_out_in_one_wave(server):
  """Once ``concurrency`` requests in a row fail, the call's other requests fail
  unsent; the next call sends one probe with one attempt, and a server that
  answers it again gets the whole call. Counted in requests, not seconds."""
  server.mode, server.delay_s = "slow", 1.0
  prompt = SIM.SimulatorPrompt(chat=True)
  engine = S.HttpSimulatorEngine(server.url, "sim", prompt, timeout_s=0.2, max_retries=0,
                                 concurrency=4)
  result = engine.search([S.SearchRequest(f"q{i}") for i in range(40)])
  assert all(result.failed) and engine.down
  sent = len(server.requests)
  assert sent == 4  # one wave, not ten: the first wave completes before more are sent
  assert engine.stats["failures"] == 40 and engine.stats["unsent"] == 40 - sent
  result = engine.search([S.SearchRequest(f"q{i}") for i in range(40)])
  assert all(result.failed) and len(server.requests) == sent + 1  # one probe, one attempt
  server.mode = "ok"
  result = engine.search([S.SearchRequest(f"q{i}") for i in range(40)])
  assert not any(result.failed) and not engine.down and len(server.requests) == sent + 41

  server.mode = "error"  # one POST a call: the retries are spent once, then one probe
  batch = S.HttpSimulatorEngine(server.url, "sim", timeout_s=1.0, max_retries=2,
                                backoff_s=0.01)
  sent = len(server.requests)
  assert batch.search([S.SearchRequest("q")] * 3).failed == [True] * 3
  assert len(server.requests) - sent == 3
  assert batch.search([S.SearchRequest("q")] * 3).failed == [True] * 3
  assert len(server.requests) - sent == 4
  server.mode = "ok"
  assert batch.search([S.SearchRequest("q")] * 3).failed == [False] * 3


def test_a_long_wait_prints_where_the_call_stands(server):
  """A call outstanding past ``timeout_s`` says so every ``timeout_s`` seconds: how
  long, how many answered, the last error and when it ends at the latest."""
  server.mode, server.delay_s = "slow", 5.0
  engine = S.HttpSimulatorEngine(server.url, "sim", timeout_s=0.3, max_retries=2,
                                 backoff_s=0.05)
  lines = []
  engine.log = lines.append
  assert engine.search([S.SearchRequest("q")]).failed == [True]  # >= 0.9 s of deadlines
  assert lines and all(server.url in line and "0 answered so far" in line for line in lines)
  assert f"ends within {engine.call_deadline_s:.0f} s" in lines[0]
  count = len(lines)
  server.mode = "ok"
  engine.search([S.SearchRequest("q")])  # a quick call says nothing
  assert len(lines) == count
