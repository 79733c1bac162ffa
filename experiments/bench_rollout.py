"""Rollout speed in the RL regime: the jitted rollout vs the Python-driven loop vs
the reference architecture (transformers ``generate``), same weights, at the
tiny world's policy shape and at a ~0.1B shape.

One rollout is what an RL step draws: ``--batch`` rows (prompts x samples),
``--turns`` turns of ``--new_tokens`` tokens sampled at temperature 1, a search
at the end of every turn but the last (the last answers), and for each search
the LLM simulator writes ``--doc_tokens`` tokens (five documents of ~40 tokens
by default) that go into the policy's context, under a context cap of
``--max_length`` tokens. The simulator has the policy's shape and weights.

The models are random, so the actions are scripted: each turn's tokens are
drawn at temperature 1 from plain word tokens (no tag, marker or blank can
form by chance), and its last tokens are forced to ``<search> ... </search>``
(``<answer> ... </answer>`` in the last turn). The simulator draws the same way
with no script. Every loop therefore generates the same number of tokens:

  (a) jitted:     ``zsjax.rollout`` with the on-device ``SimulatorEngine``: one
                  XLA program; the policy's KV cache lives across turns, attention
                  reads its live prefix (``RolloutConfig.attention_view``), the
                  simulator's documents are prefilled into it;
  (b) python:     ``zsjax.rollout_reference``: host loops over jitted prefill and
                  one-token forwards (the same cached attention), text decoded and
                  searched for tags every token, the simulator a host engine
                  (``PythonSimulator``) driven the same way;
  (c) reference:  the reference code's architecture: transformers ``generate``
                  for the policy on the whole context each turn (re-encoded:
                  a new prefill every turn), the query parsed from the text,
                  the simulator's prompt rendered and run through ``generate``, its
                  documents parsed and tokenized into the context;
  (a'') jit_shared: (a) with each group of ``--samples`` rows (one prompt) prefilled
                  once and its cache copied (``RolloutConfig.prompt_group``);
                  checked to give (a)'s trajectories;
  (d) model_only: the same forwards in one XLA program and nothing else: the
                  prompt prefill, one cached forward + argmax per policy token,
                  the simulator's prefill and one forward per document token, the
                  documents' prefill into the policy's cache. No rollout of these
                  models on this backend can beat it.

Prints a table of generated tokens/s (policy + simulator) and the ratios per
size, and as its last line one JSON object: the tiny-size figures at top level,
the ~0.1B figures under ``large``. Targets (issue 20): (a) >= 3x (c),
>= 1.5x (b), >= 80% of (d).

  python experiments/bench_rollout.py --out=experiments/results/rollout_rl_cpu
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
ARCH_KEYS = ("vocab_size", "embed_dim", "mlp_dim", "num_layers", "num_heads", "num_kv_heads",
             "head_dim")
QUESTION, ANSWER = "Who founded the city of Orlam?", "Kester Vale"


def tiny_world_policy() -> dict:
  """The policy shape of tiny world v2 (configs/tiny_world.py:v2, read from it), the
  shape the committed rollout tables measured (tiny world v3's has 8 full heads)."""
  from sweep import config_module  # experiments/, beside this file

  config = config_module(ROOT / "configs" / "tiny_world.py").get_config("v2")
  shape = {k: config.warm_start.model.model[k] for k in ARCH_KEYS}
  shape["vocab_size"] = config.world.vocab_size  # the world's tokenizer sets it
  return shape


SIZES = {
    # the tiny world's policy size, and a ~0.1B Qwen2-shaped model
    "tiny": tiny_world_policy(),
    "large": dict(vocab_size=8192, embed_dim=768, mlp_dim=2048, num_layers=12, num_heads=12,
                  num_kv_heads=2, head_dim=64),
}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--sizes", default="tiny,large")
  p.add_argument("--batch", type=int, default=64, help="rows: prompts x samples")
  p.add_argument("--prompt_tokens", type=int, default=128)
  p.add_argument("--new_tokens", type=int, default=64, help="policy tokens per turn")
  p.add_argument("--turns", type=int, default=4, help="turns per rollout (max_turns + 1)")
  p.add_argument("--doc_tokens", type=int, default=200, help="simulator tokens per search")
  p.add_argument("--max_length", type=int, default=2048, help="the policy's context cap")
  p.add_argument("--samples", type=int, default=1,
                 help="rows sharing a prompt (a GRPO group; the paper: 5): consecutive rows get "
                      "the same prompt, and loop jit_shared prefills it once per group")
  p.add_argument("--repeats", default="3,1",
                 help="timed runs per size (one number, or one per --sizes entry); the best "
                      "is kept")
  p.add_argument("--loops", default="jit,jit_cdf,python,reference,model_only",
                  help="which loops to time (jit always runs: it checks the script)")
  p.add_argument("--profile", default="",
                 help="a directory: one more run of the jitted rollout and of model_only each "
                      "under jax.profiler.trace (DIR/<size>_<loop>), for xprof / TensorBoard")
  p.add_argument("--out", default="")
  return p.parse_args(argv)


def make_tokenizer(vocab: int):
  """A byte-level BPE trained here on template and simulator-prompt text."""
  import transformers
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  from zsjax import template as T
  from zsjax.simulator import DEFAULT_TEMPLATE

  text = [T.INSTRUCTION, T.INVALID_ACTION_FEEDBACK, T.render_observation(["a document"]),
          DEFAULT_TEMPLATE, QUESTION, ANSWER]
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(text * 20, trainers.BpeTrainer(
      vocab_size=min(vocab, 600), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      special_tokens=["<|end|>", "<|pad|>"]))
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>",
                                              pad_token="<|pad|>")


