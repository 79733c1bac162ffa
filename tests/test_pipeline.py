"""The tiny-world pipeline at CI size: every stage runs, every artifact exists, RL
raises the training reward, a rerun skips every stage, and evaluation through the
harness reproduces the table."""

import collections
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from zsjax import demonstrations, pipeline, report, stages, template, tinyworld
from zsjax.data import write_jsonl
from zsjax.metrics import read_jsonl

from config_files import load_config
from conftest import optimized



def test_worlds_are_seeded_and_splits_disjoint():
  a, b = tinyworld.generate(0), tinyworld.generate(0)
  assert a == b and tinyworld.generate(1)["corpus"] != a["corpus"]
  questions = {k: {r["question"] for r in v} for k, v in a["splits"].items()}
  assert not questions["train"] & questions["test"] and not questions["dev"] & questions["test"]
  hops = {r["hops"] for r in a["splits"]["test"]}
  assert hops == {1, 2}
  two_hop = [r for r in a["splits"]["train"] if r["hops"] == 2]
  docs = {d["title"]: d["contents"] for d in a["corpus"]}
  for r in two_hop[:20]:  # the bridge's own document names the answer
    assert any(g in docs[r["bridge"]] for g in r["golden_answers"])


def test_every_name_is_one_token_of_a_kind_specific_pool(world, tmp_path):
  from transformers import AutoTokenizer

  pools = tinyworld.name_pools()
  words = [w for pool in pools.values() for w in pool]
  assert len(words) == len(set(words))  # a word names one kind of thing only
  tokenizer = AutoTokenizer.from_pretrained(world["tokenizer"])
  assert all(len(tokenizer.tokenize(" " + w)) == 1 for w in words)
  generated = tinyworld.generate(0)
  for doc in generated["corpus"]:
    if doc["kind"] != "film":
      assert doc["title"] in pools[doc["kind"]]  # one word: one token
  with pytest.raises(ValueError, match="vocab_size=300"):
    tinyworld.build(tmp_path / "small", 0, tinyworld.WorldSize(vocab_size=300))
  with pytest.raises(ValueError, match="city names"):
    tinyworld.generate(0, tinyworld.WorldSize(cities=10_000))


def test_a_version_2_worlds_questions_name_the_field_their_answer_follows(tmp_path):
  from transformers import AutoTokenizer

  def cue(world, question):
    """The word just before the answer in the subject's document, and whether the
    question names it."""
    docs = {d["title"]: d["contents"] for d in world["corpus"]}
    subject = next(t for t in docs if f" {t} " in f" {question['question'].rstrip('?')} ")
    before = docs[subject].split(f" {question['golden_answers'][0]}")[0].split()[-1].strip(":")
    return before.lower(), before.lower() in question["question"].lower().split()

  old, new = tinyworld.generate(4), tinyworld.generate(4, tinyworld.WorldSize(version=2))
  for world, version in ((old, 1), (new, 2)):
    single = [r for rows in world["splits"].values() for r in rows if r["hops"] == 1]
    named = {r["relation"]: cue(world, r) for r in single}
    assert len(named) == 5
    words = {word for word, _ in named.values()}
    if version == 1:  # "born in X", "located in X", "founded in X": one cue, three relations
      assert len(words) < 5
    else:  # "Birthplace: X" / "What is the birthplace of Y?": each relation its own field
      assert len(words) == 5 and all(ok for _, ok in named.values()), named
  # v3: the question's "<field> of <subject>" stands in the subject's document before the answer
  v3 = tinyworld.generate(4, tinyworld.WorldSize(version=3))
  docs = {d["title"]: d["contents"] for d in v3["corpus"]}
  single = [r for rows in v3["splits"].values() for r in rows if r["hops"] == 1]
  assert {r["relation"] for r in single} == set(named)
  for r in single:
    phrase = r["question"].rstrip("?").split(" the ", 1)[1]  # "employer of X"
    subject = phrase.split(" of ")[-1]
    assert f"{phrase[0].upper()}{phrase[1:]}: {r['golden_answers'][0]}." in docs[subject], r
  # v4: v3's facts, one a document (a person's two in two documents), and the engine
  # ranks the one that answers a single-hop question first
  v4 = tinyworld.generate(4, tinyworld.WorldSize(version=4))
  assert v4["splits"] == v3["splits"]
  facts = lambda corpus: sorted({f.rstrip(".") for d in corpus for f in d["contents"].split(". ")})  # noqa: E731
  assert facts(v4["corpus"]) == facts(v3["corpus"])
  assert all(d["contents"].count(": ") <= 1 or d["kind"] == "country" for d in v4["corpus"])
  people = [d for d in v3["corpus"] if d["kind"] == "person"]
  assert len(v4["corpus"]) == len(v3["corpus"]) + len(people)
  from zsjax.search import BM25Engine, SearchRequest
  engine = BM25Engine([d["contents"] for d in v4["corpus"]], top_k=3)
  for r in single:
    first = engine.search([SearchRequest(r["question"])]).documents[0][0]
    assert first.endswith(f": {r['golden_answers'][0]}."), (r, first)
  # v5: v3's facts and questions (one-word fields), each name right after "<subject> <field>",
  # a pair that stands nowhere else in the corpus; each field one token
  v5 = tinyworld.generate(4, tinyworld.WorldSize(version=5))
  strip = lambda world: [(r["id"], r["relation"], r["golden_answers"], r["bridge"])  # noqa: E731
                         for rows in world["splits"].values() for r in rows]
  assert strip(v5) == strip(v3)
  text = " ".join(d["contents"] for d in v5["corpus"])
  fields = set()
  for r in (r for rows in v5["splits"].values() for r in rows if r["hops"] == 1):
    field, subject = r["question"].rstrip("?").split(" the ", 1)[1].split(" of ")
    fields.add(field)
    assert text.count(f" {subject} {field} ") + text.startswith(f"{subject} {field} ") == 1, r
    assert f"{subject} {field} {r['golden_answers'][0]}." in text, r
  assert len(fields) == 5 and all(" " not in f for f in fields), fields
  v5_tokenizer = AutoTokenizer.from_pretrained(
      tinyworld.build(tmp_path / "v5", 4, tinyworld.WorldSize(version=5))["tokenizer"])
  assert all(len(v5_tokenizer.tokenize(" " + f)) == 1 for f in fields)
  titles = [d["title"] for d in new["corpus"] if d["kind"] == "film"]
  assert all(t in tinyworld.name_pools(2)["film"] for t in titles)  # one word each
  assert len(titles) == len(set(titles))
  # every document's subject is its first word (v1's films: "The ...")
  assert all(d["contents"].startswith(d["title"] + " ") and " " not in d["title"]
             for d in new["corpus"])
  assert tinyworld.name_pools(2)["person"] == tinyworld.name_pools()["person"]
  paths = tinyworld.build(tmp_path / "v2", 4, tinyworld.WorldSize(version=2))
  tokenizer = AutoTokenizer.from_pretrained(paths["tokenizer"])
  assert all(len(tokenizer.tokenize(" " + t)) == 1 for t in titles)
  with pytest.raises(ValueError, match=r"WorldSize.version=7 \(config.world.version\)"):
    tinyworld.generate(0, tinyworld.WorldSize(version=7))
  # a workdir's world of one version is not taken for another's
  with pytest.raises(ValueError, match="'version': 2"):
    tinyworld.ensure(tmp_path / "v2", 4, tinyworld.WorldSize(), rebuild=False)


