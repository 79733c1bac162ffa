"""Search-simulation tuning (job "sim_tuning"), or supervised tuning alone (arg "sft").

Arg: "tiny" (default) | "qwen2.5-7b" | "sft"
  tiny        the tiny world (built in WORKDIR/world), BM25 over its documents,
              questions as queries, rule judge, a small random simulator; CPU.
  qwen2.5-7b  a searching policy collects trajectories against BM25 over a local
              corpus (or an HTTP engine), an LLM judge labels them, and
              Qwen2.5-7B-Instruct is tuned as the simulator (METHOD.md §7:
              ~2k balanced examples, lr 1e-6, batch 2, 1000 steps).
  sft         job "sft" only: tune config.model on config.sft.data (a datasets
              directory or a jsonl/parquet file with prompt / target), e.g. a
              policy warm start on demonstrations.

Commands:
  python -m zsjax.main --config=configs/sim_tuning.py:tiny --workdir=/tmp/sim_tiny
  python -m zsjax.main --config=configs/sim_tuning.py:qwen2.5-7b --workdir=/runs/sim7b \\
      --config.model.checkpoint=/models/Qwen2.5-7B-Instruct \\
      --config.sim_tuning.policy.checkpoint=/models/Qwen2.5-7B-Instruct \\
      --config.sim_tuning.judge_checkpoint=/models/Qwen2.5-14B-Instruct \\
      --config.data.train_files=/data/nq_hotpotqa_train.parquet \\
      --config.engine.corpus=/data/wiki18.jsonl
  python -m zsjax.main --config=configs/sim_tuning.py:sft --workdir=/tmp/sft \\
      --config.sft.data=/data/demos.jsonl --config.model.checkpoint=/models/Qwen2.5-3B

Hardware: tiny on a 2-core CPU in about a minute; qwen2.5-7b on one 8-GPU node.
Expected (tiny): WORKDIR/trajectories.jsonl, pairs.jsonl and labels.json (balanced
  useful / noisy counts), sft_data/ (train / test), sft/ (metrics.jsonl with
  loss/nll falling, checkpoints, hf_export/), and sim_report.md: a table of how
  often useful vs noisy documents contain the gold answer on held-out queries,
  and the held-out target perplexity. Stages whose output exists are skipped.
"""

import ml_collections


def simulator_model() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      arch="qwen2", vocab_size=0, embed_dim=96, mlp_dim=256, num_layers=2, num_heads=4,
      num_kv_heads=2, head_dim=24, qkv_bias=True, tie_embeddings=True,
      max_position_embeddings=2048, eos_token_ids=(), dtype="float32", param_dtype="float32",
      remat="none"))


