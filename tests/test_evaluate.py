"""The evaluation harness: data in every format (malformed rows included), every set
and method in the table, counts equal to the fixtures, and per-question records
that reproduce the averages."""

import dataclasses
import json
import re
from pathlib import Path

import datasets
import numpy as np
import pytest

from zsjax import data
from zsjax import evaluate as E
from zsjax.sampling import Greedy

from config_files import load_config



def write_fixtures(directory: Path, world) -> dict[str, int]:
  """Three sets in three formats with malformed rows; returns the good-row counts."""
  test = datasets.Dataset.from_parquet(world["test"]).to_list()
  # common format, jsonl, with a row without answers and a broken line
  rows = [{"id": r["id"], "question": r["question"], "golden_answers": r["golden_answers"]}
          for r in test[:5]]
  rows.insert(2, {"id": "bad", "question": "No answers?", "golden_answers": []})
  data.write_jsonl(directory / "nq.jsonl", rows)
  with open(directory / "nq.jsonl", "a") as f:
    f.write("{broken\n")
  # a .json list, answers as a single string
  (directory / "popqa.json").write_text(json.dumps(
      [{"question": r["question"], "golden_answers": r["golden_answers"][0]} for r in test[5:12]]))
  # the reference training parquet format: question only inside the chat prompt
  train_rows = [{"data_source": "hotpotqa",
                 "prompt": [{"role": "user", "content": f"Instructions...\nQuestion: {r['question']}\n"}],
                 "reward_model": {"ground_truth": {"target": r["golden_answers"]}, "style": "rule"},
                 "extra_info": {"index": i, "split": "test"}} for i, r in enumerate(test[12:15])]
  train_rows.append({"data_source": "hotpotqa", "prompt": [{"role": "user", "content": "none"}],
                     "reward_model": {"ground_truth": {"target": ["x"]}, "style": "rule"},
                     "extra_info": {"index": 9, "split": "test"}})
  datasets.Dataset.from_list(train_rows).to_parquet(str(directory / "hotpotqa.parquet"))
  return {"nq": 5, "popqa": 7, "hotpotqa": 3}


def test_loaders_report_malformed_rows_with_file_row_and_field(tmp_path, world):
  write_fixtures(tmp_path, world)
  report = []
  ds = data.load_qa(tmp_path / "nq.jsonl", report=report)
  assert len(ds) == 5 and len(report[0].skipped) == 2
  assert report[0].skipped[0][1:] == (3, report[0].skipped[0][2])
  assert "no gold answer" in report[0].skipped[0][2]
  with pytest.raises(data.DataError, match=r"nq.jsonl, row 3: no gold answer"):
    data.load_qa(tmp_path / "nq.jsonl", on_error="raise")
  hotpot = data.load_qa(tmp_path / "hotpotqa.parquet")
  test = datasets.Dataset.from_parquet(world["test"]).to_list()
  assert hotpot["question"] == [r["question"] for r in test[12:15]]
  assert hotpot["id"] == ["hotpotqa-0", "hotpotqa-1", "hotpotqa-2"]
  with pytest.raises(data.DataError, match="offline"):
    data.load_benchmark("nq")  # tests run with HF_HUB_OFFLINE=1


def test_a_path_string_is_a_comma_list_unless_it_is_one_file(tmp_path, world):
  counts = write_fixtures(tmp_path, world)
  both = data.load_qa(f"{tmp_path / 'nq.jsonl'},{tmp_path / 'popqa.json'}")
  assert len(both) == counts["nq"] + counts["popqa"]
  odd = tmp_path / "run+seed=1,lr=3e-4"  # a sweep-style directory with a comma
  odd.mkdir()
  (odd / "nq.jsonl").write_text((tmp_path / "nq.jsonl").read_text())
  assert data.load_qa(str(odd / "nq.jsonl"))["question"] == both["question"][:counts["nq"]]


def test_summarize_on_literal_records():
  records = [{"set": "a", "em": 1.0, "substring_em": 1.0, "f1": 1.0},
             {"set": "a", "em": 0.0, "substring_em": 1.0, "f1": 0.5},
             {"set": "b", "em": 0.0, "substring_em": 0.0, "f1": 0.25}]
  out = E.summarize(records)
  assert out["a"] == {"em": 0.5, "substring_em": 1.0, "f1": 0.75, "count": 2}
  assert out["b"]["count"] == 1 and out["b"]["f1"] == 0.25
  assert out["average"]["em"] == 0.25 and out["average"]["f1"] == 0.5  # mean over sets