def test_oracle_searches_are_labelled_by_what_answers_the_query():
  from zsjax import search, sim_tuning

  world = tinyworld.generate(3)
  engine = search.BM25Engine([d["contents"] for d in world["corpus"]], top_k=12)
  questions = world["splits"]["train"]
  trajectories, pairs = demonstrations.oracle_searches(
      [("x-", questions, world["corpus"], engine)], top_k=3, seed=0)
  judge = demonstrations.QueryJudge(questions, world["corpus"])
  by_text = {q["question"]: q for q in questions}
  docs_of = {d["title"]: d["contents"] for d in world["corpus"]}
  for q, t in zip(questions[:40], trajectories):
    assert t["id"] == "x-" + q["id"]
    queries = [s["query"] for s in t["searches"]][::2]
    assert queries[0] == q["question"] and (queries[1] == q["bridge"] if q["bridge"] else True)
    wrong = by_text[queries[-1]]  # another question of the same relation
    assert wrong["relation"] == q["relation"] and wrong["question"] != q["question"]
    for plain, without in zip(t["searches"][::2], t["searches"][1::2]):
      assert plain["documents"] == engine.search(
          [search.SearchRequest(plain["query"])]).documents[0][:3]
      assert len(without["documents"]) <= 3
      assert not judge.useful(q["question"], q["golden_answers"], without["query"],
                              without["documents"])
  # the judge reads the query: the wrong entity's results answer *its* question
  q = questions[0]
  other = next(o for o in questions if o["relation"] == q["relation"] and o is not q)
  other_docs = engine.search([search.SearchRequest(other["question"])]).documents[0][:3]
  assert judge.useful(q["question"], q["golden_answers"], other["question"], other_docs)
  assert sim_tuning.RuleJudge().useful(
      "", other["golden_answers"], "", other_docs)  # an independent check of the same fact
  bridge_q = next(o for o in questions if o["bridge"])
  assert judge.useful("", [], bridge_q["bridge"], [docs_of[bridge_q["bridge"]]])
  assert not judge.useful("", [], bridge_q["bridge"],
                          [d for t, d in docs_of.items() if t != bridge_q["bridge"]][:3])
  labels = sim_tuning.label_counts(pairs)
  assert labels["useful"] > 0 and labels["noisy"] > 0
  # a person of a version 4 world has two documents: either answers a query naming them
  v4 = tinyworld.generate(3, tinyworld.WorldSize(version=4))
  person = next(d["title"] for d in v4["corpus"] if d["kind"] == "person")
  own = [d["contents"] for d in v4["corpus"] if d["title"] == person]
  judge4 = demonstrations.QueryJudge(v4["splits"]["train"], v4["corpus"])
  assert len(own) == 2 and all(judge4.useful("", [], person, [d]) for d in own)
  assert not judge4.useful("", [], person, [d["contents"] for d in v4["corpus"]
                                             if d["title"] != person][:3])
  assert len(pairs) == sum(bool(s["documents"]) for t in trajectories for s in t["searches"])