def word_tokens(tokenizer, vocab_size: int) -> np.ndarray:
  """``[V]`` bool: ids whose text is a word, optionally after one space. Drawn
  from these, no tag, ``Doc`` marker, end token or blank line can form."""
  from zsjax.template import token_bytes

  pieces = token_bytes(tokenizer, vocab_size)
  return np.asarray([re.fullmatch(rb" ?[A-Za-z]+", p) is not None for p in pieces])


@dataclasses.dataclass(frozen=True, eq=False)
class ScriptedDraws:
  """Temperature-1 draws among ``allowed`` tokens; a row's g-th token is
  ``script[g]`` where that is >= 0 (``zsjax.sampling.sample`` accepts any
  object with this ``sample`` method). The log-prob is the model's, at T = 1."""

  allowed: np.ndarray  # [V] bool
  script: np.ndarray  # [G] int32, -1 = draw
  method: str = "gumbel"  # zsjax.sampling.Sampling.method

  temperature = 1.0

  def sample(self, logits, rng, position):
    import jax.numpy as jnp

    from zsjax.sampling import Sampling, draw, log_prob_of

    logits = logits.astype(jnp.float32)
    drawn = draw(self.method, rng, jnp.where(jnp.asarray(self.allowed), logits, -1e30))
    script = jnp.asarray(self.script)
    forced = script[jnp.clip(position, 0, script.shape[0] - 1)]
    tokens = jnp.where(forced >= 0, forced, drawn).astype(jnp.int32)
    return tokens, log_prob_of(Sampling(), logits, tokens)


def action_script(tokenizer, turns: int, new_tokens: int) -> np.ndarray:
  """Every turn ends with a search, the last with an answer: ``[turns * T + 1]``."""
  search = tokenizer.encode("<search> Orlam founder </search>", add_special_tokens=False)
  answer = tokenizer.encode(f"<answer> {ANSWER} </answer>", add_special_tokens=False)
  script = np.full(turns * new_tokens + 1, -1, np.int32)
  for turn in range(turns):
    tail = answer if turn == turns - 1 else search
    if len(tail) > new_tokens:
      raise ValueError(f"--new_tokens={new_tokens} is shorter than the {len(tail)}-token action.")
    end = (turn + 1) * new_tokens
    script[end - len(tail):end] = tail
  return script


