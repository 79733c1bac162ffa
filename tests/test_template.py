"""The template's text pieces, and tag matching in token space against plain
string search, with a byte-level BPE tokenizer that merges tags with neighbours."""

import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zsjax import template as T

transformers = pytest.importorskip("transformers")


def test_question_prompt_and_observation_text():
  assert T.format_question("  who wrote it ") == "who wrote it?"
  assert T.format_question("who wrote it?") == "who wrote it?"
  message = T.user_message("where is X")
  assert message.endswith("Question: where is X?\n") and "<search>" in message
  assert T.render_observation(["a b", " c "]) == "\n\n<information>Doc 1: a b\nDoc 2: c</information>\n\n"


def test_chat_template_wrapping_when_the_tokenizer_has_one(tokenizer):
  plain = T.render_prompt("q", tokenizer)
  assert plain == T.user_message("q")  # no chat template: the bare message
  tokenizer.chat_template = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}" \
                            "{% if add_generation_prompt %}[assistant]{% endif %}"
  try:
    wrapped = T.render_prompt("q", tokenizer)
    assert wrapped == "[user]" + T.user_message("q") + "[assistant]"
    assert T.render_prompt("q", tokenizer, use_chat_template=False) == plain
  finally:
    tokenizer.chat_template = None


@pytest.mark.parametrize("turn,expected", [
    ("<think>x</think><search> who is A </search>", ("search", "who is A")),
    ("<answer> Paris </answer> trailing", ("answer", "Paris")),
    ("<search>a</search><answer>b</answer>", ("search", "a")),
    ("<answer>b</answer><search>a</search>", ("answer", "b")),
    ("<search> unterminated", ("invalid", "")),
    ("just text", ("invalid", "")),
    ("<search>a</answer>", ("invalid", "")),
])
def test_parse_action(turn, expected):
  assert tuple(T.parse_action(turn)) == expected


def test_cut_after_first_close():
  assert T.cut_after_first_close("a<search>q</search> more </answer>") == "a<search>q</search>"
  assert T.cut_after_first_close("no tags") == "no tags"


def naive_hits(data: bytes, tags):
  """(end byte index, bit) of every tag occurrence, by plain search."""
  hits = set()
  for i, tag in enumerate(tags):
    tag_bytes = tag.encode()
    start = data.find(tag_bytes)
    while start != -1:
      hits.add((start + len(tag_bytes) - 1, 1 << i))
      start = data.find(tag_bytes, start + 1)
  return hits


def test_automaton_matches_plain_search_on_bytes():
  # "swer>" and "er" end inside "<answer>": found only through fail-link outputs.
  tags = T.TAGS + ("<information>", "a<", "swer>", "er")
  delta, output = T.build_automaton(tags)
  rng = random.Random(0)
  alphabet = "<>/searchnswinfotm aw"
  for _ in range(200):
    pieces = list(alphabet) + list(tags) * 2  # single characters and whole tags
    text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 60)))
    data = text.encode()
    state, found = 0, set()
    for i, byte in enumerate(data):
      state = delta[state, byte]
      for bit in range(len(tags)):
        if output[state] & (1 << bit):
          found.add((i, 1 << bit))
    assert found == naive_hits(data, tags), text


@pytest.fixture(scope="module")
def tokenizer():
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  corpus = ["<think> we need the capital </think>\n<search> capital of France </search>\n",
            "<answer> Paris </answer>", "<answer>Paris</answer>.", "x</search>y<search>z",
            "<information>Doc 1: Paris is the capital.</information>\n\n"] * 50
  # Frequent boundary pairs, so that tags merge with neighbours ('>\n', '> ').
  corpus += ["> <", ">\n<", ">x", "y<"] * 80
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(corpus, trainers.BpeTrainer(
      vocab_size=280, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      special_tokens=["<|end|>"]))
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>")


def test_token_matcher_agrees_with_byte_positions(tokenizer):
  vocab = len(tokenizer) + 5  # a model vocabulary padded past the tokenizer's
  matcher = T.build_tag_matcher(tokenizer, vocab_size=vocab)
  assert matcher.transitions.shape == (1 + sum(map(len, T.TAGS)) - 4, vocab)  # '<' and '</' shared
  pieces = T.token_bytes(tokenizer, vocab)
  assert pieces[len(tokenizer)] == b""
  scan = jax.jit(lambda m, tokens: m.scan(tokens))
  rng = random.Random(1)
  words = ["Paris", " the", "capital", " of", "\n", " ", ".", "x", "<", ">", "/", "search",
           "answer"] + list(T.TAGS) * 3
  spanning = merged = 0
  for _ in range(300):
    text = "".join(rng.choice(words) for _ in range(rng.randint(1, 25)))
    ids = tokenizer.encode(text)
    data = b"".join(pieces[i] for i in ids)
    assert data == text.encode()  # byte-level BPE round-trips
    ends = np.cumsum([len(pieces[i]) for i in ids]) - 1  # last byte of each token
    starts = ends - np.array([len(pieces[i]) for i in ids]) + 1
    want = np.zeros(len(ids), np.int64)
    for end_byte, bit in naive_hits(data, T.TAGS):
      token = int(np.searchsorted(ends, end_byte))
      want[token] |= bit
      tag_len = len(T.TAGS[bit.bit_length() - 1])
      first = int(np.searchsorted(ends, end_byte - tag_len + 1))
      spanning += first < token
      merged += starts[token] < end_byte - tag_len + 1 or ends[token] > end_byte
    # Pad to one width (one compile) with an id past the tokenizer: an empty piece,
    # which leaves the automaton where it was and completes nothing.
    padded = ids + [len(tokenizer)] * (256 - len(ids))
    got = np.asarray(scan(matcher, jnp.asarray([padded], jnp.int32)))[0]
    np.testing.assert_array_equal(got[:len(ids)], want, err_msg=text)
    assert not got[len(ids):].any()
  assert spanning > 20 and merged > 20  # both hard cases were exercised