def test_demonstrations_are_correct_and_show_no_test_world_fact():
  from zsjax import search
  from zsjax.template import INSTRUCTION

  demo = tinyworld.generate(99, tinyworld.WorldSize(people=12, films=4, cities=6, countries=3,
                                                    organizations=3))
  engine = search.BM25Engine([d["contents"] for d in demo["corpus"]], top_k=2)
  questions = {r["question"]: r for r in demo["splits"]["train"]}
  test_docs = [d["contents"] for d in tinyworld.generate(0)["corpus"]]
  for bridge in (0.0, 1.0):
    rows = demonstrations.demonstrations(demo, engine, INSTRUCTION, seed=0, bridge_fraction=bridge,
                                   baseline_fraction=0.3)
    search_rows = [r for r in rows if r["format"] == "search"]
    assert len(search_rows) == len(questions)  # every training question once
    for row in rows:
      q = questions[row["prompt"].split("Question: ")[-1].strip()]
      gold = q["golden_answers"][0]
      assert row["target_segments"][-2:] == ["<answer>", f" {gold} </answer>"]
      assert not any(doc in row["prompt"] + row["target"] for doc in test_docs)
      assert "".join(row["target_segments"]) == row["target"]
      # documents are inserted text: they carry no loss, the policy's own turns do;
      # the answer's name only where the context holds it (reading, not guessing)
      read = gold in row["prompt"] + "".join(row["target_segments"][:-1])
      assert row["target_loss"] == [int(not seg.startswith("\n\n<information>"))
                                    for seg in row["target_segments"][:-1]] + [int(read)]
      if row["format"] == "direct":
        assert not read
      if row["format"] != "search":
        continue
      queries = [seg[len("<search> "):-len(" </search>")] for seg in row["target_segments"]
                 if seg.startswith("<search> ")]
      # the question first; a two-hop question's bridge second, always or never here
      want = [q["question"]] + ([q["bridge"]] if q["bridge"] and bridge else [])
      assert queries == want
      if q["hops"] == 1 or bridge:  # a single-hop question's document, or the bridge's
        assert read
      for query, seg in zip(queries, row["target_segments"][1::2]):
        docs = engine.search([search.SearchRequest(query)]).documents[0]
        assert seg == template.render_observation(docs)
    baselines = [r for r in rows if r["format"] != "search"]
    assert {r["format"] for r in baselines} == {"rag", "direct"}
    assert 0.3 < len(baselines) / len(questions) < 0.9  # 0.3 each, drawn


def test_reading_drills_hold_the_answer_and_teach_the_query_and_the_answer():
  from zsjax import search

  demo = tinyworld.generate(99, tinyworld.WorldSize(people=12, films=4, cities=6, countries=3,
                                                    organizations=3))
  engine = search.BM25Engine([d["contents"] for d in demo["corpus"]], top_k=3)
  single = {q["question"]: q for q in demo["splits"]["train"] if q["hops"] == 1}
  for most in (1, 3):
    rows = demonstrations.reading_drills(demo, engine, seed=0, per_question=2, max_documents=most)
    assert rows and len(rows) <= 2 * len(single)
    counts = []
    for row in rows:
      question = row["prompt"][len("Question: "):].strip()
      q = single[question]  # single-hop training questions only
      gold = q["golden_answers"][0]
      query, observation, tag, answer = row["target_segments"]
      assert query == f"<search> {question} </search>" and tag == "<answer>"
      assert answer == f" {gold} </answer>" and "".join(row["target_segments"]) == row["target"]
      assert row["target_loss"] == [1, 0, 1, 1]  # the documents are inserted: no loss
      docs = engine.search([search.SearchRequest(question)]).documents[0]
      shown = [d for d in docs if f"{d.strip()}" in observation]
      counts.append(observation.count("Doc "))
      assert len(shown) == counts[-1] and sum(gold in d for d in shown) >= 1
      assert observation == template.render_observation(
          sorted(shown, key=lambda d: observation.index(d.strip())))
    assert max(counts) == most and min(counts) == 1


def test_the_reading_stage_checks_a_world_it_never_drilled(tmp_path):
  config = load_config("tiny_world", "ci")
  config.demo_worlds, config.reading_drills = 2, 3
  rows = demonstrations.reading_rows(config)
  train = [r for r in rows if r["split"] == "train"]
  test = [r for r in rows if r["split"] == "test"]
  assert train and test and all(r["target_loss"] == [1, 0, 1, 1] for r in train)
  assert all(r["target_loss"] == [0, 0, 0, 1] for r in test)  # the answer only
  drilled = {q["question"] for w in demonstrations.demonstration_worlds(config)
             for q in w["splits"]["train"]}
  this = {q["question"] for q in tinyworld.generate(config.seed, tinyworld.WorldSize.from_config(
      config.world))["splits"]["train"]}
  held = {r["prompt"][len("Question: "):].strip() for r in test}
  assert {r["prompt"][len("Question: "):].strip() for r in train} <= drilled
  assert held - drilled - this  # the check's world is neither drilled nor this one


def test_the_warm_starts_reading_check_is_a_world_it_never_saw():
  config = load_config("tiny_world", "ci")
  config.demo_worlds = 2
  rows = demonstrations.warm_start_rows(config)
  test = [r for r in rows if r["split"] == "test"]
  train = [r for r in rows if r["split"] == "train"]
  assert len(test) + len(train) == len(rows) and len(test) > 10
  questions = {q["question"]: q for q in demonstrations.held_out_world(config)["splits"]["train"]}
  for r in test:
    q = questions[r["prompt"].rsplit("Question: ", 1)[1].strip()]  # the held-out world's
    assert q["hops"] == 1 and r["format"] == "search"
    assert r["target_loss"] == [0, 0, 0, 1]  # the answer only
    assert q["golden_answers"][0] in r["target_segments"][1]  # the documents hold it
  # its facts are not demonstrated (a name of the shared pools may recur, its facts do not)
  seen = {(r["prompt"], r["target_segments"][-1]) for r in train}
  assert np.mean([(r["prompt"], r["target_segments"][-1]) in seen for r in test]) < 0.05


def test_balanced_relations_repeat_each_single_hop_relations_search_demonstrations():
  config = load_config("tiny_world", "ci")
  config.demo_worlds = 2
  plain = demonstrations.warm_start_rows(config)
  config.demo_balance_relations = True
  balanced = demonstrations.warm_start_rows(config)
  key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
  assert [r for r in balanced if r["split"] == "test"] == [r for r in plain if r["split"] == "test"]
  count = lambda rows: collections.Counter(  # noqa: E731
      r["relation"] for r in rows if r["split"] == "train" and r["hops"] == 1
      and r["format"] == "search")
  before, after = count(plain), count(balanced)
  most = max(before.values())
  assert len(before) == 5 and after[max(before, key=before.get)] == most
  for relation, n in before.items():  # whole copies: a multiple of the count, near the most
    assert after[relation] == n * round(most / n) and abs(after[relation] - most) <= n / 2
  # nothing else changes: the other rows are the plain ones, the extra rows copies
  assert collections.Counter(map(key, plain)) - collections.Counter(map(key, balanced)) == {}
  assert set(map(key, balanced)) == set(map(key, plain))


