"""Answer extraction and scores against hand-computed values."""

import pytest

from zsjax import rewards as W
from zsjax import template


def test_normalize_answer():
  assert W.normalize_answer("  The  Eiffel-Tower, in PARIS! ") == "eiffeltower in paris"
  assert W.normalize_answer("an apple a day") == "apple day"
  assert W.normalize_answer("theatre") == "theatre"  # 'the' only as a word


def test_extract_answer_reads_the_last_answer_of_the_response_only():
  assert W.extract_answer("<answer> A </answer> then <answer>B </answer>") == "B"
  assert W.extract_answer("<answer> unterminated") is None
  # an invalid turn's unclosed <answer> (the policy's own text: turns joined, feedback
  # and documents left out) must not swallow the later, valid answer
  assert W.extract_answer("<answer> Tosmo </search><search> q </search><answer> Zai </answer>"
                          ) == "Zai"
  assert W.extract_answer("<answer> a <answer> b </answer>") == "b"
  assert W.extract_answer("no tags") is None
  # the prompt's example answer must never count: the response alone is scored
  assert "<answer>" in template.INSTRUCTION
  assert W.extract_answer("<think> hmm </think>") is None


def test_f1_by_hand():
  # prediction tokens: [paris, france] ; gold: [paris] -> P=1/2, R=1, F1=2/3
  assert W.f1("Paris, France", ["Paris"]) == pytest.approx(2 / 3)
  # best over golds
  assert W.f1("New York City", ["York", "new york city"]) == pytest.approx(1.0)
  # multiplicity: pred [x x y] vs gold [x y y] overlap in one x and one y, P = R = 2/3
  assert W.f1("x x y", ["x y y"]) == pytest.approx(2 / 3)
  assert W.f1(None, ["x"]) == 0.0 and W.f1("z", ["x"]) == 0.0


def test_strict_and_substring_em():
  assert W.exact_match("the Paris", ["paris"]) == 1.0
  assert W.exact_match("Paris, France", ["Paris"]) == 0.0
  assert W.substring_match("Paris, France", ["Paris"]) == 1.0
  assert W.substring_match("Par", ["Paris"]) == 0.0
  assert W.exact_match(None, "x") == 0.0 and W.substring_match(None, "x") == 0.0
  with pytest.raises(ValueError, match="gold answers"):
    W.f1("x", [])


class _Chars:
  """A character-level tokenizer: token id = code point (decode only)."""

  def decode(self, ids, skip_special_tokens=True):
    return "".join(map(chr, ids))


def _row(*pieces):
  """tokens and loss mask of one row from (text, sampled) pieces."""
  tokens, mask = [], []
  for text, sampled in pieces:
    tokens += [ord(c) for c in text]
    mask += [int(sampled)] * len(text)
  return tokens, mask


def test_policy_answer_never_joins_two_turns():
  # the failure another machine's rollout hit: a turn ends inside an <answer>, the
  # invalid-action feedback follows, the next turn closes it
  tokens, mask = _row(("Question: q?", False), ("<think> x </think><answer> Paris", True),
                      ("\nMy previous action is invalid.\n", False),
                      ("<search> Eoad? </answer>", True), ("\n\n<information>d</information>\n\n", False))
  assert W.policy_answer(_Chars(), tokens, mask) is None
  assert W.sampled_turns(tokens, mask)[1] == [ord(c) for c in "<search> Eoad? </answer>"]
  # a complete answer in an earlier turn still counts when a later turn has none
  tokens, mask = _row(("P", False), ("<answer> Lyon </answer>", True), ("fb", False),
                      ("<answer> Par", True), ("pad", False))
  assert W.policy_answer(_Chars(), tokens, mask) == "Lyon"
  # the last turn that holds one wins; the prompt's example answer never counts
  tokens, mask = _row(("<answer> Beijing </answer>", False), ("<answer> A </answer>", True),
                      ("fb", False), ("<answer> B </answer>", True))
  assert W.policy_answer(_Chars(), tokens, mask) == "B"
  assert W.sampled_turns([1, 2, 3], [0, 0, 0]) == []
  assert W.policy_answer(_Chars(), [65, 66], [1, 1]) is None