def test_matcher_step_inside_jit(tokenizer):
  matcher = T.build_tag_matcher(tokenizer)
  ids = tokenizer.encode("think <search> q </search> done")
  step = jax.jit(lambda m, s, t: m.step(s, t))
  state = jnp.zeros((1,), jnp.int32)
  masks = []
  for token in ids:
    state, done = step(matcher, state, jnp.asarray([token], jnp.int32))
    masks.append(int(done[0]))
  assert masks.count(T.SEARCH_OPEN) == 1 and masks.count(T.SEARCH_CLOSE) == 1
  assert masks.index(T.SEARCH_CLOSE) > masks.index(T.SEARCH_OPEN)
  assert all(m & T.CLOSING == 0 for m in masks[:masks.index(T.SEARCH_CLOSE)])


# The reference's training prompt for the question "who wrote hamlet": the `prompt`
# of Search-R1's scripts/data_process/nq_search.py (make_prefix, template 'base'),
# which ZeroSearch's parquet and inference.py share, and the invalid-action
# observation of llm_agent/generation.py, written out as data.
REFERENCE_PROMPT = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first "
    "every time you get new information. After reasoning, if you find you lack some knowledge, "
    "you can call a search engine by <search> query </search> and it will return the top "
    "searched results between <information> and </information>. You can search as many times "
    "as your want. If you find no further external knowledge needed, you can directly provide "
    "the answer inside <answer> and </answer>, without detailed illustrations. For example, "
    "<answer> Beijing </answer>. Question: who wrote hamlet?\n")
REFERENCE_FEEDBACK = (
    "\nMy previous action is invalid. If I want to search, I should put the query between "
    "<search> and </search>. If I want to give the final answer, I should put the answer "
    "between <answer> and </answer>. Let me try again.\n")


def test_the_search_r1_style_is_the_reference_prompt_and_feedback(tmp_path):
  from config_files import load_config
  from zsjax import evaluate

  assert T.user_message(" who wrote hamlet ", style="search_r1") == REFERENCE_PROMPT
  assert T.render_prompt("who wrote hamlet?", None, style="search_r1") == REFERENCE_PROMPT
  assert T.prompt_style("search_r1").feedback == REFERENCE_FEEDBACK
  assert T.user_message("who wrote hamlet").startswith(T.INSTRUCTION + "\nQuestion:")
  with pytest.raises(ValueError, match=r"config.data.prompt_style='searchr1'"):
    T.prompt_style("searchr1")
  for name, arg in (("zerosearch", "qwen2.5-3b"), ("zerosearch", "qwen2.5-7b")):
    assert load_config(name, arg).data.prompt_style == "search_r1"
  assert load_config("eval", "paper").prompt_style == "search_r1"
  assert load_config("tiny_world").rl.data.prompt_style == "zsjax"
  # the style travels with an exported policy, and evaluation renders in it
  T.save_prompt_format(tmp_path, chat_template=False, instruction=T.SEARCH_R1_INSTRUCTION,
                       style="search_r1")
  config = load_config("eval", "paper")
  config.policy.checkpoint = str(tmp_path)
  chat, instruction, style = evaluate.prompt_format(config)
  assert evaluate.method_prompt("search", "who wrote hamlet", None, use_chat_template=chat,
                                search_instruction=instruction, style=style) == REFERENCE_PROMPT
  # an export from before the style was recorded reads as our wording
  (tmp_path / T.PROMPT_FORMAT_FILE).write_text('{"chat_template": false, "instruction": "x"}')
  assert T.load_prompt_format(tmp_path)["style"] == "zsjax"


def test_the_rollout_inserts_the_styles_feedback(tokenizer):
  from zsjax import rollout as R

  static = R.prepare_static_tokens(tokenizer, feedback=T.prompt_style("search_r1").feedback)
  assert tokenizer.decode(static.feedback.tolist()) == REFERENCE_FEEDBACK
  assert tokenizer.decode(R.prepare_static_tokens(tokenizer).feedback.tolist()) == \
      T.INVALID_ACTION_FEEDBACK
