"""The jitted rollout: each path of the turn state machine with scripted policy
outputs, equality with the Python-driven oracle, sampling log-probs, the
useful/noisy draw, and one compile per batch shape."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zsjax import curriculum as C
from zsjax import model as M
from zsjax import rollout as R
from zsjax import search as S
from zsjax import simulator as SIM
from zsjax import template as T
from zsjax.rollout_reference import python_rollout
from zsjax.sampling import Greedy, Sampling
from scripted import Scripted, script_rows

transformers = pytest.importorskip("transformers")

QUESTIONS = ["What is the capital of France?", "Which river flows through Paris?",
             "Who wrote Hamlet?", "Where is Mount Fuji?"]
ANSWERS = ["Paris", "Seine", "Shakespeare", "Japan"]


@pytest.fixture(scope="module")
def tokenizer():
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  corpus = [T.INSTRUCTION, T.INVALID_ACTION_FEEDBACK, T.render_observation(["a result"]),
            "<think> hmm </think><search> capital of France </search><answer> Paris </answer>",
            SIM.DEFAULT_TEMPLATE] + QUESTIONS + ANSWERS
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(corpus * 5, trainers.BpeTrainer(
      vocab_size=380, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      special_tokens=["<|end|>", "<|pad|>"]))
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>",
                                              pad_token="<|pad|>")


@pytest.fixture(scope="module")
def world(tokenizer):
  cfg = M.ModelConfig(vocab_size=len(tokenizer), embed_dim=32, mlp_dim=48, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, arch="qwen2", qkv_bias=True)
  params = jax.tree_util.tree_map(lambda x: x * 20 if x.ndim > 1 else x,
                                  M.init_params(cfg, jax.random.key(0)))
  static = R.prepare_static_tokens(tokenizer)
  matcher = T.build_tag_matcher(tokenizer)
  return cfg, params, static, matcher


class ScriptedEngine:
  """A host engine whose documents are a function of the query."""

  top_k = 5

  def __init__(self):
    self.requests = []

  def search(self, requests):
    self.requests.extend(requests)
    return S.SearchResult([[f"result for {r.query.strip()}"] for r in requests],
                          [False] * len(requests))


def run_both(tokenizer, world, config, sampling, scripts=None, questions=QUESTIONS[:2], step=1,
             rng=jax.random.key(7), samples_per_prompt=1, chat=False):
  cfg, params, static, matcher = world
  prompts = [T.render_prompt(q, tokenizer if chat else None) for q in questions]
  answers = (ANSWERS * len(questions))[:len(questions)]
  jit_engine = ScriptedEngine()
  host = S.HostSearch(jit_engine, tokenizer, max_doc_tokens=48, pad_id=static.pad_id)
  batch = R.prepare_batch(tokenizer, prompts, questions, answers, host,
                          samples_per_prompt=samples_per_prompt, pad_id=static.pad_id)
  if scripts is not None:
    # A row's script is a list of turns (each tokenized on its own, as a policy's
    # turn ends at its closing token) or a list of token ids.
    sampling = Scripted(script_rows(
        [sum((tokenizer.encode(turn) for turn in s), []) if isinstance(s[0], str) else s
         for s in scripts]), sampling)
  rollout = R.make_rollout(cfg, matcher, static, host, config, sampling)
  fast = jax.jit(rollout)(params, None, batch, rng, step)
  oracle_engine = ScriptedEngine()
  slow = python_rollout(cfg, params, tokenizer, static, oracle_engine, config, sampling, batch,
                        questions, answers, rng, step)
  return jax.device_get(fast), slow, jit_engine, oracle_engine


def assert_same(fast, slow):
  for name in ("tokens", "loss_mask", "lengths", "turns", "searches", "noisy_calls",
               "answered", "truncated", "end_token_turns"):
    np.testing.assert_array_equal(getattr(fast, name), getattr(slow, name), err_msg=name)


def decode(tokenizer, traj, row):
  n = int(traj.lengths[row])
  return tokenizer.decode(np.asarray(traj.tokens[row, :n]).tolist())


def generated_text(tokenizer, traj, row):
  ids = np.asarray(traj.tokens[row])[np.asarray(traj.loss_mask[row]) == 1]
  return tokenizer.decode(ids.tolist())


CONFIG = R.RolloutConfig(max_turns=2, max_new_tokens=40, max_obs_tokens=96, max_length=320,
                         max_query_tokens=24)


def test_search_information_answer(tokenizer, world):
  turns = ["<think> need it </think><search> capital of France </search>",
           "<answer> Paris </answer>"]
  scripts = [turns] * 2
  fast, slow, engine, oracle = run_both(tokenizer, world, CONFIG, Greedy(), scripts)
  assert_same(fast, slow)
  assert fast.answered.all() and (fast.searches == 1).all() and (fast.turns == 2).all()
  assert [r.query.strip() for r in engine.requests] == ["capital of France"] * 2
  assert [r.query.strip() for r in oracle.requests] == ["capital of France"] * 2
  text = decode(tokenizer, fast, 0)
  assert ("</search>\n\n<information>Doc 1: result for capital of France</information>\n\n"
          "<answer> Paris </answer>") in text
  # the loss mask is 1 on exactly the scripted tokens: not the prompt, not the documents
  assert generated_text(tokenizer, fast, 0) == "".join(turns)
  assert int(fast.loss_mask[0].sum()) == sum(len(tokenizer.encode(t)) for t in turns)


def test_thinking_stays_in_the_context_exactly_as_sampled(tokenizer, world):
  """Qwen3-style thinking across turns: what the policy wrote inside <think> is
  never re-rendered (a chat template would drop earlier turns' thinking) nor
  re-tokenized. Scripted in a tokenization no encoder would choose (one token per
  character), the ids of both turns stand in the trajectory verbatim."""
  def by_char(text):
    return [tokenizer.convert_tokens_to_ids(c) if c != " " else tokenizer.encode(" ")[0]
            for c in text]

  think1, think2 = "<think> a hunch </think>", "<think> so Paris </think>"  # < 40 tokens a turn
  assert all(i != tokenizer.unk_token_id for i in by_char(think1 + think2))
  turn1 = by_char(think1) + tokenizer.encode("<search> capital of France </search>")
  turn2 = by_char(think2) + tokenizer.encode("<answer> Paris </answer>")
  assert turn1[:len(by_char(think1))] != tokenizer.encode(think1)  # not what encode gives
  fast, slow, _, _ = run_both(tokenizer, world, CONFIG, Greedy(), [turn1 + turn2] * 2)
  assert_same(fast, slow)
  tokens, mask = np.asarray(fast.tokens[0]), np.asarray(fast.loss_mask[0])
  sampled = tokens[mask == 1].tolist()
  assert sampled == turn1 + turn2
  start = int(fast.prompt_lengths[0])
  assert tokens[start:start + len(turn1)].tolist() == turn1  # right after the prompt
  second = start + len(turn1) + int((mask[start + len(turn1):] == 0).argmin())
  assert tokens[second:second + len(turn2)].tolist() == turn2  # right after the documents


def test_invalid_action_gets_feedback_then_answer(tokenizer, world):
  scripts = [["<search> q </answer>", "<answer> Seine </answer>"]] * 2
  fast, slow, engine, _ = run_both(tokenizer, world, CONFIG, Greedy(), scripts)
  assert_same(fast, slow)
  assert fast.answered.all() and (fast.searches == 0).all() and (fast.turns == 2).all()
  assert engine.requests == []
  assert T.INVALID_ACTION_FEEDBACK in decode(tokenizer, fast, 0)
  assert generated_text(tokenizer, fast, 1) == "".join(scripts[1])


def test_answer_in_the_first_turn(tokenizer, world):
  fast, slow, _, _ = run_both(tokenizer, world, CONFIG, Greedy(), [["<answer> Paris </answer>"]] * 2)
  assert_same(fast, slow)
  assert fast.answered.all() and (fast.turns == 1).all()
  assert decode(tokenizer, fast, 0).endswith("<answer> Paris </answer>")


def test_eos_without_an_action_is_an_invalid_action(tokenizer, world):
  """An end token before any complete action ends the turn as an invalid action: it
  is dropped (not in the sequence, no loss), the feedback follows, and the
  trajectory goes on until the turn limit (METHOD.md §2, the reference's step)."""
  eos = tokenizer.eos_token_id
  turn = tokenizer.encode("<think> no idea </think>")
  answer = tokenizer.encode("<answer> Paris </answer>")
  scripts = [turn + [eos] + turn + [eos] + answer, turn + [eos] + turn + [eos] + turn + [eos]]
  config = R.RolloutConfig(max_turns=2, max_new_tokens=40, max_obs_tokens=96, max_length=480,
                           max_query_tokens=24)  # room for two feedback messages
  fast, slow, _, _ = run_both(tokenizer, world, config, Greedy(), scripts)
  assert_same(fast, slow)
  # row 0: two invalid turns, then it answers in the final turn; row 1 never acts
  assert fast.answered.tolist() == [True, False] and (fast.turns == 3).all()
  assert not fast.truncated.any() and fast.end_token_turns.tolist() == [2, 3]
  for row in (0, 1):
    n = int(fast.lengths[row])
    tokens = np.asarray(fast.tokens[row, :n])
    assert eos not in tokens.tolist()  # dropped: neither in the sequence nor in the loss
    assert decode(tokenizer, fast, row).count(T.INVALID_ACTION_FEEDBACK.strip()) == 2
  assert generated_text(tokenizer, fast, 0) == tokenizer.decode(turn * 2 + answer)
  assert int(fast.loss_mask[1].sum()) == 3 * len(turn)


def test_the_first_complete_action_decides(tokenizer, world):
  """Two <search> tags in one turn: the query runs from the first one to </search>
  (the reference's regex), here ' a <search> b '."""
  scripts = [["<search> a <search> b </search>", "<answer> Paris </answer>"]] * 2
  fast, slow, engine, oracle = run_both(tokenizer, world, CONFIG, Greedy(), scripts)
  assert_same(fast, slow)
  assert [r.query.strip() for r in engine.requests] == ["a <search> b"] * 2
  assert [r.query.strip() for r in oracle.requests] == ["a <search> b"] * 2
  assert fast.answered.all() and (fast.searches == 1).all()


def test_max_turns_then_a_final_turn_without_documents(tokenizer, world):
  scripts = [["<search> a </search>", "<search> b </search>", "<search> c </search>"]] * 2
  fast, slow, engine, _ = run_both(tokenizer, world, CONFIG, Greedy(), scripts)
  assert_same(fast, slow)
  assert (fast.turns == 3).all() and (fast.searches == 2).all() and not fast.answered.any()
  assert [r.query.strip() for r in engine.requests] == ["a", "a", "b", "b"]
  assert decode(tokenizer, fast, 0).endswith("<search> c </search>")  # nothing inserted after


def test_context_overflow_sets_truncated(tokenizer, world):
  # the prompts (~200 tokens) and the first turn fit; the documents do not
  short = R.RolloutConfig(max_turns=2, max_new_tokens=40, max_obs_tokens=96, max_length=222,
                          max_query_tokens=24)
  scripts = [["<search> capital of France </search>"]] * 2
  fast, slow, _, _ = run_both(tokenizer, world, short, Greedy(), scripts)
  assert_same(fast, slow)
  assert fast.truncated.all() and not fast.answered.any()
  assert (fast.lengths <= short.max_length).all()


def test_greedy_matches_the_python_rollout_on_a_random_model(tokenizer, world):
  # attention over the live prefix with cache views of 80, 160 and 320 slots, which
  # the rows cross as documents are inserted (the oracle reads the whole cache)
  config = R.RolloutConfig(max_turns=2, max_new_tokens=8, max_obs_tokens=96, max_length=320,
                           attention_view=64)
  assert config.attention_views == (80, 160, 320)
  fast, slow, _, _ = run_both(tokenizer, world, config, Greedy(), questions=QUESTIONS)
  assert_same(fast, slow)
  assert (fast.turns == 3).all()  # random tokens: invalid actions until the final turn
  np.testing.assert_allclose(fast.log_probs, slow.log_probs, atol=1e-4)


def test_sampling_log_probs_equal_teacher_forced(tokenizer, world):
  cfg, params, _, _ = world
  config = R.RolloutConfig(max_turns=1, max_new_tokens=10, max_obs_tokens=96, max_length=320)
  fast, _, _, _ = run_both(tokenizer, world, config, Sampling(temperature=1.0),
                           questions=QUESTIONS, samples_per_prompt=2)
  segment = (np.arange(fast.tokens.shape[1])[None, :] < fast.lengths[:, None]).astype(np.int32)
  forced = M.token_log_probs(cfg, params, jnp.asarray(fast.tokens), jnp.asarray(segment))
  mask = np.asarray(fast.loss_mask) == 1
  assert mask.sum() > 40
  # float32 through two programs (cached decode, one forward pass), whose rounding
  # differs with the compiler's optimization level (2.1e-4 apart at XLA's level 0,
  # tests/conftest.py); a wrong token, position or mask is off by far more
  np.testing.assert_allclose(np.asarray(forced)[mask], np.asarray(fast.log_probs)[mask],
                             atol=5e-4)
  assert (np.asarray(fast.log_probs)[~mask] == 0).all()


def test_a_rollout_in_bfloat16_computes_in_it_with_the_same_params(tokenizer, world):
  """config.rollout.dtype: the rollout's compute (and KV cache) in bfloat16 while
  the params stay float32. Its log-probs are the bfloat16 model's: close to a
  bfloat16 teacher-forced pass, far from a float32 one (this world's weights are
  scaled up, so the two precisions disagree by nats)."""
  cfg, params, static, matcher = world
  low = M.with_compute_dtype(cfg, "bfloat16", "config.rollout.dtype")
  assert low.dtype == "bfloat16" and low.param_dtype == cfg.param_dtype
  assert M.with_compute_dtype(cfg, "", "config.rollout.dtype") is cfg
  with pytest.raises(ValueError, match="config.rollout.dtype='fp8'"):
    M.with_compute_dtype(cfg, "fp8", "config.rollout.dtype")
  config = R.RolloutConfig(max_turns=1, max_new_tokens=10, max_obs_tokens=96, max_length=320)
  host = S.HostSearch(ScriptedEngine(), tokenizer, max_doc_tokens=48, pad_id=static.pad_id)
  batch = R.prepare_batch(tokenizer, [T.render_prompt(q) for q in QUESTIONS], QUESTIONS,
                          (ANSWERS * 4)[:len(QUESTIONS)], host, pad_id=static.pad_id)
  traj = jax.device_get(jax.jit(R.make_rollout(low, matcher, static, host, config,
                                               Sampling(temperature=1.0)))(
      params, None, batch, jax.random.key(3), 1))
  segment = (np.arange(traj.tokens.shape[1])[None, :] < traj.lengths[:, None]).astype(np.int32)
  mask = np.asarray(traj.loss_mask) == 1
  gap = {}
  for name, c in (("float32", cfg), ("bfloat16", low)):
    forced = M.token_log_probs(c, params, jnp.asarray(traj.tokens), jnp.asarray(segment))
    gap[name] = np.abs(np.asarray(forced)[mask] - np.asarray(traj.log_probs)[mask]).max()
  assert mask.sum() > 20
  assert gap["bfloat16"] < 0.05 and gap["float32"] > 10 * gap["bfloat16"], gap


def test_noisy_draw_follows_p_and_is_per_call(tokenizer, world):
  config = R.RolloutConfig(max_turns=3, max_new_tokens=40, max_obs_tokens=96, max_length=480,
                           curriculum=C.Curriculum(start=0.3, end=0.3))
  cfg, params, static, matcher = world
  questions = QUESTIONS * 8  # 32 rows x 3 search turns = 96 calls
  scripts = [["<search> q </search>"] * 3] * len(questions)
  fast, slow, engine, _ = run_both(tokenizer, world, config, Greedy(), scripts,
                                   questions=questions)
  assert_same(fast, slow)
  calls = int(fast.searches.sum())
  assert calls == 96
  share = fast.noisy_calls.sum() / calls
  assert abs(share - 0.3) < 3.5 * np.sqrt(0.3 * 0.7 / calls), share
  assert sum(r.noisy for r in engine.requests) == int(fast.noisy_calls.sum())


def test_same_shape_batches_compile_once(tokenizer, world):
  cfg, params, static, matcher = world
  host = S.HostSearch(ScriptedEngine(), tokenizer, max_doc_tokens=48, pad_id=static.pad_id)
  config = R.RolloutConfig(max_turns=1, max_new_tokens=4, max_obs_tokens=96, max_length=320)
  rollout = jax.jit(R.make_rollout(cfg, matcher, static, host, config, Sampling()))
  for pair in (QUESTIONS[:2], QUESTIONS[2:]):
    batch = R.prepare_batch(tokenizer, [T.render_prompt(q) for q in pair], pair, ANSWERS[:2],
                            host, pad_id=static.pad_id, prompt_width=256)
    jax.block_until_ready(rollout(params, None, batch, jax.random.key(1), 3))
  with pytest.raises(ValueError, match="more than the fixed width 8"):
    R.prepare_batch(tokenizer, ["a long prompt " * 5], ["q"], ["a"], prompt_width=8)
  assert rollout._cache_size() == 1


def test_on_device_simulator_writes_documents_into_the_context(tokenizer, world):
  cfg, params, static, _ = world
  engine = SIM.SimulatorEngine(cfg, tokenizer, SIM.SimulatorPrompt(), static.piece_bytes,
                               max_new_tokens=12, prefix_width=140, query_width=24,
                               eos_ids=static.eos_ids, pad_id=static.pad_id)
  ids = tokenizer.encode("<search> capital of France </search>") + tokenizer.encode(
      "<answer> Paris </answer>")
  rollout = jax.jit(R.make_rollout(cfg, T.build_tag_matcher(tokenizer), static, engine, CONFIG,
                                   Scripted(script_rows([ids, ids]))))
  questions = QUESTIONS[:2]
  batch = R.prepare_batch(tokenizer, [T.render_prompt(q) for q in questions], questions,
                          ANSWERS[:2], engine, pad_id=static.pad_id)
  traj = jax.device_get(rollout(params, params, batch, jax.random.key(3), 1))
  assert (traj.searches == 1).all() and traj.answered.all()
  text = decode(tokenizer, traj, 0)
  between = text.split("<information>")[1].split("</information>")[0]
  assert len(between) > 0  # the simulator's (random-model) text was inserted
  mask = np.asarray(traj.loss_mask[0])
  n_obs = int(traj.lengths[0]) - int(traj.prompt_lengths[0]) - int(mask.sum())
  assert n_obs > len(np.asarray(static.obs_open)) + len(np.asarray(static.obs_close))


def test_observations_are_prefilled_only_as_wide_as_the_engine_can_write(tokenizer, world):
  """An on-device simulator writes at most max_new_tokens: its observations are
  that plus the wrapper wide, not max_obs_tokens (2048 in the paper), and the
  trajectory does not change."""
  cfg, params, static, _ = world
  engine = SIM.SimulatorEngine(cfg, tokenizer, SIM.SimulatorPrompt(), static.piece_bytes,
                               max_new_tokens=12, prefix_width=140, query_width=24,
                               eos_ids=static.eos_ids, pad_id=static.pad_id)
  wrapper = len(np.asarray(static.obs_open)) + len(np.asarray(static.obs_close))
  feedback = len(np.asarray(static.feedback))
  assert R.observation_width(CONFIG, static, 12) == max(12 + wrapper, feedback)
  assert R.observation_width(CONFIG, static, 5000) == CONFIG.max_obs_tokens
  ids = tokenizer.encode("<search> capital of France </search>") + tokenizer.encode(
      "<answer> Paris </answer>")
  questions = QUESTIONS[:2]
  batch = R.prepare_batch(tokenizer, [T.render_prompt(q) for q in questions], questions,
                          ANSWERS[:2], engine, pad_id=static.pad_id)
  out = {}
  for width in (277, 1999):  # widths no other shape has
    config = dataclasses.replace(CONFIG, max_obs_tokens=width, max_length=2400)
    rollout = R.make_rollout(cfg, T.build_tag_matcher(tokenizer), static, engine, config,
                             Scripted(script_rows([ids, ids])))
    jaxpr = str(jax.make_jaxpr(rollout)(params, params, batch, jax.random.key(3), 1))
    assert not re.search(rf"\b{width}\b", jaxpr), width
    out[width] = jax.device_get(jax.jit(rollout)(params, params, batch, jax.random.key(3), 1))
  narrow, wide = out.values()
  assert (narrow.searches == 1).all()
  for field in ("tokens", "loss_mask", "lengths"):
    np.testing.assert_array_equal(getattr(narrow, field), getattr(wide, field))


def test_sharded_rollout_matches_one_device(tokenizer, world):
  from zsjax import sharding as SH

  cfg, params, static, matcher = world
  questions = QUESTIONS
  host = S.HostSearch(ScriptedEngine(), tokenizer, max_doc_tokens=48, pad_id=static.pad_id)
  config = R.RolloutConfig(max_turns=1, max_new_tokens=12, max_obs_tokens=96, max_length=320)
  rollout = R.make_rollout(cfg, matcher, static, host, config, Greedy())
  batch = R.prepare_batch(tokenizer, [T.render_prompt(q) for q in questions], questions, ANSWERS,
                          host, samples_per_prompt=2, pad_id=static.pad_id)
  one = jax.device_get(jax.jit(rollout)(params, None, batch, jax.random.key(5), 1))
  plan = SH.ShardingPlan(SH.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}),
                         SH.rules_for("fsdp_tp"), "fsdp_tp")
  sharded = R.shard_rollout(rollout, plan, cfg, engine=host)(params, None, batch,
                                                             jax.random.key(5), 1)
  assert sharded.tokens.sharding.spec[0] == ("data", "fsdp")
  assert_same(jax.device_get(sharded), one)
  with pytest.raises(ValueError, match="not divisible by data x fsdp = 4"):
    small = R.prepare_batch(tokenizer, [T.render_prompt(QUESTIONS[0])], QUESTIONS[:1],
                            ANSWERS[:1], host, pad_id=static.pad_id)
    R.shard_rollout(rollout, plan, cfg, engine=host)(params, None, small, jax.random.key(5), 1)


