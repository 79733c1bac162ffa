"""Tokenization at the seams, under the pre-tokenizers of Qwen2/2.5/3 and Llama 3.

The reference tokenizes the simulator's prompt and every observation block as
one string. Those pre-tokenizers join a query's final "?" with the newline after
it ("?\\n"), a document's final "." with "</information>" (".</"), and
"<information>" with "Doc" (">Doc"). With ``rollout.retokenize`` (the paper
configs) zsjax tokenizes these strings on the host as one string, so its ids
equal the reference's. Assembled from pieces (the tiny world's default), they
differ, and these tests show where."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import big_tokenizer
from zsjax import model as M
from zsjax import rollout as R
from zsjax import search as S
from zsjax import simulator as SIM
from zsjax import template as T
from scripted import Scripted, script_rows

QUERY = " capital of France?"  # as a policy writes it after <search>
QUESTION, ANSWER = "What is the capital of France?", "Paris"


PATTERNS = {"qwen2": big_tokenizer.QWEN2_PATTERN, "llama3": big_tokenizer.LLAMA3_PATTERN}


@pytest.fixture(scope="module")
def tokenizer():
  return big_tokenizer.make_pretokenized(PATTERNS["qwen2"])


def encode(tokenizer, text):
  return tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_the_seams_merge_under_these_pre_tokenizers(name):
  tokenizer = big_tokenizer.make_pretokenized(PATTERNS[name])
  joined = encode(tokenizer, "France?\nUseful")
  assert joined != encode(tokenizer, "France?") + encode(tokenizer, "\nUseful")
  block = T.information_block("Doc 1: Paris is in France.")
  pieces = (encode(tokenizer, "\n\n" + T.INFORMATION_OPEN)
            + encode(tokenizer, "Doc 1: Paris is in France.")
            + encode(tokenizer, T.INFORMATION_CLOSE + "\n\n"))
  assert encode(tokenizer, block) != pieces


def _engine(tokenizer, retokenize, max_new_tokens=6):
  cfg = M.ModelConfig(vocab_size=len(tokenizer), embed_dim=32, mlp_dim=48, num_layers=1,
                      num_heads=4, num_kv_heads=2, head_dim=8, arch="qwen2")
  static = R.prepare_static_tokens(tokenizer)
  engine = SIM.SimulatorEngine(
      cfg, tokenizer, SIM.SimulatorPrompt.from_config("zerosearch", 5), static.piece_bytes,
      max_new_tokens=max_new_tokens, prefix_width=120, query_width=16, eos_ids=static.eos_ids,
      pad_id=static.pad_id, retokenize=retokenize)
  return cfg, M.init_params(cfg, jax.random.key(0)), static, engine


def test_the_simulator_reads_its_prompt_as_one_string(tokenizer):
  """The prompt the jitted engine prefills, with retokenize, equals the tokenized
  ``render`` of the decoded query; assembled on device it differs at "?\\n"."""
  prompt = SIM.SimulatorPrompt.from_config("zerosearch", 5)
  want = [encode(tokenizer, prompt.render(QUERY, QUESTION, ANSWER, noisy))
          for noisy in (False, True)]
  query_ids = encode(tokenizer, QUERY)
  got = {}
  for retokenize in (False, True):
    _, _, _, engine = _engine(tokenizer, retokenize)
    inputs = engine.inputs([QUESTION] * 2, [ANSWER] * 2)
    query = np.full((2, 16), engine.pad_id, np.int32)
    query[:, :len(query_ids)] = query_ids
    args = (inputs, jnp.asarray(query), jnp.full((2,), len(query_ids), jnp.int32),
            jnp.asarray([False, True]))
    ids, lengths = jax.jit(engine.assemble)(*args)
    if retokenize:
      ids, lengths = jax.jit(engine.host_prompt)(*args, jnp.ones((2,), bool), ids, lengths)
    got[retokenize] = [np.asarray(ids[i, :lengths[i]]).tolist() for i in range(2)]
  assert got[True] == want
  assert got[False] != want  # the device assembly splits "?" from "\n"


def test_the_simulators_documents_enter_as_one_tokenized_block(tokenizer):
  """With retokenize the jitted engine returns each row's observation block as the
  reference makes it: the generated text decoded, post-processed and wrapped, as
  one string."""
  _, params, _, engine = _engine(tokenizer, True)
  query_ids = encode(tokenizer, QUERY)
  query = np.full((2, 16), engine.pad_id, np.int32)
  query[:, :len(query_ids)] = query_ids
  out = jax.jit(engine)(params, engine.inputs([QUESTION] * 2, [ANSWER] * 2), jnp.asarray(query),
                        jnp.full((2,), len(query_ids), jnp.int32), jnp.asarray([True, False]),
                        jnp.asarray([False, True]), jax.random.key(1))
  assert out.wrapped and int(out.lengths[1]) == 0
  row = np.asarray(out.tokens[0, :out.lengths[0]]).tolist()
  text = tokenizer.decode(row)
  assert text.startswith("\n\n<information>") and text.endswith("</information>\n\n")
  inner = text[len("\n\n<information>"):-len("</information>\n\n")]
  assert row == encode(tokenizer, T.information_block(inner))


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_a_host_engine_returns_the_block_as_one_string(name):
  tokenizer = big_tokenizer.make_pretokenized(PATTERNS[name])

  class OneDoc:
    def search(self, requests):
      return S.SearchResult([["Paris is in France."] for _ in requests], [False] * len(requests))

  block = T.information_block("Doc 1: Paris is in France.")
  for retokenize in (True, False):
    host = S.HostSearch(OneDoc(), tokenizer, 64, retokenize=retokenize)
    inputs = host.inputs([QUESTION], [ANSWER])
    query = np.asarray([encode(tokenizer, QUERY)], np.int32)
    ids, lengths, _ = host._callback(np.asarray(inputs.text), np.asarray(inputs.lengths), query,
                                     np.asarray([query.shape[1]]), [True], [False])
    row = ids[0, :lengths[0]].tolist()
    if retokenize:
      assert row == encode(tokenizer, block)
    else:
      assert row == encode(tokenizer, "Doc 1: Paris is in France.")


def test_a_retokenizing_rollout_puts_the_reference_block_in_the_context(tokenizer):
  """Through the jitted rollout: the tokens between the policy's two turns are the
  observation block tokenized as one string."""
  class OneDoc:
    def search(self, requests):
      return S.SearchResult([["Paris is in France."] for _ in requests], [False] * len(requests))

  cfg = M.ModelConfig(vocab_size=len(tokenizer), embed_dim=32, mlp_dim=48, num_layers=1,
                      num_heads=4, num_kv_heads=2, head_dim=8, arch="qwen2")
  params = M.init_params(cfg, jax.random.key(0))
  static = R.prepare_static_tokens(tokenizer, feedback=T.SEARCH_R1_FEEDBACK)
  host = S.HostSearch(OneDoc(), tokenizer, 96, pad_id=static.pad_id, retokenize=True)
  config = R.RolloutConfig(max_turns=2, max_new_tokens=30, max_obs_tokens=96, max_length=320,
                           max_query_tokens=16)
  turn1 = encode(tokenizer, "<search> capital of France? </search>")
  turn2 = encode(tokenizer, "<answer> Paris </answer>")
  rollout = jax.jit(R.make_rollout(cfg, T.build_tag_matcher(tokenizer), static, host, config,
                                   Scripted(script_rows([turn1 + turn2]))))
  prompt = T.render_prompt(QUESTION, None, style="search_r1")
  batch = R.prepare_batch(tokenizer, [prompt], [QUESTION], [ANSWER], host, pad_id=static.pad_id)
  traj = jax.device_get(rollout(params, None, batch, jax.random.key(0), 1))
  tokens, mask = np.asarray(traj.tokens[0]), np.asarray(traj.loss_mask[0])
  start = int(traj.prompt_lengths[0]) + len(turn1)
  end = start + int((mask[start:] == 0).argmin())
  assert tokens[start:end].tolist() == encode(tokenizer, T.information_block(
      "Doc 1: Paris is in France."))
  assert tokens[end:end + len(turn2)].tolist() == turn2