def test_a_reading_stage_that_did_not_learn_to_read_fails_and_is_made_again(tmp_path):
  config = load_config("tiny_world", "ci")
  config.progress = False
  config.demo_worlds = 1
  config.reading_drills, config.reading_steps = 3, 2  # far too short to read
  workdir = tmp_path / "run"
  (workdir / "world").mkdir(parents=True)
  tinyworld.ensure(workdir / "world", config.seed, tinyworld.WorldSize.from_config(config.world))
  run = stages.StageRun(config, workdir, "test")
  with pytest.raises(RuntimeError, match=r"reading_nll_max=0.25.*reading_steps"):
    stages.run_stage(run, pipeline.READING)
  assert not (workdir / "reading").exists()
  summary = json.loads((workdir / "reading.failed" / "sft_summary.json").read_text())
  assert summary["eval/nll"] > config.reading_nll_max
  config.reading_nll_max = 100.0  # a rerun makes the stage again from nothing
  stages.run_stage(run, pipeline.READING)
  again = [json.loads(line) for line in open(workdir / "reading" / "metrics.jsonl")]
  assert [r["step"] for r in again] == [1, 2]
  assert (workdir / "reading" / "hf_export" / "config.json").exists()


def test_a_warm_start_checked_by_relation_fails_on_its_worst_relation(tmp_path):
  config = load_config("tiny_world", "ci")
  config.progress = False
  config.demo_worlds = 1
  config.warm_start.sft.update(dict(total_steps=4, eval_every=2, stop_nll=1e-6, cooldown_steps=1,
                                    stop_group="relation", stop_passes=2))
  workdir = tmp_path / "run"
  (workdir / "world").mkdir(parents=True)
  tinyworld.ensure(workdir / "world", config.seed, tinyworld.WorldSize.from_config(config.world))
  run = stages.StageRun(config, workdir, "test")
  with pytest.raises(RuntimeError, match=r"NLL of its worst group is .* > "
                                         r"config.warm_start.sft.stop_nll=1e-06"):
    stages.run_stage(run, pipeline.WARM_START)
  summary = json.loads((workdir / "warm_start.failed" / "sft_summary.json").read_text())
  relations = {r["relation"] for r in demonstrations.reading_check_rows(config)}
  by_relation = {k.split("/")[-1]: v for k, v in summary.items() if k.startswith("eval/nll/")}
  assert set(by_relation) == relations and len(relations) > 1
  assert summary["eval/nll_worst"] == max(by_relation.values()) > summary["eval/nll"]
  assert summary["sft/formed_step"] == -1


def test_each_evaluated_format_is_in_the_warm_start_demonstrations():
  # The baselines are fair: the prompt evaluation gives each method (rendered by
  # the evaluator's own function, with the pipeline's instruction and top_k) is,
  # question for question, the prompt of a demonstration of that format.
  from zsjax import evaluate, search

  config = load_config("tiny_world", "ci")
  config.demo_worlds = 2
  rows = demonstrations.warm_start_rows(config)
  by_format = {}
  for r in rows:
    by_format.setdefault(r["format"], set()).add(r["prompt"])
  assert set(by_format) == set(demonstrations.DEMO_FORMATS)
  evaluated = {"warm_start": "search", "direct": "direct", "rag": "rag"}
  assert set(report.METHODS) - {"rl_simulator", "rl_real_search"} == set(evaluated)
  for world in demonstrations.demonstration_worlds(config):
    retriever = search.BM25Engine([d["contents"] for d in world["corpus"]], top_k=config.top_k)
    questions = [q["question"] for q in world["splits"]["train"]]
    for method, fmt in evaluated.items():
      prompts = evaluate.method_prompts(fmt, questions, None, retriever=retriever,
                                        search_instruction=config.instruction)
      found = [p in by_format[fmt] for p in prompts]
      # every question has a search demonstration; a share has each baseline's
      assert all(found) if fmt == "search" else 0.1 < np.mean(found) < 0.35, (fmt, found)


def test_demonstrations_do_not_depend_on_the_hash_seed():
  # Python randomises str hashes per process, so anything built from set order
  # would differ between two runs of the same config.
  import os
  import subprocess
  import sys

  code = ("import hashlib, json; from zsjax import demonstrations, search, tinyworld; "
          "w = tinyworld.generate(5, tinyworld.WorldSize(people=12, films=4, cities=6, "
          "countries=3, organizations=3)); "
          "e = search.BM25Engine([d['contents'] for d in w['corpus']], top_k=3); "
          "rows = demonstrations.demonstrations(w, e, 'Answer.', seed=1, bridge_fraction=0.5, "
          "baseline_fraction=0.2); "
          "print(hashlib.sha256(json.dumps(rows).encode()).hexdigest())")
  digests = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, env={**os.environ, "PYTHONHASHSEED": str(s)}
                            ).stdout.strip() for s in (1, 2, 3)}
  assert len(digests) == 1


