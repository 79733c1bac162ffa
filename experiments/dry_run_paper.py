"""A dry run of the paper configuration's code path on a CPU.

  python experiments/dry_run_paper.py --out=experiments/results/dry_run_paper [--work=DIR]

``configs/zerosearch.py`` (``qwen2.5-3b`` and ``qwen3-4b``: chat template on for
the policy and the simulator, top-p 0.95, the paper's optimiser) with scaled-down
random Qwen2.5- and Qwen3-shaped policies and simulators, a real-size vocabulary
(the 120k-token byte-level BPE of ``tests/big_tokenizer.py``, with Qwen-style
end tokens and chat template) and the paper's lengths scaled down, runs 2 RL
steps against the on-device simulator and against a served simulator over HTTP
(tests/stub_server.py's chat-completions stub on 127.0.0.1). The policy is first warm-started
for a few SFT steps on chat-wrapped turns that either search the question or
think and end (an end token without an action), so its trajectories walk those
paths (its words do not matter here). After RL one more rollout is decoded with its special tokens, and the run
checks: the prompt is chat-wrapped, an end token without an action was followed
by the invalid-action feedback (and was not kept), and no inserted document holds
an end token. Writes ``OUT/summary.json`` (last line printed too) and one decoded
rollout per run to OUT; checkpoints and the tokenizer go to WORK (a temporary
directory by default). About 17 minutes a model on 2 cores (the warm start's 120
SFT steps on the reference's longer prompt take most of it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import ml_collections

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # big_tokenizer: the offline real-size tokenizer
sys.path.insert(0, str(ROOT / "experiments"))

QUESTIONS = [("What is the capital of France?", "Paris"), ("Which river flows through Paris?",
             "Seine"), ("Who wrote Hamlet?", "Shakespeare"), ("Where is Mount Fuji?", "Japan")]
SHAPES = {  # scaled-down random policies and simulators of each family
    "qwen2.5-3b": dict(arch="qwen2", qkv_bias=True, head_dim=16),
    "qwen3-4b": dict(arch="qwen3", qkv_bias=False, head_dim=24),  # head_dim != D / heads
}


def model_fields(arch_fields: dict) -> dict:
  return dict(vocab_size=0, embed_dim=64, mlp_dim=128, num_layers=2, num_heads=4,
              num_kv_heads=2, tie_embeddings=True, max_position_embeddings=2048,
              eos_token_ids=(), dtype="float32", param_dtype="float32", remat="none",
              **arch_fields)


def warm_start(out: Path, model: str, tokenizer_dir: Path, tokenizer) -> Path:
  """A few SFT steps on chat-wrapped first turns: search the question, or think
  and end (the end token the SFT target closes with)."""
  from sweep import config_module

  from zsjax import template, train_sft

  rows = []
  for question, _ in QUESTIONS * 4:
    prompt = template.render_prompt(question, tokenizer, style="search_r1")  # as RL prompts
    # two fixed first turns, so a small policy learns them in a few steps: the paths
    # matter here, not the words
    rows += [{"prompt": prompt, "target": "<search> the question </search>"},
             {"prompt": prompt, "target": "<think> I am not sure. </think>"}]
  data = out / model / "warm_start.jsonl"
  data.parent.mkdir(parents=True, exist_ok=True)
  data.write_text("".join(json.dumps(r) + "\n" for r in rows))
  config = config_module(ROOT / "configs" / "sim_tuning.py").get_config("sft")
  config.progress = False
  config.tokenizer = str(tokenizer_dir)
  config.model.model = ml_collections.ConfigDict(model_fields(SHAPES[model]))
  config.sft.update(dict(data=str(data), max_length=256, batch_size=8, total_steps=120,
                         learning_rate=3e-3, eval_every=120))
  config.checkpoint.update(dict(every=120, async_save=False))
  train_sft.run(config, str(out / model / "warm_start"))
  return out / model / "warm_start" / "hf_export"


def rl_config(model: str, engine: str, policy_dir: Path, tokenizer_dir: Path, data: Path,
              url: str):
  from sweep import config_module

  config = config_module(ROOT / "configs" / "zerosearch.py").get_config(model)
  config.progress = False
  config.tokenizer = str(tokenizer_dir)
  config.data.train_files = str(data)
  config.policy.update(dict(checkpoint=str(policy_dir), dtype="float32", param_dtype="float32",
                            remat="none"))
  config.simulator.update(dict(dtype="float32", param_dtype="float32", max_prefix_tokens=160,
                               max_new_tokens=48))
  config.simulator.model = ml_collections.ConfigDict(model_fields(SHAPES[model]))
  config.engine.update(dict(kind=engine, url=url, model="sim", timeout_s=10.0))
  config.rollout.update(dict(max_turns=2, max_new_tokens=24, max_obs_tokens=160,
                             max_length=768, max_query_tokens=24, max_prompt_tokens=256))
  config.rl.update(dict(prompts_per_step=2, samples_per_prompt=2, total_steps=2,
                        minibatch_size=4, micro_batch_size=4, score_batch_size=4,
                        sample_every=1))
  config.mesh.update(dict(data=1, fsdp=1, tensor=1))
  config.sharding = "dp"
  config.checkpoint.update(dict(async_save=False, export_hf=False))
  return config


def inspect(job, state, tokenizer) -> dict:
  """One more rollout with the trained params, decoded with its special tokens."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from zsjax import template, train_rl
  from zsjax.sharding import to_host

  batch, _, _ = train_rl.rollout_batch(job, 1)
  traj = to_host(job.rollout(state.policy.params, job.engine_state, batch, jax.random.key(9),
                             jnp.int32(1)))
  ends = ("<|im_end|>", "<|endoftext|>")
  feedback = template.prompt_style(job.config.data.prompt_style).feedback
  rows, texts = [], []
  for i in range(traj.tokens.shape[0]):
    start, end = int(traj.prompt_lengths[i]), int(traj.lengths[i])
    prompt = tokenizer.decode(np.asarray(traj.tokens[i, :start]).tolist())
    response = tokenizer.decode(np.asarray(traj.tokens[i, start:end]).tolist())
    documents = [part.split("</information>")[0] for part in response.split("<information>")[1:]]
    texts.append(prompt + response)
    rows.append({
        "chat_wrapped_prompt": prompt.startswith("<|im_start|>user\n")
        and prompt.endswith("<|im_start|>assistant\n"),
        # a turn ended by an end token (dropped) is an invalid action: the feedback follows
        "feedback_after_end": bool(traj.end_token_turns[i])
        and feedback in response,
        "reference_prompt": prompt.startswith("<|im_start|>user\n" + template.SEARCH_R1_INSTRUCTION
                                              + " Question: "),
        "end_token_in_response": any(e in response for e in ends),
        "documents": len(documents),
        "end_token_in_documents": any(e in d for d in documents for e in ends)})
  return {"rows": rows, "texts": texts, "simulator_prompt": simulator_prompt(job, batch, tokenizer)}