def test_prompts_of_each_method():
  rag = E.method_prompt("rag", "Who?", documents=["Ann lives in Lund."])
  assert "Doc 1: Ann lives in Lund." in rag and rag.rstrip().endswith("Question: Who?")
  assert "<search>" in E.method_prompt("search", "Who?")
  assert "<search>" not in E.method_prompt("direct", "Who?")
  with pytest.raises(ValueError, match="evaluation method 'beam'"):
    E.method_prompt("beam", "Who?")


def test_eval_job_covers_every_set_method_and_question(tmp_path, world):
  counts = write_fixtures(tmp_path, world)
  config = load_config("eval", "tiny")
  config.progress = False
  config.synthetic_data = False
  config.tokenizer = world["tokenizer"]
  config.engine.corpus = world["corpus"]
  config.eval.sets = ",".join(f"{name}={tmp_path / file}" for name, file in
                              (("nq", "nq.jsonl"), ("popqa", "popqa.json"),
                               ("hotpotqa", "hotpotqa.parquet")))
  config.eval.batch_size = 4  # 5, 7 and 3 questions: every set has a partial batch
  config.rollout.max_new_tokens = 10
  out = tmp_path / "out"
  results = E.run(config, str(out))
  assert set(results["methods"]) == set(E.METHODS)
  assert results["skipped_rows"] == {"nq": 2, "popqa": 0, "hotpotqa": 1}
  records = [json.loads(line) for line in open(out / "predictions.jsonl")]
  for method, sets in results["methods"].items():
    assert {k: v["count"] for k, v in sets.items() if k != "average"} == counts
    for name, n in counts.items():
      rows = [r for r in records if r["method"] == method and r["set"] == name]
      assert len(rows) == n and len({r["id"] for r in rows}) == n
      for metric in E.METRICS:
        assert sets[name][metric] == pytest.approx(np.mean([r[metric] for r in rows]))
    assert sets["average"]["em"] == pytest.approx(np.mean([sets[s]["em"] for s in counts]))
    if method != "search":
      assert all(r["searches"] == 0 for r in records if r["method"] == method)
  table = (out / "results.md").read_text()
  for method in E.METHODS:
    for name in counts:
      assert f"| {method} | {name} |" in table
  assert len((out / "results.csv").read_text().splitlines()) == 1 + 4 * 4
  # the paper's EM is substring EM: its column says so and comes first
  header = table.splitlines()[0]
  assert header.index("EM (paper's: gold inside answer)") < header.index("strict EM")
  assert "qa_em.py" in table


def test_the_papers_em_is_substring_em():
  """qa_em.py of the reference counts a hit when the normalised gold lies inside
  the normalised prediction; zsjax's substring_em is that, em is strict."""
  assert E.METRICS[0] == "substring_em" and "paper" in E.METRIC_TITLES["substring_em"]
  scores = E._score("Paris, France", ["paris"])
  assert scores["substring_em"] == 1.0 and scores["em"] == 0.0
  # the eval config quotes the paper's number beside the column that can match it
  doc = (Path(__file__).parents[1] / "configs" / "eval.py").read_text().split('"""')[1]
  assert "40.93" in doc and "substring_em" in doc.split("40.93")[1][:300]


def test_prompt_format_travels_with_the_checkpoint(tmp_path):
  """The paper arm evaluates in the policy's training format (chat template on,
  its instruction), read from the export; without one it asks rather than guess."""
  from zsjax import template

  config = load_config("eval", "paper")
  assert config.prompt_format == "checkpoint"
  config.policy.checkpoint = str(tmp_path)
  with pytest.raises(ValueError, match="config.prompt_format='checkpoint'"):
    E.prompt_format(config)
  template.save_prompt_format(tmp_path, chat_template=True, instruction="Search, then answer.")
  assert E.prompt_format(config) == (True, "Search, then answer.", "zsjax")
  config.instruction = "Another instruction."
  with pytest.raises(ValueError, match="config.instruction differs"):
    E.prompt_format(config)
  config.prompt_format = "plain"
  assert E.prompt_format(config) == (False, "Another instruction.", "search_r1")


def test_simulated_engine_noise_comes_from_the_config():
  config = load_config("eval", "paper")
  assert config.simulator.noise_probability == 0.0
  assert E.rollout_config_of(config).noise_probability(500) == 0.0
  config.simulator.noise_probability = 0.3
  assert E.rollout_config_of(config).noise_probability(1) == pytest.approx(0.3)