def bench_size(name, args, repeats: int):
  import jax
  import jax.numpy as jnp

  from zsjax import rollout as R
  from zsjax import template as T
  from zsjax.model import (ModelConfig, Transformer, cached_apply, count_params, init_cache,
                           init_params)
  from zsjax.rollout_reference import PythonSimulator, python_rollout
  from zsjax.simulator import SimulatorEngine, SimulatorPrompt

  cfg = ModelConfig.from_dict({**SIZES[name], "arch": "qwen2", "qkv_bias": True})
  tokenizer = make_tokenizer(cfg.vocab_size)
  params = init_params(cfg, jax.random.key(0))
  static = R.prepare_static_tokens(tokenizer, cfg.vocab_size, eos_ids=())
  matcher = T.build_tag_matcher(tokenizer, vocab_size=cfg.vocab_size)
  b, p, t, turns, d = args.batch, args.prompt_tokens, args.new_tokens, args.turns, args.doc_tokens
  loops = set(args.loops.split(","))
  allowed = word_tokens(tokenizer, cfg.vocab_size)
  policy_draws = ScriptedDraws(allowed, action_script(tokenizer, turns, t))
  sim_draws = ScriptedDraws(allowed, np.full(1, -1, np.int32))
  prompt_text = SimulatorPrompt()
  sim_prefix = max(len(tokenizer.encode(prompt_text.split(QUESTION, ANSWER, noisy)[0]))
                   for noisy in (False, True))
  query_width = 16
  engine = SimulatorEngine(cfg, tokenizer, prompt_text, static.piece_bytes, max_new_tokens=d,
                           prefix_width=sim_prefix, query_width=query_width, sampling=sim_draws,
                           eos_ids=(), pad_id=static.pad_id)
  wrapper = int(static.obs_open.shape[0] + static.obs_close.shape[0])
  # the host loops render "Doc 1: ..." around the text; the feedback must fit too
  obs_width = max(d + wrapper + 16, int(static.feedback.shape[0]))
  config = R.RolloutConfig(max_turns=turns - 1, max_new_tokens=t, max_obs_tokens=obs_width,
                           max_length=args.max_length, max_query_tokens=query_width)
  rng = np.random.default_rng(0)
  words = np.flatnonzero(allowed[:len(tokenizer)])
  if b % args.samples:
    raise ValueError(f"--batch={b} is not a multiple of --samples={args.samples}.")
  prompts = np.repeat(rng.choice(words, (b // args.samples, p)), args.samples,
                      axis=0).astype(np.int32)
  batch = R.RolloutBatch(prompt_tokens=jnp.asarray(prompts),
                         prompt_lengths=jnp.full((b,), p, jnp.int32),
                         engine_inputs=engine.inputs([QUESTION] * b, [ANSWER] * b))
  policy_tokens, sim_tokens = b * t * turns, b * d * (turns - 1)
  generated = policy_tokens + sim_tokens

  def best(fn, label=""):
    times = []
    for _ in range(repeats):
      if label:
        print(f"{name}: timing {label}", file=sys.stderr, flush=True)
      start = time.perf_counter()
      out = fn()
      times.append(time.perf_counter() - start)
    return min(times), out

  row = {"size": name, "params": count_params(params), "batch": b, "turns": turns,
         "repeats": repeats,
         "policy_tokens": policy_tokens, "simulator_tokens": sim_tokens,
         "generated_tokens": generated}

  # (a) the jitted rollout
  rollout = jax.jit(R.make_rollout(cfg, matcher, static, engine, config, policy_draws))
  start = time.perf_counter()
  compiled = rollout.lower(params, params, batch, jax.random.key(1), 1).compile()
  row["jit_compile_s"] = time.perf_counter() - start
  jit_s, traj = best(lambda: jax.block_until_ready(
      compiled(params, params, batch, jax.random.key(2), 1)), "jitted")
  row["jit_policy_tokens"] = int(np.asarray(traj.loss_mask).sum())
  row["jit_searches"] = int(np.asarray(traj.searches).sum())
  row["jit_longest_context"] = int(np.asarray(traj.lengths).max())
  row["jit_s"] = jit_s
  if row["jit_policy_tokens"] != policy_tokens or row["jit_searches"] != b * (turns - 1):
    raise RuntimeError(f"the scripted rollout drifted: {row}")

  # (a') the same with the cheaper exact sampler (Sampling(method="inverse_cdf"))
  if "jit_cdf" in loops:
    cdf_engine = dataclasses.replace(engine, sampling=dataclasses.replace(sim_draws,
                                                                          method="inverse_cdf"))
    cdf = jax.jit(R.make_rollout(cfg, matcher, static, cdf_engine, config,
                                 dataclasses.replace(policy_draws, method="inverse_cdf")))
    cdf = cdf.lower(params, params, batch, jax.random.key(1), 1).compile()
    row["jit_cdf_s"], cdf_traj = best(lambda: jax.block_until_ready(
        cdf(params, params, batch, jax.random.key(2), 1)), "jitted, inverse_cdf")
    if int(np.asarray(cdf_traj.loss_mask).sum()) != policy_tokens:
      raise RuntimeError("the scripted rollout drifted with the inverse_cdf sampler")

  # (a'') the same with each group's prompt prefilled once (RolloutConfig.prompt_group)
  if "jit_shared" in loops:
    shared = jax.jit(R.make_rollout(cfg, matcher, static, engine,
                                    dataclasses.replace(config, prompt_group=args.samples),
                                    policy_draws))
    shared = shared.lower(params, params, batch, jax.random.key(1), 1).compile()
    row["jit_shared_s"], shared_traj = best(lambda: jax.block_until_ready(
        shared(params, params, batch, jax.random.key(2), 1)), "jitted, shared prompt")
    if not np.array_equal(np.asarray(shared_traj.tokens), np.asarray(traj.tokens)):
      raise RuntimeError("the shared prefill changed the trajectories")
    row["shared_speedup"] = jit_s / row["jit_shared_s"]

  # (b) the Python-driven loop, the simulator a Python-driven host engine
  sim_width = sim_prefix + query_width + 16

  def run_python(max_new_tokens=t, doc_tokens=d):
    simulator = PythonSimulator(cfg, params, tokenizer, prompt_text, doc_tokens, sim_width,
                                sampling=sim_draws, pad_id=static.pad_id)
    out = python_rollout(cfg, params, tokenizer, static, simulator,
                         dataclasses.replace(config, max_new_tokens=max_new_tokens),
                         policy_draws, batch, [QUESTION] * b, [ANSWER] * b, jax.random.key(2), 1)
    return out, simulator.generated

  if "python" in loops:
    run_python(t, 2)  # compiles its forwards (the shapes do not depend on the counts)
    python_s, (slow, python_sim_tokens) = best(run_python, "python")
    row["python_s"] = python_s
    row["python_policy_tokens"] = int(slow.loss_mask.sum())
    row["python_simulator_tokens"] = python_sim_tokens

  # (d) the model alone
  model = Transformer(cfg)
  views = config.attention_views
  sim_prompt = jnp.asarray(rng.choice(words, (b, sim_prefix + query_width)).astype(np.int32))
  obs = jnp.asarray(rng.choice(words, (b, obs_width)).astype(np.int32))

  @jax.jit
  def model_only(params, prompt):
    cache = init_cache(cfg, b, args.max_length)
    logits, cache = model.apply({"params": params}, prompt, cache=cache, attend=0)
    token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)

    def decode(step_apply, n, cache, token):
      def step(_, carry):
        cache, token = carry
        logits, cache = step_apply(token[:, None], cache)
        return cache, jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
      return jax.lax.fori_loop(0, n, step, (cache, token))

    policy_apply = lambda tokens, cache: cached_apply(model, params, tokens, cache, views=views)
    sim_apply = lambda tokens, cache: model.apply({"params": params}, tokens, cache=cache)

    def turn(_, carry):
      cache, token = decode(policy_apply, t, *carry)
      sim_cache = init_cache(cfg, b, sim_prompt.shape[1] + d)
      logits, sim_cache = sim_apply(sim_prompt, sim_cache)
      _, docs = decode(sim_apply, d, sim_cache, jnp.argmax(logits[:, -1], -1).astype(jnp.int32))
      logits, cache = policy_apply(jnp.where(docs[:, None] >= 0, obs, 0), cache)
      return cache, jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)

    cache, token = jax.lax.fori_loop(0, turns - 1, turn, (cache, token))
    return decode(policy_apply, t, cache, token)[1]

  if "model_only" in loops:
    jax.block_until_ready(model_only(params, batch.prompt_tokens))
    row["model_only_s"] = best(lambda: jax.block_until_ready(
        model_only(params, batch.prompt_tokens)), "model_only")[0]

  if args.profile:  # where the time goes, op by op (after the timed runs: they stay clean)
    for loop, run in (("jit", lambda: compiled(params, params, batch, jax.random.key(2), 1)),
                      ("model_only", lambda: model_only(params, batch.prompt_tokens))):
      if loop == "model_only" and "model_only" not in loops:
        continue
      with jax.profiler.trace(str(Path(args.profile) / f"{name}_{loop}")):
        jax.block_until_ready(run())

  # (c) the reference architecture
  if "reference" in loops:
    row.update(bench_reference(cfg, params, tokenizer, static, prompts, prompt_text, args,
                               policy_draws, allowed, best))

  for key in ("jit", "jit_cdf", "jit_shared", "python", "model_only", "reference"):
    if f"{key}_s" in row:
      row[f"{key}_tokens_per_s"] = generated / row[f"{key}_s"]
  for key, ratio in (("python", "ratio_vs_python"), ("reference", "ratio_vs_reference")):
    if f"{key}_s" in row:
      row[ratio] = row[f"{key}_s"] / jit_s
  if "model_only_s" in row:
    row["fraction_of_model_only"] = row["model_only_s"] / jit_s
  if "jit_cdf_s" in row:
    for key, ratio in (("python", "cdf_ratio_vs_python"),
                       ("reference", "cdf_ratio_vs_reference"),
                       ("model_only", "cdf_fraction_of_model_only")):
      if f"{key}_s" in row:
        row[ratio] = row[f"{key}_s"] / row["jit_cdf_s"]
  return row


