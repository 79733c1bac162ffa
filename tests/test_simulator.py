"""The on-device simulator engine: its own end tokens, its stop marker."""

import copy
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zsjax import simulator as SIM
from scripted import Scripted, script_rows
from test_rollout import ANSWERS, QUESTIONS, tokenizer, world  # noqa: F401 (fixtures)


def generate(tokenizer, world, engine, queries):
  cfg, params, static, _ = world
  ids = [tokenizer.encode(q) for q in queries]
  query = np.full((len(ids), engine.query_width), static.pad_id, np.int32)
  for i, row in enumerate(ids):
    query[i, :len(row)] = row
  out = jax.jit(engine)(params, engine.inputs(QUESTIONS[:len(ids)], ANSWERS[:len(ids)]),
                        jnp.asarray(query), jnp.asarray([len(r) for r in ids], jnp.int32),
                        jnp.ones((len(ids),), bool), jnp.asarray([False, True]),
                        jax.random.key(0))
  return [np.asarray(out.tokens[i, :out.lengths[i]]).tolist() for i in range(len(ids))]


def test_simulator_stops_at_its_own_end_token_and_drops_it(tokenizer, world):
  """An instruct simulator ends with its own token (<|im_end|> for Qwen2.5 instruct),
  not the base policy's; generation stops there and the token is not inserted."""
  cfg, params, static, _ = world
  sim_end = tokenizer.convert_tokens_to_ids("<|pad|>")  # stands in for <|im_end|>
  docs = tokenizer.encode("Doc 1: Paris is the capital of France.")
  after = tokenizer.encode(" and more text")
  engine = SIM.SimulatorEngine(
      cfg, tokenizer, SIM.SimulatorPrompt(), static.piece_bytes, max_new_tokens=32,
      prefix_width=140, query_width=8, sampling=Scripted(script_rows([docs + [sim_end] + after]
                                                                     * 2)),
      eos_ids=(sim_end,), pad_id=static.pad_id)
  out = generate(tokenizer, world, engine, ["capital of France", "Paris"])
  assert out == [docs, docs]
  # stopping only at the policy's end token (the old behaviour) writes past it
  policy_end = dataclasses.replace(engine, eos_ids=(tokenizer.eos_token_id,))
  out = generate(tokenizer, world, policy_end, ["capital of France", "Paris"])
  assert all(sim_end in row and len(row) > len(docs) for row in out)


def test_simulator_cuts_before_the_marker_past_top_k(tokenizer, world):
  cfg, params, static, _ = world
  kept = tokenizer.encode("Doc 1: one.\nDoc 2: two.\n")
  cut = tokenizer.encode("Doc 3: three.")
  engine = SIM.SimulatorEngine(
      cfg, tokenizer, SIM.SimulatorPrompt(top_k=2), static.piece_bytes, max_new_tokens=40,
      prefix_width=140, query_width=8, sampling=Scripted(script_rows([kept + cut] * 2)),
      eos_ids=(tokenizer.eos_token_id,), pad_id=static.pad_id)
  out = generate(tokenizer, world, engine, ["one", "two"])
  assert [tokenizer.decode(row) for row in out] == [tokenizer.decode(kept).strip()] * 2


def test_the_engine_built_from_a_config_uses_the_simulators_end_tokens(tokenizer, world):
  from zsjax import rollout as R
  from zsjax import search
  from zsjax.sharding import ShardingPlan

  from config_files import load_config

  _, _, static, _ = world
  sim_end = tokenizer.convert_tokens_to_ids("<|pad|>")
  config = load_config("zerosearch", "tiny")
  config.simulator.model.eos_token_ids = (sim_end,)  # a checkpoint's own end token
  rollout_config = R.RolloutConfig.from_config(config.rollout)
  engine, _, _ = search.build_engine(config, tokenizer, static, rollout_config,
                                     ShardingPlan.from_config(config), jax.random.key(0))
  assert engine.eos_ids == (sim_end,) and static.eos_ids == (tokenizer.eos_token_id,)


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% endif %}")


@pytest.mark.parametrize("chat", [False, True])
def test_the_device_prompt_is_the_host_rendering_in_token_ids(tokenizer, world, chat):
  """RL (device), simulator tuning and HTTP (host text) give the simulator one
  prompt: the ids the engine assembles around the policy's query tokens equal the
  tokenized ``SimulatorPrompt.render``, on a tokenizer that merges a word's
  leading space into it (as Qwen's and Llama 3's byte-level BPE do)."""
  cfg, _, static, _ = world
  assert tokenizer.tokenize(" capital")[0].startswith("Ġ")  # the space is in the word token
  if chat:  # a chat simulator: the prompt in its chat template, an empty system message
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
  prompt = SIM.SimulatorPrompt(chat=chat)
  engine = SIM.SimulatorEngine(cfg, tokenizer, prompt, static.piece_bytes, max_new_tokens=4,
                               prefix_width=200, query_width=12, eos_ids=static.eos_ids,
                               pad_id=static.pad_id)
  written = [" capital of France ", " Paris"]  # between <search> and </search>
  ids = [tokenizer.encode(q) for q in written]
  query = np.full((2, 12), static.pad_id, np.int32)
  for i, row in enumerate(ids):
    query[i, :len(row)] = row
  inputs = engine.inputs(QUESTIONS[:2], ANSWERS[:2])
  for noisy in (False, True):
    tokens, lengths = jax.jit(engine.assemble)(
        inputs, jnp.asarray(query), jnp.asarray([len(r) for r in ids]), jnp.full((2,), noisy))
    for i in range(2):
      text = prompt.render(written[i], QUESTIONS[i], ANSWERS[i], noisy, tokenizer)
      assert text.startswith("<|im_start|>system\n<|im_end|>") == chat
      assert np.asarray(tokens[i, :lengths[i]]).tolist() == tokenizer.encode(text)


