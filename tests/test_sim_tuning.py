"""Simulator tuning: collection, labelling, the SFT set, packed SFT with the loss on
target tokens only, the quality report, and the whole job on a tiny world."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zsjax import model as M
from zsjax import search as S
from zsjax import sim_tuning as ST
from zsjax import train_sft
from zsjax.metrics import read_jsonl
from zsjax.train_step import next_token_loss

from config_files import load_config
from scripted import Scripted, script_rows

@pytest.fixture(scope="module")
def tokenizer(world):
  from zsjax import hf

  return hf.load_tokenizer(world["tokenizer"])


def log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_packing_keeps_examples_apart_and_weights_only_targets(tokenizer):
  cfg = M.ModelConfig(vocab_size=len(tokenizer), embed_dim=32, mlp_dim=48, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, arch="qwen2")
  params = M.init_params(cfg, jax.random.key(0))
  rows = [{"prompt": "Query: where was X born?\nOutput:", "target": "Doc 1: X was born in Y."},
          {"prompt": "Q: a", "target": "Doc 1: b"},
          {"prompt": "Query: who founded Z?\nOutput:", "target": "Doc 1: Z was founded in W."}]
  eos = tokenizer.eos_token_id
  examples, cut = train_sft.tokenize_examples(tokenizer, rows, 200, eos)
  assert cut == 0
  width = sum(len(ids) for ids, _ in examples) + 3
  packed = train_sft.pack(examples, width, eos)
  assert packed["tokens"].shape[0] == 1  # all three fit one row
  assert list(np.unique(packed["segment_ids"])) == [0, 1, 2, 3]
  prompt_lengths = [len(tokenizer.encode(r["prompt"], add_special_tokens=False)) for r in rows]
  # Independent: each example alone, unpacked; -log p of its target + EOS tokens.
  nll, count = 0.0, 0
  for (ids, mask), n_prompt in zip(examples, prompt_lengths):
    assert mask[:n_prompt] == [0] * n_prompt and all(mask[n_prompt:])
    logits = np.asarray(M.Transformer(cfg).apply({"params": params}, jnp.asarray([ids])),
                        np.float64)[0]
    lp = log_softmax(logits)
    for t in range(n_prompt, len(ids)):
      nll -= lp[t - 1, ids[t]]
      count += 1
  loss, metrics = next_token_loss(cfg, params, {k: jnp.asarray(v) for k, v in packed.items()})
  assert int(metrics["data/target_tokens"]) == count
  np.testing.assert_allclose(float(loss), nll / count, rtol=1e-5)


def test_rule_judge_labels_and_balance():
  trajectories = [
      {"id": "a", "question": "Where was Ann born?", "golden_answers": ["Lund", "Lund town"],
       "searches": [{"query": "Ann born", "documents": ["Ann was born in Lund."]},
                    {"query": "Ann", "documents": ["Ann is a painter."]},
                    {"query": "empty", "documents": []}]},
      {"id": "b", "question": "Who directed Q?", "golden_answers": ["The Bo Lin"],
       "searches": [{"query": "Q director", "documents": ["Q was directed by bo lin!"]},
                    {"query": "Q", "documents": ["Bolinas is a town."]}]}]
  pairs = ST.label_pairs(trajectories, ST.RuleJudge())
  assert [p["label"] for p in pairs] == ["useful", "noisy", "useful", "noisy"]
  assert ST.label_counts(pairs) == {"useful": 2, "noisy": 2}
  pairs.append(dict(pairs[0]))
  balanced = ST.balance(pairs, seed=0)
  assert ST.label_counts(balanced) == {"useful": 2, "noisy": 2}
  assert ST.balance(pairs, seed=0) == balanced


def test_llm_judge_compares_yes_and_no_log_probs(tokenizer):
  cfg = M.ModelConfig(vocab_size=len(tokenizer), embed_dim=32, mlp_dim=48, num_layers=1,
                      num_heads=4, num_kv_heads=2, head_dim=8, arch="qwen2")
  decisions = []
  for seed in range(4):
    params = M.init_params(cfg, jax.random.key(seed))
    judge = ST.LLMJudge(cfg, params, tokenizer)
    args = ("Where was Ann born?", ["Lund"], "Ann born", ["Ann was born in Lund."])
    text = judge.prompt.format(question=args[0], answer="Lund", query=args[2],
                               documents="Doc 1: Ann was born in Lund.")
    ids = tokenizer.encode(text, add_special_tokens=False)

    def score(word):
      extra = tokenizer.encode(word, add_special_tokens=False)
      full = ids + extra
      lp = log_softmax(np.asarray(M.Transformer(cfg).apply({"params": params},
                                                          jnp.asarray([full])), np.float64)[0])
      return sum(lp[t - 1, full[t]] for t in range(len(ids), len(full)))

    want = score(" yes") > score(" no")
    assert judge.useful(*args) == want
    decisions.append(want)


CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_an_instruct_judge_reads_its_chat_template(tokenizer):
  """The paper's judge is an instruct model: the prompt goes in as a user message
  of its chat template, and it answers "yes" / "no" as the assistant."""
  import copy

  chat_tokenizer = copy.deepcopy(tokenizer)
  chat_tokenizer.chat_template = CHAT
  cfg = M.ModelConfig(vocab_size=len(tokenizer), embed_dim=32, mlp_dim=48, num_layers=1,
                      num_heads=4, num_kv_heads=2, head_dim=8, arch="qwen2")
  args = ("Where was Ann born?", ["Lund"], "Ann born", ["Ann was born in Lund."])
  for seed in range(3):
    params = M.init_params(cfg, jax.random.key(seed))
    judge = ST.LLMJudge(cfg, params, chat_tokenizer, chat_template=True)
    text = chat_tokenizer.apply_chat_template([{"role": "user", "content": judge.prompt.format(
        question=args[0], answer="Lund", query=args[2], documents="Doc 1: Ann was born in Lund.")}],
        tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>user") and text.endswith("<|im_start|>assistant\n")
    ids = tokenizer.encode(text, add_special_tokens=False)

    def score(word):
      full = ids + tokenizer.encode(word, add_special_tokens=False)
      lp = log_softmax(np.asarray(M.Transformer(cfg).apply({"params": params},
                                                          jnp.asarray([full])), np.float64)[0])
      return sum(lp[t - 1, full[t]] for t in range(len(ids), len(full)))

    assert judge.useful(*args) == (score("yes") > score("no"))
  config = load_config("sim_tuning", "qwen2.5-7b").sim_tuning
  assert config.policy_chat_template and config.judge_chat_template
  assert not load_config("sim_tuning", "tiny").sim_tuning.judge_chat_template


def test_collection_with_a_searching_policy_records_queries_documents_and_resumes(
    tmp_path, world, tokenizer):
  from zsjax import data
  from zsjax.rollout import RolloutConfig
  from zsjax.sampling import Greedy

  examples = list(data.load_qa(world["train"], limit=6))
  engine = S.BM25Engine.from_jsonl(world["corpus"], top_k=2)
  cfg = M.ModelConfig(vocab_size=len(tokenizer), embed_dim=32, mlp_dim=48, num_layers=1,
                      num_heads=4, num_kv_heads=2, head_dim=8, arch="qwen2")
  params = M.init_params(cfg, jax.random.key(0))
  config = RolloutConfig(max_turns=1, max_new_tokens=40, max_obs_tokens=160, max_length=600,
                         max_query_tokens=32)

  def policy_for(rows):  # each row searches its question, then answers "Lund"
    questions = [e["question"] for e in rows] + [rows[-1]["question"]] * (4 - len(rows))
    script = script_rows([tokenizer.encode(f"<search> {q} </search>", add_special_tokens=False)
                          + tokenizer.encode("<answer> Lund </answer>", add_special_tokens=False)
                          for q in questions])
    return ST.make_collection_policy(cfg, params, tokenizer, engine, config,
                                     Scripted(script, Greedy()), prompt_width=256)

  path = tmp_path / "trajectories.jsonl"
  counts = ST.collect_trajectories(path, examples[:4], engine, tokenizer=tokenizer,
                                   policy=policy_for(examples[:4]), batch_size=4, progress=False)
  records = read_jsonl(path)
  assert counts["questions"] == 4 and len(records) == 4
  for e, r in zip(examples, records):
    assert [s["query"] for s in r["searches"]] == [e["question"]]
    want = engine.search([S.SearchRequest(e["question"])]).documents[0]
    assert r["searches"][0]["documents"] == want
    assert r["answer"] == "Lund"
  # a rerun over more questions skips the ones already collected
  counts = ST.collect_trajectories(path, examples, engine, tokenizer=tokenizer,
                                   policy=policy_for(examples[4:]), batch_size=4, progress=False)
  assert counts == {"questions": 2, "skipped_done": 4, "searches": 2}
  assert [r["id"] for r in read_jsonl(path)] == [e["id"] for e in examples]


def test_sim_tuning_job_runs_every_stage_and_resumes(tmp_path, capsys):
  config = load_config("sim_tuning", "tiny")
  config.progress = False
  config.sim_tuning.num_questions = 90
  config.sim_tuning.report_rows = 8
  config.sim_tuning.report_new_tokens = 24
  config.sft.total_steps = 30
  config.checkpoint.async_save = False
  summary = ST.run(config, str(tmp_path))
  labels = summary["labels"]["after_balance"]
  assert labels["useful"] == labels["noisy"] > 0
  import datasets

  splits = datasets.load_from_disk(str(tmp_path / "sft_data"))
  assert set(splits) == {"train", "test"}
  assert not set(splits["train"]["question"]) & set(splits["test"]["question"])
  assert all(("Noisy Output" in r["prompt"]) == (r["label"] == "noisy") for r in splits["train"])
  nll = [r["loss/nll"] for r in read_jsonl(tmp_path / "sft" / "metrics.jsonl")]
  assert np.mean(nll[-5:]) < 0.7 * np.mean(nll[:5])
  assert (tmp_path / "sft" / "hf_export" / "config.json").exists()
  report = json.loads((tmp_path / "sim_report.json").read_text())
  assert report["rows"] == 8 and 0.0 <= report["useful/contains_answer"] <= 1.0
  assert "| useful |" in (tmp_path / "sim_report.md").read_text()
  capsys.readouterr()
  config.progress = True  # a rerun skips every stage
  ST.run(config, str(tmp_path))
  out = capsys.readouterr().out
  for stage in ("label", "dataset", "sft", "report"):
    assert f"{stage}: output exists, skipped" in out
  assert "| noisy |" in out


def test_load_sft_reports_malformed_rows(tmp_path):
  from zsjax import data

  path = tmp_path / "demos.jsonl"
  data.write_jsonl(path, [{"prompt": "p1", "target": "t1"},
                          {"prompt": "p2", "target": "", "split": "test"},
                          {"prompt": "p3", "target": "t3", "split": "test"}])
  with open(path, "a") as f:
    f.write("not json\n")
  splits = data.load_sft(path)
  assert {k: len(v) for k, v in splits.items()} == {"train": 1, "test": 1}
  with pytest.raises(data.DataError, match=r"demos.jsonl, row 2: field 'target' is ''"):
    data.load_sft(path, on_error="raise")


def test_segmented_targets_weight_each_piece(tokenizer):
  row = {"prompt": "Q: x", "target": "<search> x </search>DOCS<answer> y </answer>",
         "target_segments": ["<search> x </search>", "DOCS", "<answer> y </answer>"],
         "target_loss": [1, 0, 1]}
  [(ids, mask)], _ = train_sft.tokenize_examples(tokenizer, [row], 200, tokenizer.eos_token_id)
  pieces = [tokenizer.encode(t, add_special_tokens=False) for t in
            ["Q: x", *row["target_segments"]]]
  want = [0] * len(pieces[0]) + [1] * len(pieces[1]) + [0] * len(pieces[2]) + \
      [1] * len(pieces[3]) + [1]  # EOS
  assert ids == sum(pieces, []) + [tokenizer.eos_token_id] and mask == want


def test_report_rows_keep_searches_of_the_question_or_refuse_a_bad_value(tmp_path):
  rows = [{"query": "Where was Abe born?", "question": "Where was Abe born? "},
          {"query": "Abe", "question": "Where was Abe born?"},
          {"query": " Who founded Zed? ", "question": "Who founded Zed?"}]
  assert ST.report_rows(rows, "all") == rows
  assert ST.report_rows(rows, "question") == [rows[0], rows[2]]
  with pytest.raises(ValueError, match="report_queries='questions'"):
    ST.report_rows(rows, "questions")
  config = load_config("sim_tuning", "tiny")
  config.sim_tuning.report_queries = "questions"
  with pytest.raises(ValueError, match="report_queries"):  # before any work is done
    ST.run(config, str(tmp_path))
  assert not any(tmp_path.iterdir())
