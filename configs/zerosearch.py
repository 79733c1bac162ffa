"""ZeroSearch RL (job "rl"): the paper's settings, or a tiny random model.

Arg: "<model>[,<algorithm>]"
  model      tiny | qwen2.5-3b | qwen2.5-7b | llama3.2-3b | qwen3-4b
  algorithm  reinforce (the paper's default) | grpo | ppo

Commands:
  # the paper, Qwen2.5-7B base policy, REINFORCE, simulator on device (8 x 80 GB GPUs)
  python -m zsjax.main --config=configs/zerosearch.py:qwen2.5-7b,reinforce --workdir=/runs/zs7b \\
      --config.policy.checkpoint=/models/Qwen2.5-7B --config.simulator.checkpoint=/models/Sim-14B \\
      --config.data.train_files=/data/nq_hotpotqa_train.parquet
  # a tiny random policy and simulator on a synthetic QA set, CPU, ~1 minute
  python -m zsjax.main --config=configs/zerosearch.py:tiny --workdir=/tmp/zs_tiny

Hardware and expected results (Expected):
  qwen2.5-7b / qwen2.5-3b / llama3.2-3b: one node of 8 GPUs with >= 80 GB each
    (FSDP over all of them); 203 steps. The paper reports average EM over seven QA
    sets of 40.93 (7B), 34.47 (3B) and 36.07 (LLaMA-3.2-3B) with REINFORCE; GRPO
    33.17 and PPO 32.67 for Qwen2.5-3B (METHOD.md §8). Evaluate with job "eval".
    The LLaMA policy cannot share token ids with a Qwen simulator, so its config
    calls a served simulator over HTTP (config.engine.url).
  qwen3-4b (Qwen3-4B-Base, not in the paper): the paper's hyperparameters and a
    curriculum 0 -> 0.5. The paper ends higher for larger policies (3B 0.25, 7B 0.75):
    a stronger policy gains from harder, noisier documents. A 4B base sits between
    the two, so it ends between them; the paper's fixed p = 0.5 ablation cost only
    1-2 EM points, so 0.5 is a safe end. An on-device simulator must share the
    policy's tokenizer (a Qwen3 one); otherwise serve it (config.engine.kind=http).
  tiny: a 2-core CPU; random models learn nothing useful, so only the mechanics
    are shown: metrics.jsonl, TensorBoard events, checkpoints and an HF export in
    WORKDIR; reward/f1 stays near 0.

Hyperparameters (METHOD.md §7): 64 prompts x 5 samples per step, 203 steps, lr
1e-6 with linear warmup over 95% of updates (28.5% for PPO), one epoch in
minibatches of 256 trajectories, KL 0.001 (k3, added), entropy 0.001, clip 0.2,
top-5 documents; PPO: GAE gamma = lambda = 1, critic lr 1e-5 with a 1.5% warmup,
value clip 0.5. Sampling in training: temperature 1.0, top-p 0.95; the simulator:
temperature 0.8, at most 600 new tokens; AdamW weight decay 0.01 (veRL's default).
"""

import ml_collections

MODELS = ("tiny", "qwen2.5-3b", "qwen2.5-7b", "llama3.2-3b", "qwen3-4b")
ALGORITHMS = ("reinforce", "grpo", "ppo")

# The paper's curriculum per policy (start -> end noise probability).
CURRICULUM = {"qwen2.5-3b": (0.0, 0.25), "qwen2.5-7b": (0.0, 0.75), "llama3.2-3b": (0.25, 0.5),
              "qwen3-4b": (0.0, 0.5), "tiny": (0.0, 0.5)}


def tiny_model() -> ml_collections.ConfigDict:
  """A small random Qwen2-style decoder (vocab 0 = the tokenizer's size)."""
  return ml_collections.ConfigDict(dict(
      arch="qwen2", vocab_size=0, embed_dim=64, mlp_dim=128, num_layers=2, num_heads=4,
      num_kv_heads=2, head_dim=16, qkv_bias=True, tie_embeddings=True,
      max_position_embeddings=4096, eos_token_ids=(), dtype="float32", param_dtype="float32",
      remat="none"))