def test_stage_cache_makes_each_stage_once_per_config(tmp_path):
  calls = []

  def stage(workdir, name, inputs, reused):
    def make(run):
      calls.append((workdir.name, name))
      (workdir / name / "done.json").write_text("{}")
    config.seed = inputs.get("seed", 0)
    run = stages.StageRun(config, workdir, "test", cache=cache, common=("seed",),
                          seconds=seconds[workdir.name], reused=reused,
                          keys={"world": inputs.get("world")})
    after = ("world",) if "world" in inputs else ()
    return stages.run_stage(run, stages.Stage(name, f"{name}/done.json", make, after=after))

  config = load_config("tiny_world", "ci")
  config.progress = False
  cache = stages.StageCache(tmp_path / "cache")
  a, b, c = (tmp_path / n for n in "abc")
  for w in (a, b, c):
    w.mkdir()
  seconds = {"a": {}, "b": {}, "c": {}}
  reused_a, reused_b = [], []
  key_a = stage(a, "world", {"seed": 0}, reused_a)
  key_b = stage(b, "world", {"seed": 0}, reused_b)
  assert key_a == key_b and calls == [("a", "world")]  # made once, linked into b
  assert (b / "world").resolve() == (a / "world").resolve() == cache.root / "world" / key_a
  assert reused_a == [] and reused_b == ["world"]
  assert seconds["b"]["world"] == seconds["a"]["world"]  # the cost of making it
  # another config is another entry; a stage reading it gets another key too
  key_c = stage(c, "world", {"seed": 1}, [])
  assert key_c != key_a and calls[-1] == ("c", "world")
  assert stage(a, "pretrain", {"world": key_a}, []) != stage(c, "pretrain", {"world": key_c}, [])
  # a workdir whose link points at another config's entry is refused, not mixed up
  with pytest.raises(ValueError, match="stage_cache"):
    stage(a, "world", {"seed": 1}, [])
  # a finished stage made without the cache is adopted, not recomputed
  d = tmp_path / "d"
  (d / "world").mkdir(parents=True)
  (d / "world" / "done.json").write_text("{}")
  seconds["d"] = {"world": 12.5}
  key_d = stage(d, "world", {"seed": 2}, [])
  assert (d / "world").is_symlink() and (cache.root / "world" / key_d / "done.json").exists()
  assert cache.made(cache.root / "world" / key_d)["seconds"] == 12.5
  assert calls[-1] != ("d", "world")


def test_paired_gains_by_hand():
  def rec(method, qid, em, split="single_hop"):
    return {"method": method, "set": split, "id": qid, "em": em}

  base = [1.0, 0.0, 0.0, 1.0]
  other = [1.0, 1.0, 0.0, 0.0]
  rl = [1.0, 1.0, 1.0, 1.0]
  records = ([rec("warm_start", f"q{i}", e) for i, e in enumerate(base)]
             + [rec("rag", f"q{i}", e) for i, e in reversed(list(enumerate(other)))]
             + [rec("rl_simulator", f"q{i}", e) for i, e in enumerate(rl)])
  gains = report.paired_gains(records)
  # differences 0, +1, 0, -1: mean 0, sample std sqrt(2/3), stderr sqrt(2/3) / 2
  assert gains["rag"] == {"em": 0.0, "stderr": pytest.approx((2 / 3) ** 0.5 / 2), "n": 4}
  # differences 0, +1, +1, 0: mean 0.5, sample std sqrt(1/3), stderr sqrt(1/3) / 2
  assert gains["rl_simulator"]["em"] == 0.5
  assert gains["rl_simulator"]["stderr"] == pytest.approx((1 / 3) ** 0.5 / 2)
  assert "warm_start" not in gains
  with pytest.raises(ValueError, match="other questions"):
    report.paired_gains(records + [rec("rag", "q9", 1.0, "two_hop")])


def test_parallel_runs_make_a_cache_entry_once(tmp_path):
  """Two runs that need the same entry at once: one makes it, the other waits
  for its lock and links it (a sweep's points launched in parallel)."""
  import threading
  import time

  config = load_config("tiny_world", "ci")
  config.progress = False
  cache = stages.StageCache(tmp_path / "cache")
  calls, started = [], threading.Event()

  def make(workdir):
    def fn(run):
      calls.append(workdir.name)
      started.set()
      time.sleep(0.5)  # the other run asks for the entry meanwhile
      (workdir / "world" / "done.json").write_text("{}")
    return fn

  def run(name, reused):
    workdir = tmp_path / name
    workdir.mkdir()
    run = stages.StageRun(config, workdir, "test", cache=cache, common=("seed",), reused=reused)
    stages.run_stage(run, stages.Stage("world", "world/done.json", make(workdir)))

  reused_a, reused_b = [], []
  first = threading.Thread(target=run, args=("a", reused_a))
  first.start()
  assert started.wait(10)
  run("b", reused_b)  # blocks on the lock until a is done
  first.join()
  assert calls == ["a"] and reused_a == [] and reused_b == ["world"]
  assert (tmp_path / "b" / "world" / "done.json").exists()