# ------------------------------------------------------------- bad input, kept going


def test_a_byte_order_mark_does_not_cost_the_first_row(tmp_path):
  rows = [{"question": f"Q{i}?", "golden_answers": ["a"]} for i in range(3)]
  path = data.write_jsonl(tmp_path / "bom.jsonl", rows)
  path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
  (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(rows).encode())
  assert data.load_qa(path)["question"] == ["Q0?", "Q1?", "Q2?"]
  assert len(data.load_qa(tmp_path / "bom.json")) == 3


def test_text_that_is_not_utf8_costs_one_row_and_names_it(tmp_path):
  """A stray latin-1 byte is that row's error (skipped or raised, naming file, row and
  byte), not the whole file's; gzip files read as their contents; UTF-16 is named
  with the command that converts it; a corpus line that is not UTF-8 is named."""
  import gzip

  from zsjax import search

  rows = [{"question": f"Q{i}?", "golden_answers": ["a"]} for i in range(3)]
  path = data.write_jsonl(tmp_path / "rows.jsonl", rows)
  lines = path.read_bytes().splitlines(keepends=True)
  lines[1] = lines[1].replace(b"Q1", b"Q\xe91")  # latin-1 e-acute
  path.write_bytes(b"".join(lines))
  report = []
  assert data.load_qa(path, report=report)["question"] == ["Q0?", "Q2?"]
  assert report[0].skipped[0][1] == 2 and "byte 0xe9" in report[0].skipped[0][2]
  with pytest.raises(data.DataError, match=r"rows.jsonl, row 2: not UTF-8 text \(byte 0xe9"):
    data.load_qa(path, on_error="raise")
  (tmp_path / "rows.json").write_bytes(b"[\n" + json.dumps(rows[0]).encode().replace(
      b"Q0", b"Q\xe90") + b"\n]")
  with pytest.raises(data.DataError, match=r"rows.json: not UTF-8 text \(byte 0xe9 on line 2\)"):
    data.load_qa(tmp_path / "rows.json")

  packed = tmp_path / "rows.jsonl.gz"
  packed.write_bytes(gzip.compress(data.write_jsonl(tmp_path / "ok.jsonl", rows).read_bytes()))
  loaded = data.load_qa(packed)
  assert loaded["question"] == ["Q0?", "Q1?", "Q2?"] and loaded["data_source"][0] == "rows"
  cut = tmp_path / "cut.jsonl.gz"  # a download that broke off
  many = data.write_jsonl(tmp_path / "many.jsonl", rows * 300).read_bytes()
  cut.write_bytes(gzip.compress(many)[:len(gzip.compress(many)) // 2])
  with pytest.raises(data.DataError, match=r"cut.jsonl.gz: not a readable gzip file"):
    data.load_qa(cut)
  hidden = tmp_path / "hidden.jsonl"  # compressed under a plain name
  hidden.write_bytes(packed.read_bytes())
  assert len(data.load_qa(hidden)) == 3

  wide = tmp_path / "wide.jsonl"
  wide.write_bytes((tmp_path / "ok.jsonl").read_text().encode("utf-16"))
  with pytest.raises(data.DataError, match=r"wide.jsonl: the file is UTF-16.*iconv -f UTF-16"):
    data.load_qa(wide)

  corpus = tmp_path / "corpus.jsonl"
  corpus.write_bytes(b'{"contents": "Ann lives in Lund."}\n{"contents": "Bo \xe9 Oslo."}\n')
  with pytest.raises(ValueError, match=r"corpus.jsonl:2: not UTF-8 text \(byte 0xe9"):
    search.BM25Engine.from_jsonl(corpus)
  corpus_gz = tmp_path / "corpus.jsonl.gz"
  corpus_gz.write_bytes(gzip.compress(b'{"contents": "Ann lives in Lund."}\n'
                                      b'{"contents": "Bo sails from Oslo."}\n'))
  assert len(search.BM25Engine.from_jsonl(corpus_gz).corpus) == 2


def test_rows_left_out_by_one_method_are_left_out_of_all_unless_none_remain(tmp_path):
  def records(method, set_name, ids):
    return [{"set": set_name, "id": i, "method": method, **{m: 1.0 for m in E.METRICS}}
            for i in ids]

  by_method = {"direct": records("direct", "a", "123") + records("direct", "b", "12"),
               "rag": records("rag", "a", "13")}  # rag left out a/2 and all of b
  skipped = [{"set": "a", "method": "rag", "id": "2"}, {"set": "b", "method": "rag", "id": "1"},
             {"set": "b", "method": "rag", "id": "2"}]
  results = {"methods": {m: E.summarize(r) for m, r in by_method.items()}}
  E._restrict_to_common_rows(results, by_method, skipped)
  assert results["left_out"] == {"a": ["2"]} and results["not_comparable"] == ["b"]
  assert results["methods"]["direct"]["a"]["count"] == 2  # the rows rag answered too
  assert results["methods"]["direct"]["b"]["count"] == 2  # b: nothing in common, kept
  assert "Not comparable" in E.write_tables(results, tmp_path)


def test_bad_eval_settings_name_the_field_before_anything_is_written(tmp_path):
  for field, value, needle in (("methods", " , ", "config.eval.methods=' , ' names no method"),
                               ("methods", "search,cot2", "config.eval.methods has 'cot2'"),
                               ("batch_size", 0, "config.eval.batch_size=0 must be a positive"),
                               ("sample_size", -1, "config.eval.sample_size=-1 must be >= 0")):
    config = load_config("eval", "tiny")
    config.eval[field] = value
    with pytest.raises(ValueError, match=re.escape(needle)):
      E.setup(config, tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_a_mistyped_orbax_dir_is_named_and_not_created(tmp_path):
  import ml_collections

  from zsjax.sharding import ShardingPlan

  class Tok:
    eos_token_id = 1

    def __len__(self):
      return 64

  section = ml_collections.ConfigDict(dict(
      checkpoint="", orbax_dir=str(tmp_path / "chekpoints"), orbax_step=0,
      param_dtype="float32", dtype="float32", remat="none", attention_impl="auto",
      model=dict(arch="qwen2", vocab_size=64, embed_dim=16, mlp_dim=32, num_layers=1,
                 num_heads=2, num_kv_heads=1, head_dim=8)))
  with pytest.raises(FileNotFoundError, match="config.policy.orbax_dir=.*chekpoints.* is not a "
                                             "directory"):
    E.load_policy(section, Tok(), ShardingPlan.single_device())
  assert not (tmp_path / "chekpoints").exists()


def test_unreadable_files_name_the_path_and_the_columns(tmp_path):
  datasets.Dataset.from_list([{"query": "Q?", "answer": "a"}]).to_parquet(
      str(tmp_path / "wrong.parquet"))
  with pytest.raises(data.DataError, match=r"wrong.parquet: columns \['answer', 'query'\] hold "
                                           r"no question .*expected the common QA format"):
    data.load_qa(tmp_path / "wrong.parquet")
  (tmp_path / "garbage.parquet").write_bytes(b"not a parquet file at all")
  (tmp_path / "empty.parquet").write_bytes(b"")
  for name in ("garbage.parquet", "empty.parquet"):
    with pytest.raises(data.DataError, match=rf"{name}: not a readable parquet file"):
      data.load_qa(tmp_path / name)


def test_a_row_check_is_applied_by_on_error_with_file_and_row(tmp_path):
  rows = [{"question": q, "golden_answers": ["a"]} for q in ("short?", "x " * 50 + "?", "ok?")]
  path = data.write_jsonl(tmp_path / "rows.jsonl", rows)

  def check(row):
    if len(row["question"]) > 20:
      raise data.DataError(f"field 'question' is {len(row['question'])} characters")

  report = []
  kept = data.load_qa(path, check=check, report=report)
  assert kept["question"] == ["short?", "ok?"]
  assert report[0].skipped == [(str(path), 2, "field 'question' is 101 characters")]
  with pytest.raises(data.DataError, match=r"rows.jsonl, row 2: field 'question' is 101"):
    data.load_qa(path, check=check, on_error="raise")


def test_evaluation_writes_set_by_set_and_keeps_what_was_scored(tmp_path, world, monkeypatch):
  """A complete run replaces the outputs whole, its methods scored on the same
  questions (a row RAG could not fit is left out of every method). A failing rerun
  (here a raised error in the second set) leaves that run's results and
  predictions as they were, and its own first set in the partial files; an
  overlong question is skipped when the set loads, named by file and row."""
  test = datasets.Dataset.from_parquet(world["test"]).to_list()
  first = data.write_jsonl(tmp_path / "a.jsonl", [
      {"id": r["id"], "question": r["question"], "golden_answers": r["golden_answers"]}
      for r in test[:3]] + [{"id": "long", "question": "word " * 400 + "?",
                             "golden_answers": ["x"]}])
  second = data.write_jsonl(tmp_path / "b.jsonl", [
      {"id": r["id"], "question": r["question"], "golden_answers": r["golden_answers"]}
      for r in test[3:5]])
  config = load_config("eval", "tiny")
  config.progress = False
  config.synthetic_data = False
  config.tokenizer = world["tokenizer"]
  config.engine.corpus = world["corpus"]
  config.eval.methods = "direct,rag"
  config.eval.sets = f"a={first},b={second}"
  wide = test[1]["id"]  # RAG's documents make this row's prompt too wide
  failing = []

  def fake_run_set(self, method, rows, set_name=""):
    if set_name == "b" and failing:
      raise RuntimeError("the machine went away")
    if method == "rag":
      self.skipped += [{"set": set_name, "method": method, "id": r["id"], "reason": "wide"}
                       for r in rows if r["id"] == wide]
      rows = [r for r in rows if r["id"] != wide]
    score = 1.0 if method == "direct" else 0.0
    return [{"set": set_name, "id": r["id"], "method": method, "em": score,
             "substring_em": score, "f1": score} for r in rows]

  monkeypatch.setattr(E.Evaluator, "run_set", fake_run_set)
  out = tmp_path / "out"
  results = E.run(config, str(out))
  assert results["complete"] is True and results["left_out"] == {"a": [wide]}
  for method in ("direct", "rag"):  # both on the same 2 questions of a
    assert results["methods"][method]["a"]["count"] == 2
  assert results["methods_every_row"]["direct"]["a"]["count"] == 3
  assert results["skipped_rows"] == {"a": 2, "b": 0}  # "long" at load, the wide row later
  assert "Rows left out of every method" in (out / "results.md").read_text()
  done = {name: (out / name).read_bytes() for name in
          ("results.json", "results.md", "results.csv", "predictions.jsonl")}
  assert not (out / "results.partial.json").exists()

  failing.append(True)
  with pytest.raises(RuntimeError, match="went away"):
    E.run(config, str(out))
  assert {name: (out / name).read_bytes() for name in done} == done  # the complete run, whole
  kept = [json.loads(line) for line in open(out / "predictions.partial.jsonl")]
  assert [r["id"] for r in kept] == [r["id"] for r in test[:3]]  # "long" was skipped
  partial = json.loads((out / "results.partial.json").read_text())
  assert partial["complete"] is False and partial["methods"]["direct"]["a"]["count"] == 3
  assert partial["skipped_rows"] == {"a": 1, "b": 0}


def test_every_job_stops_on_the_checkpoints_end_tokens(tmp_path, world):
  """Evaluation and simulator tuning's collector stop where RL does: on every end
  token of the checkpoint (generation_config, then config), not on the tokenizer's
  single one (``hf.end_tokens``)."""
  from zsjax import hf, search, sim_tuning
  from zsjax import rollout as R

  write_fixtures(tmp_path, world)
  config = load_config("eval", "tiny")
  config.progress, config.synthetic_data = False, False
  config.tokenizer, config.engine.corpus = world["tokenizer"], world["corpus"]
  config.eval.sets = f"nq={tmp_path / 'nq.jsonl'}"
  config.eval.methods = "search"
  tokenizer = hf.load_tokenizer(world["tokenizer"])
  ends = (tokenizer.eos_token_id, tokenizer.eos_token_id + 1)  # a second end token
  config.policy.model.eos_token_ids = ends  # as a checkpoint's generation_config lists them
  job = E.setup(config, str(tmp_path / "eval"))
  assert job.evaluator.static.eos_ids == ends
  cfg = job.evaluator.cfg
  collector = sim_tuning.make_collection_policy(
      cfg, job.evaluator.params, tokenizer, search.BM25Engine.from_jsonl(world["corpus"], top_k=1),
      R.RolloutConfig(max_turns=1, max_new_tokens=4, max_obs_tokens=64, max_length=160),
      Greedy(), prompt_width=32)
  assert collector["static"].eos_ids == ends
  without = dataclasses.replace(cfg, eos_token_ids=())
  assert hf.end_tokens(without, tokenizer) == (tokenizer.eos_token_id,)