def test_strip_blank_drops_whitespace_tokens_at_both_ends():
  blank = jnp.asarray([False, True, False, True])  # ids 1 and 3 are whitespace
  tokens = jnp.asarray([[1, 3, 2, 0, 1, 9], [2, 2, 0, 0, 0, 0], [1, 3, 1, 0, 0, 0]])
  blank = jnp.pad(blank, (0, 6))
  out, lengths = SIM.strip_blank(tokens, jnp.asarray([5, 2, 3]), blank, pad_id=7)
  # row 0 holds 1 3 2 0 1: two blanks lead, one trails; row 2 is all blank
  assert lengths.tolist() == [2, 2, 0]
  assert np.asarray(out).tolist() == [[2, 0, 7, 7, 7, 7], [2, 2, 7, 7, 7, 7], [7] * 6]


@pytest.mark.parametrize("text", ["Doc 1: Paris is in France.\n\n\nDoc 2: It is big.\n\n",
                                  "\n \nDoc 1: a  b\n \n\nDoc 2: c\n", "Doc 1: one line"])
def test_documents_are_post_processed_like_parse_documents(tokenizer, world, text):
  """Blank lines collapsed and the text stripped, in token space; against the text
  operations parse_documents applies (newline runs without inner spaces)."""
  import re

  cfg, _, static, _ = world
  engine = SIM.SimulatorEngine(
      cfg, tokenizer, SIM.SimulatorPrompt(), static.piece_bytes, max_new_tokens=40,
      prefix_width=140, query_width=8,
      sampling=Scripted(script_rows([tokenizer.encode(text) + [tokenizer.eos_token_id]] * 2)),
      eos_ids=(tokenizer.eos_token_id,), pad_id=static.pad_id)
  out = generate(tokenizer, world, engine, ["one", "two"])
  want = re.sub(r"\n\s*\n+", "\n", text).strip()
  assert [tokenizer.decode(row) for row in out] == [want, want]


def test_the_simulator_uses_its_own_tokenizer_and_must_share_the_ids(tokenizer, world, tmp_path):
  """An on-device simulator renders its prompt with its own tokenizer (its chat
  template: an instruct simulator beside a base policy); a simulator whose
  vocabulary gives an exchanged id another token fails, naming both paths."""
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers

  from zsjax import hf, search
  from zsjax.checkpoint import export_hf
  from zsjax import rollout as R
  from zsjax.sharding import ShardingPlan
  from config_files import load_config

  cfg, params, static, _ = world
  policy_dir, sim_dir = tmp_path / "policy", tmp_path / "sim"
  tokenizer.save_pretrained(policy_dir)
  own = copy.deepcopy(tokenizer)
  own.chat_template = CHAT_TEMPLATE
  export_hf(sim_dir, cfg, params, own)  # an instruct simulator: its own chat template
  got = hf.partner_tokenizer(str(sim_dir), tokenizer, str(policy_dir), what="simulator")
  assert got.chat_template == CHAT_TEMPLATE
  assert all(got.get_vocab()[t] == i for t, i in tokenizer.get_vocab().items())
  assert hf.partner_tokenizer(str(tmp_path / "none"), tokenizer, "p", what="simulator") is tokenizer
  # the engine built from a config renders with the simulator's template
  assert not getattr(tokenizer, "chat_template", None)
  config = load_config("zerosearch", "tiny")
  config.tokenizer, config.simulator.checkpoint = str(policy_dir), str(sim_dir)
  config.simulator.chat_template = True
  engine, _, _ = search.build_engine(config, tokenizer, static,
                                     R.RolloutConfig.from_config(config.rollout),
                                     ShardingPlan.from_config(config), jax.random.key(0))
  prefix = tokenizer.decode(np.asarray(engine.inputs(["q?"], ["a"]).prefix[0, 0]).tolist())
  assert prefix.startswith("<|im_start|>system")
  # another vocabulary: the same words trained in another order give other ids
  other = Tokenizer(models.BPE(unk_token="<unk>"))
  other.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  other.train_from_iterator(["zebra quartz " * 30, "alpha beta gamma " * 20], trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<unk>"], show_progress=False))
  import transformers

  bad_dir = tmp_path / "bad"
  transformers.PreTrainedTokenizerFast(tokenizer_object=other).save_pretrained(bad_dir)
  with pytest.raises(ValueError) as caught:
    hf.partner_tokenizer(str(bad_dir), tokenizer, str(policy_dir), what="simulator")
  assert str(bad_dir) in str(caught.value) and str(policy_dir) in str(caught.value)