def test_ci_sized_pipeline_runs_every_stage(tmp_path, capsys, monkeypatch):
  if optimized(__file__, "test_ci_sized_pipeline_runs_every_stage", tmp_path):
    return  # it ran in a child process, compiled at XLA's default level (conftest.py)
  config = load_config("tiny_world", "ci")
  config.progress = False
  config.stage_cache = str(tmp_path / "stages")
  results = pipeline.run(config, str(tmp_path))
  for method in report.METHODS:
    for split in report.SPLITS:
      for metric in ("em", "substring_em", "f1"):
        assert 0.0 <= results["methods"][method][split][metric] <= 1.0
  assert set(results["stage_seconds"]) == {"world", "pretrain", "sim_tuning", "warm_start",
                                           "rl_simulator", "rl_real_search", "evaluate"}
  on_disk = json.loads((tmp_path / "results.json").read_text())
  assert on_disk["methods"] == results["methods"]
  # the paired gain's mean is the difference of the two rows' means
  for method, gain in results["gains_over_warm_start"].items():
    assert gain["em"] == pytest.approx(results["methods"][method]["all"]["em"]
                                       - results["methods"]["warm_start"]["all"]["em"])
  assert set(results["gains_over_warm_start"]) == set(report.METHODS) - {"warm_start"}
  # The warm start reads: RAG (a format it was trained on, with BM25's documents for
  # the question) beats answering directly, which a policy that knows no facts of
  # this world cannot do.
  assert results["methods"]["rag"]["all"]["em"] > results["methods"]["direct"]["all"]["em"]
  # its held-out reading check (no early stop in the CI run): measured before and after
  warm = results["warm_start"]
  assert warm["steps"] == config.warm_start.sft.total_steps and "formed_step" not in warm
  assert warm["reading_nll"] < warm["reading_nll_before"]
  control = results["simulator_control"]["groups"]
  assert set(control) == set(report.CONTROL_GROUPS) | {"answerable"}
  assert control["answerable"]["queries"] == (control["single_hop_question"]["queries"]
                                              + control["bridge"]["queries"])
  env = results["environment"]
  assert env["cores"] >= 1 and env["cpu"] and env["packages"]["jax"] != "not installed"
  assert set(results["gains_over_rag"]) == set(report.METHODS) - {"rag"}
  for plot in ("reward_f1", "reward_em", "rollout_searches", "curriculum_p_noise"):
    assert (tmp_path / "plots" / f"{plot}.png").stat().st_size > 1000
  for stage in ("pretrain", "warm_start", "rl_simulator", "rl_real_search"):
    assert any((tmp_path / stage / "tensorboard").iterdir())
    assert (tmp_path / stage / "checkpoints").exists()
  assert (tmp_path / "final_policy" / "config.json").exists()
  assert "| rl_simulator |" in (tmp_path / "results.md").read_text()
  steps = config.rl.rl.total_steps
  # RL improved the training reward (answer F1 of the step's 32 trajectories, on the
  # CI run's 4 training questions): the mean of the last five steps against the first
  # five, against the simulator and against BM25 (seed 0, one core, no fake devices:
  # 0.006 -> 0.062 and 0.044 -> 0.154; a five-step mean's noise is ~0.02). With the
  # earlier 3e-3 warm start seed 1 rose only 0.019 -> 0.042 and 0.039 -> 0.045: this is
  # a seed-0 check, not a property of every seed.
  for stage in ("rl_simulator", "rl_real_search"):
    records = [json.loads(line) for line in open(tmp_path / stage / "metrics.jsonl")]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    f1 = [r["reward/f1"] for r in records]
    assert np.mean(f1[-5:]) > np.mean(f1[:5]) + 0.03, (stage, f1)
    assert records[0]["curriculum/p_noise"] < records[-1]["curriculum/p_noise"]
  samples = [json.loads(line) for line in open(tmp_path / "rl_simulator" / "samples.jsonl")]
  # RL asked only the first `questions` training questions
  train = pipeline._parquet_rows(tinyworld.paths(tmp_path / "world")["train"])
  asked = {s["prompt"].split("Question: ")[-1].strip() for s in samples}
  assert asked <= {q["question"] for q in train[:config.rl.data.limit]}
  # decoded sample trajectories: the answer scored is the one the policy wrote
  assert [s["step"] for s in samples] == [k for k in range(1, steps + 1) for _ in range(4)]
  for s in samples:
    assert "Question:" in s["prompt"] and s["prompt"] not in s["response"]
    if s["answer"] is not None:
      assert f"<answer>{s['answer']}" in s["response"].replace("<answer> ", "<answer>")
    if s["answer"] is None:
      assert s["reward"] == 0.0
    elif s["answer"].strip() in s["golden_answers"]:
      assert s["reward"] == 1.0
    else:
      assert 0.0 <= s["reward"] <= 1.0

  # Evaluating the final policy through the harness job reproduces its row.
  from zsjax import evaluate

  eval_config = load_config("eval", "tiny")
  world = tinyworld.paths(tmp_path / "world")
  eval_config.update_from_flattened_dict({
      "progress": False, "synthetic_data": False, "tokenizer": world["tokenizer"],
      "policy.checkpoint": str(tmp_path / "rl_simulator" / "hf_export"),
      "engine.corpus": world["corpus"], "engine.top_k": config.top_k,
      "simulator.template": config.simulator_template,
      "simulator.max_prefix_tokens": config.rl.simulator.max_prefix_tokens,
      "eval.methods": "search", "eval.sample_size": config.eval_sample_size,
      "eval.batch_size": config.eval_batch_size, "eval.prompt_width": config.eval_prompt_width,
      "eval.sets": f"single_hop={world['test_single_hop']},two_hop={world['test_two_hop']}"})
  eval_config.instruction = config.instruction
  for key in ("max_turns", "max_new_tokens", "max_obs_tokens", "max_length", "max_query_tokens"):
    eval_config.rollout[key] = config.rl.rollout[key]
  again = evaluate.run(eval_config, str(tmp_path / "eval"))["methods"]["search"]
  for split in ("single_hop", "two_hop"):
    for metric in ("em", "substring_em", "f1"):
      assert again[split][metric] == pytest.approx(
          results["methods"]["rl_simulator"][split][metric]), (split, metric)

  capsys.readouterr()
  config.progress = True
  pipeline.run(config, str(tmp_path))  # resumes: every stage skipped
  out = capsys.readouterr().out
  assert out.count("output exists, skipped") == 7
  assert json.loads((tmp_path / "results.json").read_text())["reused_stages"] == []

  # Another workdir with the same config and the cache: every training stage is
  # reused, and without RL against BM25 the evaluation is asked for every method but
  # that one. (The evaluation itself, which reads only the policies and the world,
  # is the first run's, handed back by stand-ins: re-running it here cost ~25 s.)
  config.progress = False
  config.compare_real_search = False
  asked = []

  def evaluate_policies(config, workdir, paths, tokenizer_dir, instruction, methods):
    asked.append(list(methods))
    kept = [r for r in read_jsonl(tmp_path / "predictions.jsonl") if r["method"] in methods]
    write_jsonl(workdir / "predictions.jsonl", kept)
    return {m: results["methods"][m] for m in methods}

  monkeypatch.setattr(pipeline, "evaluate_policies", evaluate_policies)
  monkeypatch.setattr(report, "controllability", lambda *a: results["simulator_control"])
  other = pipeline.run(config, str(tmp_path / "other"))
  assert other["reused_stages"] == ["world", "pretrain", "sim_tuning", "warm_start",
                                    "rl_simulator"]
  assert not (tmp_path / "other" / "rl_real_search").exists()
  assert asked == [[m for m in report.METHODS if m != "rl_real_search"]]
  assert "| rl_real_search |" not in (tmp_path / "other" / "results.md").read_text()
  assert other["stage_seconds"]["warm_start"] == results["stage_seconds"]["warm_start"]