def simulator_prompt(job, batch, tokenizer) -> str:
  """What the on-device simulator prefills for one query of ``batch``'s first row:
  its host-tokenized prompt (``rollout.retokenize``), decoded."""
  import numpy as np

  engine = job.engine
  if not hasattr(engine, "_host_prompt"):
    return ""
  inputs = batch.engine_inputs
  query = np.asarray([tokenizer.encode(" the question", add_special_tokens=False)], np.int32)
  ids, lengths = engine._host_prompt(np.asarray(inputs.text)[:1], np.asarray(inputs.text_lengths)[:1],
                                     query, np.asarray([query.shape[1]]), [False], [True])
  return tokenizer.decode(ids[0, :lengths[0]].tolist())


def run_one(out: Path, work: Path, model: str, engine: str, policy_dir: Path,
            tokenizer_dir: Path, data: Path, stub, tokenizer) -> dict:
  from zsjax import simulator, train_rl
  from zsjax.checkpoint import Checkpointer

  workdir = work / model / f"rl_{engine}"
  config = rl_config(model, engine, policy_dir, tokenizer_dir, data, stub.url)
  started = time.perf_counter()
  job = train_rl.setup(config, workdir)
  summary = train_rl.train(job)
  state, _ = Checkpointer(workdir / "checkpoints").restore(job.programs.state_target())
  seen = inspect(job, state, tokenizer)
  (out / f"{model}_{engine}_rollout.txt").write_text(
      "\n\n=====\n\n".join(seen["texts"]) + "\n")
  rows = seen["rows"]
  released = simulator.ZEROSEARCH_TEMPLATE.split("{quality}")[0]  # "You are the Google ..."
  if seen["simulator_prompt"]:
    (out / f"{model}_{engine}_simulator_prompt.txt").write_text(seen["simulator_prompt"])
  return {
      "retokenize": bool(config.rollout.retokenize),
      "reference_policy_prompt": all(r["reference_prompt"] for r in rows),
      "released_simulator_prompt_on_device": (
          seen["simulator_prompt"].startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\n"
                                              + released)
          and seen["simulator_prompt"].endswith("Useful Output:\n<|im_end|>\n<|im_start|>assistant\n"))
      if engine == "simulator" else None,
      "steps": summary["final_step"], "seconds": round(time.perf_counter() - started, 1),
      "reward/f1": summary.get("reward/f1"), "rollout/searches": summary.get("rollout/searches"),
      "chat_wrapped_prompt": all(r["chat_wrapped_prompt"] for r in rows),
      "rows_with_feedback_after_an_end": sum(r["feedback_after_end"] for r in rows),
      "end_tokens_in_responses": sum(r["end_token_in_response"] for r in rows),
      "documents_inserted": sum(r["documents"] for r in rows),
      "end_tokens_in_documents": sum(r["end_token_in_documents"] for r in rows)}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, help="summary and decoded rollouts")
  parser.add_argument("--work", default="", help="checkpoints, tokenizer (default: a temp dir)")
  parser.add_argument("--models", default="qwen2.5-3b,qwen3-4b")
  parser.add_argument("--engines", default="simulator,http")
  args = parser.parse_args(argv)
  import big_tokenizer

  import tempfile

  out, work = Path(args.out), Path(args.work or tempfile.mkdtemp(prefix="dry_run_"))
  out.mkdir(parents=True, exist_ok=True)
  tokenizer = big_tokenizer.make()
  tokenizer_dir = work / "tokenizer"
  tokenizer.save_pretrained(str(tokenizer_dir))
  data = work / "train.jsonl"
  data.write_text("".join(json.dumps({"id": f"q{i}", "question": q, "golden_answers": [a]})
                          + "\n" for i, (q, a) in enumerate(QUESTIONS)))
  from stub_server import StubServer  # tests/: a local simulator stub on 127.0.0.1

  stub = StubServer()
  results = {}
  try:
    for model in args.models.split(","):
      policy_dir = warm_start(work, model, tokenizer_dir, tokenizer)
      for engine in args.engines.split(","):
        results[f"{model}/{engine}"] = run_one(out, work, model, engine, policy_dir,
                                               tokenizer_dir, data, stub, tokenizer)
        print(f"{model}/{engine}: {results[f'{model}/{engine}']}", flush=True)
  finally:
    stub.close()
  results["http_requests"] = len(stub.requests)
  results["http_chat_messages"] = bool(stub.requests) and all(
      r["messages"][0] == {"role": "system", "content": ""} for r in stub.requests)
  from zsjax import simulator

  released = simulator.ZEROSEARCH_TEMPLATE.split("{quality}")[0]
  results["http_released_prompt"] = bool(stub.requests) and all(
      r["messages"][1]["content"].startswith(released)
      and r["messages"][1]["content"].endswith(" Output:\n") for r in stub.requests)
  results["http_sampling"] = sorted({(r["temperature"], r["max_tokens"], r["top_p"])
                                     for r in stub.requests})
  if stub.requests:
    (out / "http_simulator_request.json").write_text(json.dumps(stub.requests[-1], indent=2) + "\n")
  from zsjax.environment import describe

  results["environment"] = describe()
  (out / "summary.json").write_text(json.dumps(results, indent=2) + "\n")
  print(json.dumps(results))
  return 0


if __name__ == "__main__":
  sys.exit(main())