def bench_reference(cfg, params, tokenizer, static, prompts, prompt_text, args, policy_draws,
                    allowed, best) -> dict:
  try:
    import torch
    import transformers
  except ImportError:
    print("transformers/torch not installed: skipping the reference column", file=sys.stderr)
    return {}
  from zsjax import hf
  from zsjax.search import document_tokens
  from zsjax.simulator import parse_documents

  torch.set_num_threads(len(os.sched_getaffinity(0)))
  with tempfile.TemporaryDirectory() as tmp:
    hf.save_checkpoint(tmp, cfg, params)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp).eval()
  b, t, turns, d = args.batch, args.new_tokens, args.turns, args.doc_tokens
  blocked = torch.as_tensor(~allowed)
  script = torch.as_tensor(policy_draws.script[:-1].astype(np.int64))
  pad = static.pad_id
  obs_open = list(np.asarray(static.obs_open))
  obs_close = list(np.asarray(static.obs_close))

  class Draws(transformers.LogitsProcessor):
    """Word tokens only; the script forced where it has a token."""

    def __init__(self, start: int, offset: int, scripted: bool):
      self.start, self.offset, self.scripted = start, offset, scripted

    def __call__(self, input_ids, scores):
      scores = scores.masked_fill(blocked[None, :scores.shape[1]], -float("inf"))
      if self.scripted:
        forced = int(script[self.offset + input_ids.shape[1] - self.start])
        if forced >= 0:
          scores = torch.full_like(scores, -float("inf"))
          scores[:, forced] = 0.0
      return scores

  def left_pad(rows):
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
      ids[i, width - len(row):] = torch.as_tensor(row)
      mask[i, width - len(row):] = 1
    return ids, mask

  def generate(rows, new_tokens, processor):
    ids, mask = left_pad(rows)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=True, temperature=1.0, top_k=0,
                         top_p=1.0, logits_processor=[processor], pad_token_id=pad,
                         eos_token_id=None)
    return out[:, ids.shape[1]:].tolist()

  def run():
    torch.manual_seed(0)
    context = [list(map(int, row)) for row in prompts]
    counts = {"policy": 0, "simulator": 0}
    with torch.no_grad():
      for turn in range(turns):
        width = max(map(len, context))
        new = generate(context, t, Draws(width, turn * t, True))  # the whole context again
        counts["policy"] += sum(map(len, new))
        for row, ids in zip(context, new):
          row.extend(ids)
        if turn == turns - 1:
          break
        texts = tokenizer.batch_decode(new, skip_special_tokens=False)
        queries = [text.split("<search>", 1)[1].split("</search>", 1)[0] for text in texts]
        sim_rows = [tokenizer.encode(prompt_text.render(q, QUESTION, ANSWER, False),
                                     add_special_tokens=False) for q in queries]
        docs = generate(sim_rows, d, Draws(max(map(len, sim_rows)), 0, False))
        counts["simulator"] += sum(map(len, docs))
        for row, text in zip(context, tokenizer.batch_decode(docs, skip_special_tokens=False)):
          row.extend(obs_open + document_tokens(tokenizer, parse_documents(text, 5)) + obs_close)
    return counts

  seconds, counts = best(run, "reference")  # nothing to compile: every run is timed
  return {"reference_s": seconds, "reference_policy_tokens": counts["policy"],
          "reference_simulator_tokens": counts["simulator"]}


