"""Rollout speed: the jitted rollout vs the Python-driven one vs transformers'
PyTorch ``generate``, same weights, prompts and batch, at two model sizes.

Each rollout runs ``--turns`` turns of ``--new_tokens`` tokens per row. The
models are random, so no row closes a tag: every turn runs to its budget and gets
the invalid-action feedback appended, the same work in all three loops (EOS
stopping is off so they generate the same number of tokens):

  (a) jitted:  ``zsjax.rollout`` (one XLA program; the KV cache is reused across
               turns and the feedback is prefilled into it);
  (b) python:  ``zsjax.rollout_reference`` (host loop over jitted prefill and
               one-token decode, the turn's text decoded and searched for tags
               every step, as the reference code does);
  (c) hf:      ``transformers`` ``generate`` per turn on the whole context (a new
               prefill each turn, the way the reference inference script works),
               tags not checked (which favours it).

A fourth column, ``model_only``, times the same prefill and one cached forward +
argmax per generated token in one XLA program and nothing else: the ceiling of
any jitted rollout of this model on this backend, so ``model_only_vs_hf`` bounds
``ratio_vs_hf``.

Prints a table of generated tokens/s and ratios per size, the model FLOP/s of (a)
against a dense-matmul peak measured in the same run, and as its last line one
JSON object: the tiny-size figures at top level, the ~0.1B figures under
``large``.

  python experiments/bench_rollout.py --out=experiments/results/rollout_cpu
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARCH_KEYS = ("vocab_size", "embed_dim", "mlp_dim", "num_layers", "num_heads", "num_kv_heads",
             "head_dim")


def tiny_world_policy() -> dict:
  """The policy shape of configs/tiny_world.py (read from it, so they stay equal)."""
  from sweep import config_module  # experiments/, beside this file

  config = config_module(ROOT / "configs" / "tiny_world.py").get_config()
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
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--prompt_tokens", type=int, default=64)
  p.add_argument("--new_tokens", type=int, default=32, help="per turn")
  p.add_argument("--turns", type=int, default=2, help="turns per rollout (max_turns + 1)")
  p.add_argument("--repeats", type=int, default=2, help="timed runs; the best is kept")
  p.add_argument("--skip_hf", action="store_true")
  p.add_argument("--out", default="")
  return p.parse_args(argv)


def make_tokenizer(vocab: int):
  """A byte-level BPE trained here on template text (nothing downloaded)."""
  import transformers
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  from zsjax import template as T

  text = [T.INSTRUCTION, T.INVALID_ACTION_FEEDBACK, T.render_observation(["a document"])]
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(text * 20, trainers.BpeTrainer(
      vocab_size=min(vocab, 600), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      special_tokens=["<|end|>", "<|pad|>"]))
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>",
                                              pad_token="<|pad|>")


class NoSearch:
  top_k = 5

  def search(self, requests):
    from zsjax.search import SearchResult
    return SearchResult([[] for _ in requests], [True] * len(requests))


def bench_size(name, args, peak):
  import jax
  import jax.numpy as jnp
  import numpy as np

  from zsjax import hf
  from zsjax import rollout as R
  from zsjax import template as T
  from zsjax.model import (ModelConfig, Transformer, count_params, init_cache, init_params,
                           model_flops_per_token)
  from zsjax.rollout_reference import python_rollout
  from zsjax.sampling import Greedy
  from zsjax.search import HostSearch

  cfg = ModelConfig.from_dict({**SIZES[name], "arch": "qwen2", "qkv_bias": True})
  tokenizer = make_tokenizer(cfg.vocab_size)
  params = init_params(cfg, jax.random.key(0))
  static = R.prepare_static_tokens(tokenizer, cfg.vocab_size, eos_ids=())
  matcher = T.build_tag_matcher(tokenizer, vocab_size=cfg.vocab_size)
  b, p, t, turns = args.batch, args.prompt_tokens, args.new_tokens, args.turns
  feedback = int(static.feedback.shape[0])
  max_length = p + turns * (t + feedback) + 8
  config = R.RolloutConfig(max_turns=turns - 1, max_new_tokens=t, max_obs_tokens=feedback + 16,
                           max_length=max_length, max_query_tokens=16)
  rng = np.random.default_rng(0)
  prompts = rng.integers(3, tokenizer.vocab_size, (b, p)).astype(np.int32)
  host = HostSearch(NoSearch(), tokenizer, max_doc_tokens=8, pad_id=static.pad_id)
  batch = R.RolloutBatch(
      prompt_tokens=jnp.asarray(prompts), prompt_lengths=jnp.full((b,), p, jnp.int32),
      engine_inputs=host.inputs([""] * b, [""] * b))
  rollout = jax.jit(R.make_rollout(cfg, matcher, static, host, config, Greedy()))
  generated = b * t * turns

  def best(fn):
    times = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      out = fn()
      times.append(time.perf_counter() - start)
    return min(times), out

  start = time.perf_counter()
  jax.block_until_ready(rollout(params, None, batch, jax.random.key(1), 1))
  compile_s = time.perf_counter() - start
  jit_s, traj = best(lambda: jax.block_until_ready(
      rollout(params, None, batch, jax.random.key(2), 1)))
  assert int(np.asarray(traj.loss_mask).sum()) == generated, "every turn should run to budget"

  def run_python():
    return python_rollout(cfg, params, tokenizer, static, NoSearch(), config, Greedy(), batch,
                          [""] * b, [""] * b, jax.random.key(2), 1)

  run_python()  # compiles its step functions
  python_s, slow = best(run_python)
  same = bool(np.array_equal(np.asarray(traj.tokens), slow.tokens))

  row = {"size": name, "params": count_params(params), "batch": b, "turns": turns,
         "new_tokens_per_turn": t, "generated_tokens": generated, "jit_compile_s": compile_s,
         "jit_s": jit_s, "python_s": python_s, "jit_tokens_per_s": generated / jit_s,
         "python_tokens_per_s": generated / python_s, "jit_equals_python": same}
  row["ratio_vs_python"] = row["jit_tokens_per_s"] / row["python_tokens_per_s"]

  # The model alone: the same prefill, then one cached forward and an argmax per
  # generated token, nothing else (no sampling state, tags, observations). No
  # rollout built on this XLA program can beat its rate.
  model = Transformer(cfg)

  @jax.jit
  def model_only(params, prompt):
    cache = init_cache(cfg, b, max_length)
    logits, cache = model.apply({"params": params}, prompt, cache=cache)

    def step(_, carry):
      cache, token = carry
      logits, cache = model.apply({"params": params}, token[:, None], cache=cache)
      return cache, jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)

    return jax.lax.fori_loop(0, generated // b, step,
                             (cache, jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)))[1]

  jax.block_until_ready(model_only(params, batch.prompt_tokens))
  model_s, _ = best(lambda: jax.block_until_ready(model_only(params, batch.prompt_tokens)))
  row["model_only_tokens_per_s"] = generated / model_s

  # Model FLOPs of (a): prefill of prompts and feedback, one forward per generated
  # token, attention over the (growing) context counted at its mean length.
  mean_context = (p + max_length) / 2
  forward = model_flops_per_token(cfg, int(mean_context), training=False)
  prefilled = b * (p + (turns - 1) * feedback)
  row["model_gflop"] = forward * (generated + prefilled) / 1e9
  row["flops_fraction_of_peak"] = row["model_gflop"] * 1e9 / jit_s / peak

  if not args.skip_hf:
    try:
      import torch
      import transformers
    except ImportError:
      print("transformers/torch not installed: skipping the hf column", file=sys.stderr)
    else:
      torch.set_num_threads(os.cpu_count() or 1)
      with tempfile.TemporaryDirectory() as tmp:
        hf.save_checkpoint(tmp, cfg, params)
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp).eval()
      feedback_ids = torch.as_tensor(np.asarray(static.feedback))[None].repeat(b, 1)

      def run_hf():
        ctx = torch.as_tensor(prompts, dtype=torch.long)
        with torch.no_grad():
          for turn in range(turns):
            ctx = model.generate(ctx, attention_mask=torch.ones_like(ctx), max_new_tokens=t,
                                 min_new_tokens=t, do_sample=False, pad_token_id=static.pad_id,
                                 eos_token_id=None)
            if turn < turns - 1:
              ctx = torch.cat([ctx, feedback_ids], dim=1)
        return ctx

      run_hf()
      hf_s, hf_out = best(run_hf)
      row.update(hf_s=hf_s, hf_tokens_per_s=generated / hf_s)
      row["ratio_vs_hf"] = row["jit_tokens_per_s"] / row["hf_tokens_per_s"]
      row["model_only_vs_hf"] = row["model_only_tokens_per_s"] / row["hf_tokens_per_s"]
      row["hf_same_length"] = int(hf_out.shape[1]) == int(np.asarray(traj.lengths)[0])
  return row


COLUMNS = ("size", "params", "generated_tokens", "jit_compile_s", "jit_tokens_per_s",
           "python_tokens_per_s", "hf_tokens_per_s", "model_only_tokens_per_s", "ratio_vs_python",
           "ratio_vs_hf", "model_only_vs_hf", "flops_fraction_of_peak", "jit_equals_python")


def main(argv=None):
  args = parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  import jax.numpy as jnp

  sys.path.insert(0, str(Path(__file__).resolve().parent))
  from bench_sharding import markdown_table, matmul_peak

  devices = jax.devices()[:1]
  peak = matmul_peak(devices, 2048, jnp.float32, 10)
  rows = [bench_size(name, args, peak) for name in args.sizes.split(",") if name]
  header = (f"# bench_rollout: batch {args.batch}, prompt {args.prompt_tokens} tokens, "
            f"{args.turns} turns x {args.new_tokens} new tokens, greedy, float32, "
            f"{devices[0].platform}\nmatmul peak {peak / 1e9:.1f} GFLOP/s (one device, 2048^3)"
            "\ncommand: python experiments/bench_rollout.py " + " ".join(sys.argv[1:]))
  print(header)
  print(markdown_table(rows, COLUMNS))
  if args.out:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(f"{header}\n\n{markdown_table(rows, COLUMNS)}\n")
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
  keys = ("jit_tokens_per_s", "python_tokens_per_s", "hf_tokens_per_s", "ratio_vs_python",
          "ratio_vs_hf", "flops_fraction_of_peak", "model_only_tokens_per_s", "model_only_vs_hf")
  summary = {k: rows[0].get(k) for k in keys}
  if len(rows) > 1:
    summary["large"] = {k: rows[1].get(k) for k in keys}
  print(json.dumps(summary))
  return rows


if __name__ == "__main__":
  main()