def get_config(arg=None):
  arg = arg or "tiny"
  if arg not in ("tiny", "qwen2.5-7b", "sft"):
    raise ValueError(f"config arg {arg!r} is not 'tiny', 'qwen2.5-7b' or 'sft'.")
  tiny = arg != "qwen2.5-7b"
  config = ml_collections.ConfigDict()
  config.job = "sft" if arg == "sft" else "sim_tuning"
  config.seed = 0
  config.progress = True
  config.tokenizer = ""  # empty = the model checkpoint's
  config.synthetic_data = arg == "tiny"
  # "zerosearch": the released simulators' prompt; "" (or "zsjax"): our wording; or a template
  config.simulator_template = "" if tiny else "zerosearch"
  # the simulator is a chat model (its prompt in its chat template, empty system message)
  config.simulator_chat_template = not tiny
  config.model = ml_collections.ConfigDict(dict(
      checkpoint="", param_dtype="float32", dtype="float32" if tiny else "bfloat16",
      remat="none" if tiny else "full",
      logits_chunk=0 if tiny else 256,  # LM-head positions at a time (0 = all at once)
      attention_impl="auto",  # auto (cuDNN on a GPU in bfloat16) | einsum | xla | cudnn
      model=simulator_model() if tiny else {}))
  config.data = ml_collections.ConfigDict(dict(train_files="", on_error="skip"))
  config.engine = ml_collections.ConfigDict(dict(
      kind="bm25", corpus="", text_field="contents", top_k=5 if not tiny else 3,
      url="", model="", timeout_s=30.0, max_retries=2,  # timeout_s: a deadline per attempt
      # a step (an eval set) with more failed search calls than this share fails;
      # RL stops after max_failed_steps failing steps in a row, eval exits non-zero
      max_failed_share=0.2, max_failed_steps=3, backoff_s=1.0,
      concurrency=16,  # chat requests in flight at once (one POST each)
      max_text_bytes=1024))  # a host engine gets each question and answer, at most this long
  config.sim_tuning = ml_collections.ConfigDict(dict(
      num_questions=240 if tiny else 4000,
      queries="question" if tiny else "policy",  # | policy (a searching policy collects)
      batch_size=16,
      policy=dict(checkpoint="", param_dtype="float32", dtype="bfloat16", remat="none",
                  attention_impl="auto", model={}),
      # the collecting policy's rollout; attention_view: decode reads the smallest cache
      # view holding every row (0: the whole cache)
      rollout=dict(max_turns=4, max_new_tokens=500, max_obs_tokens=2048, max_length=4096,
                   max_query_tokens=64, attention_view=512),
      # method: gumbel | inverse_cdf when kind="sample" (zsjax.sampling.Sampling.method)
      sampling=dict(kind="greedy", temperature=1.0, top_p=1.0, top_k=0, method="gumbel"),
      prompt_width=512,
      judge="rule" if tiny else "llm", judge_checkpoint="", judge_prompt="",
      # instruct models (the paper's Qwen2.5-7B-Instruct collector and judge) read their
      # prompts in their chat templates
      policy_chat_template=not tiny, judge_chat_template=not tiny,
      balance=True, test_fraction=0.15,
      # report_queries: "all" held-out pairs, or "question" (only searches of the
      # question itself, where useful documents should hold the gold answer)
      report_rows=64 if tiny else 500, report_new_tokens=64 if tiny else 512,
      report_queries="all"))
  config.sft = ml_collections.ConfigDict(dict(
      data="",  # set by the sim_tuning job; for job sft a datasets dir or a jsonl/parquet file
      max_length=256 if tiny else 2048, batch_size=8 if tiny else 2,
      total_steps=60 if tiny else 1000, learning_rate=3e-3 if tiny else 1e-6,
      schedule_steps=0,  # the steps the lr schedule spans; 0 = total_steps (kept on resume)
      warmup_fraction=0.05, decay="cosine" if tiny else "constant", weight_decay=0.0,
      grad_clip=1.0, eval_every=20 if tiny else 100,
      # early stop: when the held-out NLL (checked every eval_every steps) is <= stop_nll,
      # the rate decays over cooldown_steps and the job ends; total_steps is the cap, whose
      # last cooldown_steps decay when the check has not passed (0: off, the full schedule)
      stop_nll=0.0, cooldown_steps=0,
      # stop_group: a column of the test split; the check is then on its worst group's
      # NLL (each group must pass, not only the mean). stop_passes: checks in a row that
      # must pass before the cooldown starts (one noisy dip does not end the job).
      # focus: with stop_group, the share of each batch drawn from the train rows of the
      # group whose check fails worst, until every group passes (0: off)
      stop_group="", stop_passes=1, focus=0.0,
      on_error="skip"))  # malformed rows: skip (reported) | raise
  config.checkpoint = ml_collections.ConfigDict(dict(every=20 if tiny else 200, max_to_keep=2,
                                                     async_save=True, export_hf=True))
  config.mesh = ml_collections.ConfigDict(dict(data=-1 if tiny else 1, fsdp=1 if tiny else -1,
                                               tensor=1))
  config.sharding = "dp" if tiny else "fsdp"
  config.sharding_rules = ()
  # multi-process start-up (zsjax.sharding.initialize_distributed); empty / 0 / -1 = the
  # environment's JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID; auto: let JAX
  # find the cluster (SLURM, TPU pods); local_device_ids: this process's devices, () = all
  config.distributed = ml_collections.ConfigDict(dict(
      coordinator_address="", num_processes=0, process_id=-1, auto=False, local_device_ids=()))
  return config