def test_a_prompt_prefilled_once_per_group_gives_the_same_trajectories(tokenizer, world):
  """RolloutConfig.prompt_group: each GRPO group's prompt is prefilled once and its
  cache copied to the group's rows; sampled trajectories (tokens, log-probs, every
  count) are those of a prefill per row, on one device and over a 2 x 2 x 2 mesh."""
  import dataclasses

  from zsjax import sharding as SH

  cfg, params, static, matcher = world
  host = S.HostSearch(ScriptedEngine(), tokenizer, max_doc_tokens=48, pad_id=static.pad_id)
  config = R.RolloutConfig(max_turns=1, max_new_tokens=12, max_obs_tokens=96, max_length=320)
  batch = R.prepare_batch(tokenizer, [T.render_prompt(q) for q in QUESTIONS], QUESTIONS,
                          (ANSWERS * len(QUESTIONS))[:len(QUESTIONS)], host, samples_per_prompt=4,
                          pad_id=static.pad_id)
  sampling = Sampling(temperature=1.0)
  apart = jax.device_get(jax.jit(R.make_rollout(cfg, matcher, static, host, config, sampling))(
      params, None, batch, jax.random.key(3), 1))
  shared_rollout = R.make_rollout(cfg, matcher, static, host,
                                  dataclasses.replace(config, prompt_group=4), sampling)
  shared = jax.device_get(jax.jit(shared_rollout)(params, None, batch, jax.random.key(3), 1))
  assert_same(shared, apart)
  np.testing.assert_allclose(shared.log_probs, apart.log_probs, atol=1e-6)
  assert len({tuple(np.asarray(r)) for r in shared.tokens[:4]}) > 1  # the samples differ
  plan = SH.ShardingPlan(SH.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}),
                         SH.rules_for("fsdp_tp"), "fsdp_tp")
  sharded = jax.device_get(R.shard_rollout(shared_rollout, plan, cfg, engine=host)(
      params, None, batch, jax.random.key(3), 1))
  assert_same(sharded, apart)
  with pytest.raises(ValueError, match="does not split into groups of .*prompt_group=3"):
    jax.jit(R.make_rollout(cfg, matcher, static, host,
                           dataclasses.replace(config, prompt_group=3), sampling))(
        params, None, batch, jax.random.key(3), 1)
