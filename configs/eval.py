"""Evaluation (job "eval"): a policy on QA sets with a search engine, and baselines.

Arg: "tiny" (default) | "paper"
  tiny   the tiny world's test split (built in WORKDIR/world), BM25 over its
         documents, a random tiny policy unless --config.policy.checkpoint is set.
  paper  the seven sets of METHOD.md §8 from local files (500 questions each,
         all 125 of Bamboogle), top-5 BM25 documents over a local corpus.

Commands:
  python -m zsjax.main --config=configs/eval.py:tiny --workdir=/tmp/eval_tiny
  python -m zsjax.main --config=configs/eval.py:paper --workdir=/runs/eval_zs7b \\
      --config.policy.checkpoint=/runs/zs7b/hf_export --config.engine.corpus=/data/wiki18.jsonl \\
      --config.eval.sets=nq=/data/nq_test.jsonl,triviaqa=/data/triviaqa_test.jsonl,\\
popqa=/data/popqa_test.jsonl,hotpotqa=/data/hotpotqa_dev.jsonl,\\
2wikimultihopqa=/data/2wiki_dev.jsonl,musique=/data/musique_dev.jsonl,bamboogle=/data/bamboogle.jsonl
  An Orbax checkpoint instead of an HF export: --config.policy.orbax_dir=/runs/zs7b/checkpoints
  with --config.policy.checkpoint naming the base model (its architecture).

Hardware: tiny on a 2-core CPU in about a minute; paper on one GPU (7B, greedy).
Expected: WORKDIR/results.json (methods.<method>.<set>.{substring_em,em,f1,count}
  and .average), results.md / results.csv, predictions.jsonl with one record per
  question. The paper reports average EM 40.93 for ZeroSearch with Qwen2.5-7B: its
  EM is the reference's qa_em.py, the gold answer inside the answer after
  normalisation, so compare it with methods.search.average.substring_em (the
  first column of results.md); `em` is strict equality and reads lower.
"""

import ml_collections


def get_config(arg=None):
  arg = arg or "tiny"
  if arg not in ("tiny", "paper"):
    raise ValueError(f"config arg {arg!r} is not 'tiny' or 'paper'.")
  tiny = arg == "tiny"
  config = ml_collections.ConfigDict()
  config.job = "eval"
  config.seed = 0
  config.progress = True
  config.tokenizer = ""
  config.synthetic_data = tiny
  # How the policy's prompts are rendered: "checkpoint" (as it was trained, read from
  # its export's zsjax_prompt.json), "chat" (the tokenizer's chat template) or "plain".
  config.prompt_format = "plain" if tiny else "checkpoint"
  # The search method's wording when prompt_format is not "checkpoint" (which reads it
  # from the export): "search_r1", the reference's prompt and feedback (released
  # ZeroSearch / Search-R1 policies), or "zsjax" (zsjax.template.PROMPT_STYLES)
  config.prompt_style = "zsjax" if tiny else "search_r1"
  config.instruction = ""  # the search method's instruction; empty = the checkpoint's / style's
  config.policy = ml_collections.ConfigDict(dict(
      checkpoint="", orbax_dir="", orbax_step=0, param_dtype="float32",
      dtype="float32" if tiny else "bfloat16", remat="none",
      attention_impl="auto",  # auto (cuDNN on a GPU in bfloat16) | einsum | xla | cudnn
      model=dict(arch="qwen2", vocab_size=0, embed_dim=64, mlp_dim=128, num_layers=2,
                 num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True, tie_embeddings=True,
                 max_position_embeddings=4096, eos_token_ids=(), dtype="float32",
                 param_dtype="float32", remat="none") if tiny else {}))
  config.simulator = ml_collections.ConfigDict(dict(
      checkpoint="", param_dtype="float32", dtype="float32", remat="none", model={},
      attention_impl="auto",
      # "zerosearch": the released simulators' prompt; "" (or "zsjax"): our wording; or a template
      template="" if tiny else "zerosearch",
      chat_template=not tiny,  # a chat simulator: its chat template / chat messages
      max_prefix_tokens=192 if tiny else 320, max_new_tokens=64 if tiny else 512,
      temperature=0.0,  # evaluation decodes the simulator greedily
      top_p=1.0,  # when temperature > 0
      sampling_method="gumbel",  # | inverse_cdf, when temperature > 0
      noise_probability=0.0))  # share of noisy calls when the engine is a simulator
  config.engine = ml_collections.ConfigDict(dict(
      kind="bm25",  # | simulator | http | retriever (a Search-R1 server: POST /retrieve)
      corpus="", text_field="contents", top_k=3 if tiny else 5,
      url="", model="", timeout_s=30.0, max_retries=2,  # timeout_s: a deadline per attempt
      # a step (an eval set) with more failed search calls than this share fails;
      # RL stops after max_failed_steps failing steps in a row, eval exits non-zero
      max_failed_share=0.2, max_failed_steps=3, backoff_s=1.0,
      concurrency=16,  # chat requests in flight at once (one POST each)
      max_text_bytes=1024))  # a host engine gets each question and answer, at most this long
  config.rollout = ml_collections.ConfigDict(dict(
      max_turns=2 if tiny else 5, max_new_tokens=24 if tiny else 500,
      max_obs_tokens=192 if tiny else 2048, max_length=768 if tiny else 4096,
      max_query_tokens=24 if tiny else 64,
      # the simulator's prompt and observation blocks tokenized on the host as one string
      # (the reference's tokenization), or assembled from token pieces on device
      retokenize=not tiny,
      attention_view=512))  # decode reads the smallest cache view holding every row
  config.eval = ml_collections.ConfigDict(dict(
      sets="" if tiny else "nq,triviaqa,popqa,hotpotqa,2wikimultihopqa,musique,bamboogle",
      methods="search,direct,cot,rag", sample_size=64 if tiny else 500,
      batch_size=8, prompt_width=320 if tiny else 1024, on_error="skip"))
  # multi-process start-up (zsjax.sharding.initialize_distributed); evaluation itself
  # runs on one device. Empty / 0 / -1 = the environment's JAX_COORDINATOR_ADDRESS, ...
  config.distributed = ml_collections.ConfigDict(dict(
      coordinator_address="", num_processes=0, process_id=-1, auto=False, local_device_ids=()))
  return config