def get_config(arg=None):
  model, _, algorithm = (arg or "tiny").partition(",")
  algorithm = algorithm or "reinforce"
  if model not in MODELS:
    raise ValueError(f"config arg model {model!r} is not one of {MODELS}.")
  if algorithm not in ALGORITHMS:
    raise ValueError(f"config arg algorithm {algorithm!r} is not one of {ALGORITHMS}.")
  tiny = model == "tiny"

  config = ml_collections.ConfigDict()
  config.job = "rl"
  config.seed = 0
  config.progress = True  # progress bar with ETA on the terminal
  config.tokenizer = ""  # a local directory; empty = the policy checkpoint's
  # tiny: build a small synthetic QA set and tokenizer in WORKDIR when no data is given.
  config.synthetic_data = tiny

  config.policy = ml_collections.ConfigDict(dict(
      checkpoint="",  # a local HF directory; empty = random model from `model`
      param_dtype="float32", dtype="float32" if tiny else "bfloat16",
      remat="none" if tiny else "full",
      # positions per piece of the LM head in training and scoring (0 = all at once): the
      # same log-probs without a [rows, length, vocab] float32 array (a 152k vocab
      # makes that 80 GB for 32 rows of 4096 tokens)
      logits_chunk=0 if tiny else 256,
      # attention without a cache (scoring, the update, prefills): "auto" = cuDNN's fused
      # kernel on a GPU in bfloat16, zsjax's einsums elsewhere | einsum | xla | cudnn
      attention_impl="auto",
      model=tiny_model()))
  config.simulator = ml_collections.ConfigDict(dict(
      checkpoint="", param_dtype="float32" if tiny else "bfloat16",
      dtype="float32" if tiny else "bfloat16", remat="none", attention_impl="auto",
      model=tiny_model(),
      # "zerosearch": the released simulators' prompt (zsjax.simulator.ZEROSEARCH_TEMPLATE);
      # "" (or "zsjax"): our wording; or a template's own text with {query}
      template="" if tiny else "zerosearch",
      # released simulators are chat models: their prompt in their chat template with an
      # empty system message (on device), or chat messages over HTTP
      chat_template=not tiny,
      max_prefix_tokens=192 if tiny else 320,  # simulator prompt before the query
      max_new_tokens=32 if tiny else 600, temperature=0.8 if not tiny else 1.0,
      top_p=1.0,  # on device and sent to a served simulator (vLLM's default: 1.0)
      sampling_method="gumbel"))  # | inverse_cdf: the same distribution, a cheaper draw
  config.engine = ml_collections.ConfigDict(dict(
      # simulator (on device) | bm25 (config.engine.corpus) | http (a served simulator) |
      # retriever (a Search-R1 retrieval server at config.engine.url: POST /retrieve)
      kind="simulator",
      top_k=5, corpus="", text_field="contents",
      url="", model="", timeout_s=30.0, max_retries=2,  # timeout_s: a deadline per attempt
      # a step (an eval set) with more failed search calls than this share fails;
      # RL stops after max_failed_steps failing steps in a row, eval exits non-zero
      max_failed_share=0.2, max_failed_steps=3, backoff_s=1.0,
      concurrency=16,  # chat requests in flight at once (one POST each)
      max_text_bytes=1024))  # a host engine gets each question and answer, at most this long
  config.data = ml_collections.ConfigDict(dict(
      train_files="",  # comma-separated .parquet / .jsonl (common QA or Search-R1 format)
      on_error="skip", limit=0, chat_template=not tiny,
      # the policy's wording (zsjax.template.PROMPT_STYLES): "search_r1" is the prompt and
      # invalid-action feedback of the reference's parquet and trainer; "zsjax" our own
      prompt_style="zsjax" if tiny else "search_r1",
      instruction=""))  # the policy's instruction; empty = the prompt style's
  config.rollout = ml_collections.ConfigDict(dict(
      max_turns=2 if tiny else 5, max_new_tokens=24 if tiny else 500,
      max_obs_tokens=64 if tiny else 2048, max_length=512 if tiny else 4096,
      max_query_tokens=16 if tiny else 64, max_prompt_tokens=256 if tiny else 512,
      # decode attention reads the smallest cache view (4096, 2048, 1024, 512 slots)
      # holding every row; 0 reads the whole cache
      attention_view=512,
      # compute dtype of the rollout and its KV cache: float32 | bfloat16 | float16;
      # "" = the policy's own (params stay as loaded)
      dtype="",
      # True: the simulator's prompt and each observation block are tokenized on the host
      # as one string, as the reference does (exact at tokenizer seams such as "?\n");
      # False: assembled from token pieces on device (no host round trip per turn)
      retokenize=not tiny,
      # the step's prompts are rolled out in this many waves (each a whole number of GRPO
      # groups, keyed by its own rng): the live KV caches of policy and simulator are a
      # wave's, not the step's (experiments/plan_rl.py --waves). 1: all rows at once
      waves=1,
      # each prompt is prefilled once per group of rl.samples_per_prompt rows and its
      # cache copied to them (where a wave's prompts split evenly over data x fsdp); the
      # same trajectories (tests/test_rollout.py), so on in the paper configs
      share_prompt=not tiny))
  # the policy in training: temperature 1, top-p 0.95 (ZeroSearch's trainer); evaluation is
  # greedy (configs/eval.py). method="inverse_cdf" draws from the same distribution as
  # "gumbel" with a cheaper sampler (zsjax.sampling.Sampling.method).
  config.sampling = ml_collections.ConfigDict(dict(kind="sample", temperature=1.0,
                                                   top_p=1.0 if tiny else 0.95,
                                                   top_k=0, method="gumbel"))
  start, end = CURRICULUM[model]
  config.curriculum = ml_collections.ConfigDict(dict(
      kind="exponential", start=start, end=end, base=4.0, probability=0.5))
  config.rl = ml_collections.ConfigDict(dict(
      algorithm=algorithm, reward="f1",
      prompts_per_step=4 if tiny else 64, samples_per_prompt=2 if tiny else 5,
      total_steps=3 if tiny else 203, epochs=1,
      # the steps the lr warmup/decay and the noise curriculum span; 0 = total_steps. To
      # run a finished run longer on its schedules, raise total_steps and set this to
      # the old total (a resume with another span is refused, naming this field)
      schedule_steps=0,
      minibatch_size=8 if tiny else 256, micro_batch_size=8 if tiny else 16,
      score_batch_size=8 if tiny else 32,
      learning_rate=1e-4 if tiny else 1e-6,
      warmup_fraction=0.285 if algorithm == "ppo" else 0.95,
      decay="constant",  # | cosine (to 0 at the last update, after the warmup)
      weight_decay=0.0 if tiny else 0.01, grad_clip=1.0,  # AdamW 0.01: veRL's default
      clip_eps=0.2, dual_clip=0.0,  # 0 = off; the paper's setting would be 3
      kl_coef=0.001, kl_type="k3", entropy_coef=0.001,
      aggregation="token_mean",  # | seq_mean_token_mean
      loss_mask="policy",  # | response (ablation: inserted documents in the loss too)
      critic_learning_rate=1e-5 if not tiny else 1e-4,
      critic_warmup_fraction=0.0 if tiny else 0.015,  # the critic's lr warmup (ZeroSearch PPO)
      value_clip=0.5, gamma=1.0, lam=1.0,
      sample_every=0,  # > 0: every N steps, decoded trajectories to WORKDIR/samples.jsonl
      sample_rows=4,  # trajectories per sample
      scoring_dtype="",  # compute dtype of the scoring pass (as rollout.dtype); "" = the policy's
      # the frozen reference's params: "" = the policy's param dtype; bfloat16 halves them
      # (veRL keeps its reference in bf16 too)
      reference_dtype="" if tiny else "bfloat16",
      # padding-free scoring and update: trajectories packed into rows of this many tokens
      # (>= rollout.max_length; zsjax.packing); 0: each in its own padded row. The same
      # loss and gradients up to float rounding (tests/test_packing.py)
      pack_tokens=0 if tiny else 4096,
      # False: no scoring pass for the old log-probs; the update's own, held fixed, stand
      # in (one update a step only: epochs 1 and one minibatch; not PPO). The paper's
      # 320 trajectories make two updates (256 + 64), so its step needs the pass
      old_logp_pass=True,
      # keep the reference / the optimizer state in host memory ("pinned_host") between
      # the phases that use them: less device memory, a copy each way a step
      # (experiments/plan_rl.py counts both)
      offload_reference=False, offload_optimizer=False))
  config.checkpoint = ml_collections.ConfigDict(dict(
      every=1 if tiny else 20, max_to_keep=3, async_save=True, export_hf=True))
  config.mesh = ml_collections.ConfigDict(dict(data=-1 if tiny else 1, fsdp=1 if tiny else -1,
                                               tensor=1))
  config.sharding = "dp" if tiny else "fsdp"
  config.sharding_rules = ()
  # multi-process start-up (zsjax.sharding.initialize_distributed); empty / 0 / -1 = the
  # environment's JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID; auto: let JAX
  # find the cluster (SLURM, TPU pods); local_device_ids: this process's devices, () = all
  config.distributed = ml_collections.ConfigDict(dict(
      coordinator_address="", num_processes=0, process_id=-1, auto=False, local_device_ids=()))

  if not tiny:
    for section in (config.policy, config.simulator):
      section.model = ml_collections.ConfigDict()  # real runs load checkpoints
  if model == "llama3.2-3b":
    config.engine.kind = "http"
    config.engine.model = "simulator"
  return config