def test_control_queries_ask_the_question_its_bridge_and_another_entity():
  world = tinyworld.generate(3, tinyworld.WorldSize(people=12, films=4, cities=6, countries=3,
                                                    organizations=3))
  questions = world["splits"]["test"]
  docs = {d["title"]: d["contents"] for d in world["corpus"]}
  rows = report.control_queries(questions, list(docs), seed=0)
  for q in questions:
    mine = {r["group"]: r for r in rows if r["question"] == q["question"]}
    own = "single_hop_question" if q["hops"] == 1 else "two_hop_question"
    assert mine[own]["query"] == q["question"]
    if q["hops"] == 2:  # the bridge's own document holds the answer
      assert any(g in docs[mine["bridge"]["query"]] for g in q["golden_answers"])
      assert mine["bridge"]["query"] == q["bridge"]
    if "other_question" in mine:
      other = next(o for o in questions if o["question"] == mine["other_question"]["query"])
      assert other["relation"] == q["relation"] and other["question"] != q["question"]
    assert all(r["golden_answers"] == q["golden_answers"] for r in mine.values())
    for r in mine.values():  # the subject is the entity the query is about
      assert r["subject"] in r["query"] and r["subject"] in docs
      if r["group"] in report.ANSWERABLE:  # the subject's own document answers it
        assert report.answers([docs[r["subject"]]], r["subject"], r["golden_answers"])
    if "other_question" in mine:
      assert mine["other_question"]["subject"] != mine[own]["subject"]


def test_a_document_answers_a_query_when_it_names_the_subject_and_the_answer():
  docs = ["Tulzios is a sculptor born in Pidrin.", "Gromdrem is a physician born in Zumho."]
  assert report.answers(docs, "Tulzios", ["Pidrin"])
  assert not report.answers(docs, "Tulzios", ["Zumho"])  # the answer, about someone else
  assert not report.answers([], "Tulzios", ["Pidrin"])


def test_source_metrics_by_hand():
  from types import SimpleNamespace

  from zsjax import rl_step

  traj = SimpleNamespace(searches=np.array([1, 2, 1, 3]))
  scores = SimpleNamespace(f1=np.array([1.0, 0.5, 0.0, 0.25]), em=np.array([1.0, 0.0, 0.0, 0.0]))
  got = rl_step.source_metrics(traj, scores, ["a", "b", "a", "b"])
  assert got == {"reward/f1/a": 0.5, "reward/em/a": 0.5, "rollout/searches/a": 1.0,
                 "reward/f1/b": 0.375, "reward/em/b": 0.0, "rollout/searches/b": 2.5}


def test_environment_names_the_machine_packages_and_commit():
  import os
  import subprocess

  from zsjax import environment

  env = environment.describe()
  assert env["cores"] == len(os.sched_getaffinity(0)) and env["machine_cores"] >= env["cores"]
  assert env["packages"]["jax"] == __import__("jax").__version__
  head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True,
                        text=True, cwd=os.path.dirname(pipeline.__file__))
  if head.returncode == 0:
    assert env["commit"].split("+")[0] == head.stdout.strip()


def test_shuffled_documents_are_the_engines_in_another_order_and_nothing_else_changes():
  config = load_config("tiny_world", "ci")
  config.demo_worlds = 2
  plain = demonstrations.warm_start_rows(config)
  config.demo_shuffle_documents = True
  shuffled = demonstrations.warm_start_rows(config)
  assert len(plain) == len(shuffled)
  docs_of = lambda seg: re.findall(r"Doc \d+: (.*?)(?=\nDoc \d+:|</information>)", seg, re.S)  # noqa: E731
  moved, gold_first = 0, {False: [], True: []}
  for a, b in zip(plain, shuffled):
    # the same question, format, split and draws (bridges, baselines); only the order differs
    same = lambda r: {k: v for k, v in r.items() if k not in ("prompt", "target", "target_segments")}  # noqa: E731
    assert same(a) == same(b)
    if b["format"] == "rag":  # the RAG baseline shows the first search's documents: shuffled too
      lines = lambda r: sorted(re.sub(r"^Doc \d+: ", "", x) for x in r["prompt"].splitlines())  # noqa: E731
      assert lines(a) == lines(b)
    else:
      assert a["prompt"] == b["prompt"]
    assert len(a["target_segments"]) == len(b["target_segments"])
    for sa, sb in zip(a["target_segments"], b["target_segments"]):
      if not sa.startswith("\n\n<information>"):
        assert sa == sb
        continue
      assert sorted(docs_of(sa)) == sorted(docs_of(sb)) and sb == template.render_observation(docs_of(sb))
      moved += sa != sb
    if b["format"] == "search" and b["hops"] == 1:
      gold = b["target_segments"][-1][1:-len(" </answer>")]
      for shuffle, row in ((False, a), (True, b)):
        gold_first[shuffle].append(gold in docs_of(row["target_segments"][1])[0])
  assert moved > len(plain) / 4
  # in the engine's order the answer is in Doc 1; shuffled, often elsewhere (some
  # answers are in two documents: a country in its cities')
  assert np.mean(gold_first[False]) > 0.95 and np.mean(gold_first[True]) < 0.75
  test = [r for r in shuffled if r["split"] == "test"]
  assert test and sum(r != p for r, p in zip(test, [r for r in plain if r["split"] == "test"])) > 0