COLUMNS = ("size", "params", "generated_tokens", "jit_compile_s", "jit_tokens_per_s",
           "jit_cdf_tokens_per_s", "jit_shared_tokens_per_s", "shared_speedup",
           "python_tokens_per_s", "reference_tokens_per_s",
           "model_only_tokens_per_s", "ratio_vs_reference", "ratio_vs_python",
           "fraction_of_model_only", "cdf_ratio_vs_reference", "cdf_fraction_of_model_only")


def main(argv=None):
  args = parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax

  sys.path.insert(0, str(Path(__file__).resolve().parent))
  from bench_sharding import markdown_table

  from zsjax.environment import describe, package_versions

  env = describe()
  env["packages"].update(package_versions(("torch",)))  # the reference loop's runtime
  versions = {k: env["packages"][k] for k in ("jax", "jaxlib", "flax", "transformers", "torch")}
  rows = []
  sizes = [s for s in args.sizes.split(",") if s]
  repeats = [int(r) for r in str(args.repeats).split(",")]
  repeats = repeats * len(sizes) if len(repeats) == 1 else repeats
  if len(repeats) != len(sizes):
    raise ValueError(f"--repeats={args.repeats} gives {len(repeats)} counts for "
                     f"{len(sizes)} sizes ({args.sizes}).")
  for name, count in zip(sizes, repeats):
    rows.append(bench_size(name, args, count))
    print(f"{name}: done", file=sys.stderr, flush=True)
  header = (f"# bench_rollout (RL regime): {args.batch} rows, prompt {args.prompt_tokens} "
            f"tokens, {args.turns} turns x {args.new_tokens} policy tokens at T=1, "
            f"{args.turns - 1} searches x {args.doc_tokens} simulator tokens, context cap "
            f"{args.max_length}, float32, {jax.devices()[0].platform}; best of {args.repeats} "
            "timed runs per size\n"
            f"machine: {env['cpu']}, {env['cores']} cores; commit {env['commit']}; "
            + ", ".join(f"{k} {v}" for k, v in versions.items())
            + "\ncommand: python experiments/bench_rollout.py " + " ".join(sys.argv[1:]))
  table = markdown_table(rows, COLUMNS)
  print(header)
  print(table)
  if args.out:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(f"{header}\n\n{table}\n")
    (out / "results.json").write_text(json.dumps({"environment": env, "args": vars(args),
                                                  "rows": rows}, indent=2) + "\n")
  keys = ("jit_tokens_per_s", "jit_cdf_tokens_per_s", "jit_shared_tokens_per_s",
          "shared_speedup", "python_tokens_per_s",
          "reference_tokens_per_s", "model_only_tokens_per_s", "ratio_vs_reference",
          "ratio_vs_python", "fraction_of_model_only", "cdf_ratio_vs_reference",
          "cdf_ratio_vs_python", "cdf_fraction_of_model_only")
  summary = {k: rows[0].get(k) for k in keys}
  if len(rows) > 1:
    summary["large"] = {k: rows[1].get(k) for k in keys}
  print(json.dumps(summary))
  return rows


if __name__ == "__main__":
  main()
