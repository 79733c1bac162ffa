"""The rollout on a tokenizer of realistic size (a 120k-token byte-level BPE with
special end tokens and a chat template, built offline: tests/big_tokenizer.py):
tags that merge with neighbouring text, query extraction, the inserted texts, the
loss mask, the end token, answer extraction, and jitted == Python rollout."""

import jax
import numpy as np
import pytest

from zsjax import model as M
from zsjax import rewards
from zsjax import rollout as R
from zsjax import template as T
from zsjax.sampling import Greedy

import big_tokenizer
from test_rollout import assert_same, decode, generated_text, run_both

CONFIG = R.RolloutConfig(max_turns=2, max_new_tokens=24, max_obs_tokens=64, max_length=320,
                         max_query_tokens=16)


@pytest.fixture(scope="module")
def tokenizer():
  return big_tokenizer.make()


@pytest.fixture(scope="module")
def world(tokenizer):
  cfg = M.ModelConfig(vocab_size=len(tokenizer), embed_dim=16, mlp_dim=24, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=8, arch="qwen2", qkv_bias=True,
                      tie_embeddings=True)
  params = M.init_params(cfg, jax.random.key(0))
  return cfg, params, R.prepare_static_tokens(tokenizer), T.build_tag_matcher(tokenizer)


def test_the_tokenizer_is_real_sized_and_merges_tags_with_text(tokenizer):
  assert len(tokenizer) >= 100_000 and tokenizer.chat_template
  assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
  pieces = tokenizer.tokenize(" <answer> Paris </answer>")
  assert "Ġ<" in pieces and "Ġ</" in pieces  # a tag's first byte shares a token with a space


def test_tag_matches_land_on_the_token_that_completes_the_tag(tokenizer, world):
  """Against an independent computation: the tags found in the decoded text up to
  each token, minus those found one token earlier."""
  matcher = world[3]
  for text in ("<think> a </think><search> capital of France </search>",
               " <answer> Paris </answer>\n\n", "x<search>y</search></answer><answer>z</answer>"):
    ids = tokenizer.encode(text)
    got = np.asarray(matcher.scan(np.asarray([ids], np.int32)))[0]
    for i in range(len(ids)):
      before, upto = tokenizer.decode(ids[:i]), tokenizer.decode(ids[:i + 1])
      want = 0
      for bit, tag in enumerate(T.TAGS):
        if upto.count(tag) > before.count(tag):
          want |= 1 << bit
      assert int(got[i]) == want, (text, i, tokenizer.convert_ids_to_tokens(ids[i]))


def test_rollout_on_a_real_size_tokenizer_equals_the_python_rollout(tokenizer, world):
  turns = ["<think> need it </think><search> capital of France </search>",
           " <answer> Paris </answer>"]
  fast, slow, engine, oracle = run_both(tokenizer, world, CONFIG, Greedy(), [turns] * 2,
                                        chat=True)
  assert_same(fast, slow)
  text = decode(tokenizer, fast, 0)
  assert text.startswith("<|im_start|>user\n") and "<|im_start|>assistant\n" in text
  assert [r.query.strip() for r in engine.requests] == ["capital of France"] * 2
  assert [r.query.strip() for r in oracle.requests] == ["capital of France"] * 2
  assert T.render_observation(["result for capital of France"]) in text
  assert generated_text(tokenizer, fast, 0) == "".join(turns)  # the loss mask: sampled only
  scores = rewards.score_answers(tokenizer, fast, [["Paris"], ["Paris"]], "f1")
  assert scores.answers == ("Paris", "Paris") and scores.train.tolist() == [1.0, 1.0]


def test_an_end_token_gets_feedback_and_is_not_kept(tokenizer, world):
  end = tokenizer.convert_tokens_to_ids("<|im_end|>")
  ids = tokenizer.encode("<think> hmm </think>")
  scripts = [ids + [end] + tokenizer.encode(" <answer> Paris </answer>")] * 2
  config = R.RolloutConfig(max_turns=2, max_new_tokens=24, max_obs_tokens=64, max_length=400,
                           max_query_tokens=16)
  fast, slow, _, _ = run_both(tokenizer, world, config, Greedy(), scripts, chat=True)
  assert_same(fast, slow)
  assert fast.answered.all() and (fast.turns == 2).all()
  for row in (0, 1):
    response = np.asarray(fast.tokens[row, fast.prompt_lengths[row]:fast.lengths[row]])
    assert end not in response.tolist()  # the chat prompt holds one; the response none
    assert T.INVALID_ACTION_FEEDBACK in decode(tokenizer, fast, row)