def test_reading_order_moves_the_answers_document_and_keeps_the_rest():
  sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
  import reading_order

  docs = ["Ab is a city. Country: Cd.", "Ef is a city. Country: Gh.", "Ij is a city. Country: Kl."]
  segments = ["<search> q </search>", template.render_observation(docs), "<answer>", " Cd </answer>"]
  row = {"prompt": "p", "target_segments": segments, "target": "".join(segments)}
  for position, want in (("first", docs), ("second", [docs[1], docs[0], docs[2]]),
                         ("last", [docs[1], docs[2], docs[0]])):
    out = reading_order.moved(row, position)
    assert out["target_segments"][1] == template.render_observation(want)
    assert out["target"] == "".join(out["target_segments"]) and out["target_segments"][2:] == segments[2:]
  one = dict(row, target_segments=[segments[0], template.render_observation(docs[:1])] + segments[2:])
  assert reading_order.moved(one, "last") is None
  # a citation (demo_think="cite") follows its document, the cited one where another
  # document also holds the answer (a country's lists its cities)
  docs = ["Cd is a country. Cities of Cd: Ab, Ef.", "Ab is a city. Country of Ab: Cd.",
          "Ij is a city. Country of Ij: Kl."]
  cited = [segments[0], template.render_observation(docs), "<think> Doc 2: Country of Ab:",
           " Cd </think>"] + segments[2:]
  cited = {"prompt": "p", "target_segments": cited, "target": "".join(cited)}
  for position, number, want in (("first", 1, [docs[1], docs[0], docs[2]]),
                                 ("second", 2, docs), ("last", 3, [docs[0], docs[2], docs[1]])):
    out = reading_order.moved(cited, position)
    assert out["target_segments"][1] == template.render_observation(want)
    assert out["target_segments"][2] == f"<think> Doc {number}: Country of Ab:"
    assert out["target_segments"][3:] == cited["target_segments"][3:]


@pytest.mark.parametrize("style,version", [("quote", 3), ("cite", 3), ("cite", 5)])
def test_think_quotes_the_documents_clause_for_what_each_search_sought(style, version):
  config = load_config("tiny_world", "ci")
  config.demo_worlds, config.world.version = 2, version
  plain = demonstrations.warm_start_rows(config)
  config.demo_think = style
  thinking = demonstrations.warm_start_rows(config)
  assert len(plain) == len(thinking)
  quotes = 0
  for a, b in zip(plain, thinking):
    assert a["prompt"] == b["prompt"] and a["format"] == b["format"]
    think = [i for i, s in enumerate(b["target_segments"]) if s.startswith("<think> ")]
    # without the quotes, the same target and loss as before
    keep = [i for i in range(len(b["target_segments"])) if i not in think and i - 1 not in think]
    assert [b["target_segments"][i] for i in keep] == a["target_segments"]
    if b["split"] == "train":
      assert [b["target_loss"][i] for i in keep] == a["target_loss"]
    if b["format"] == "direct":
      assert not think
    for i in think:
      key, value = b["target_segments"][i][len("<think> "):], b["target_segments"][i + 1]
      assert value.endswith(" </think>")
      value = value[1:-len(" </think>")]
      # the quote is a clause of a document the search showed, about the query's subject
      context = b["prompt"] if b["format"] == "rag" else b["target_segments"][i - 1]
      query = (b["prompt"] if b["format"] == "rag" else
               re.fullmatch(r"<search> (.*) </search>", b["target_segments"][i - 2]).group(1))
      docs = re.findall(r"Doc (\d+): (.*?)(?=\nDoc \d+:|</information>|\n|$)", context)
      if style == "cite":  # "Doc k: " and then the clause of that very document
        number, key = re.fullmatch(r"Doc (\d+): (.*)", key).groups()
        docs = [(n, d) for n, d in docs if n == number]
      doc = next(d for _, d in docs if f"{key} {value}." in d)
      subject = doc.split(" is ")[0]
      assert subject in query and "Doc" not in key
      if version == 3:  # "Employer of Liomves:"
        assert key.endswith(f" of {subject}:")
      else:  # "Liomves employer": the subject and the field, right before the name
        assert key.split()[0] == subject and len(key.split()) == 2
      gold = b["target_segments"][-1][1:-len(" </answer>")]
      # the answer, or the bridge entity: what the next search looks up, or (a two-hop
      # question answered after one search) not the answer
      after = b["target_segments"][i + 2]
      searches = sum(s.startswith("<search> ") for s in b["target_segments"])
      if b["hops"] == 1:
        assert value == gold and after == "<answer>"
      elif after.startswith("<search> "):
        assert after == f"<search> {value} </search>" and value != gold
      elif searches == 2:  # the second search's quote
        assert value == gold and after == "<answer>"
      else:
        assert value != gold and after == "<answer>"
      quotes += 1
    if b["split"] == "test":  # the check's loss is on the quote's name, the first written
      assert think and b["target_loss"] == [int(i == think[0] + 1) for i in range(len(b["target_loss"]))]
      assert a["target_loss"] == [0] * (len(a["target_loss"]) - 1) + [1]  # without: the answer's
  assert quotes > len(thinking) / 2
  config.demo_think = "yes"
  with pytest.raises(ValueError, match=r"config.demo_think='yes'.*'quote'"):
    demonstrations.warm_start_rows(config)
