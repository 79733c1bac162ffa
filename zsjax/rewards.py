"""Answer extraction and scoring (host side), METHOD.md §5.

* ``normalize_answer``: SQuAD normalisation (lower case, no punctuation, no
  articles a/an/the, single spaces).
* ``extract_answer``: the content of the last complete ``<answer>…</answer>`` (no
  other ``<answer>`` inside) of a text; None when there is none, which scores 0.
* ``policy_answer``: ``extract_answer`` of each turn the policy sampled, on its own
  (never the prompt, whose instructions contain an example answer, and never
  one answer assembled from two turns); the last turn that holds one wins.
* ``f1`` (the training reward), ``exact_match`` (strict) and
  ``substring_match`` (the normalised gold inside the normalised prediction: what
  the reference code calls EM), each the max over the gold answers.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import string
from typing import Sequence

import numpy as np

# An <answer> and the first </answer> after it with no other <answer> between: an
# unclosed <answer> of an earlier, invalid turn does not swallow the next ones.
_ANSWER = re.compile(r"<answer>((?:(?!<answer>).)*?)</answer>", re.DOTALL)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(s: str) -> str:
  s = s.lower()
  s = "".join(ch for ch in s if ch not in _PUNCTUATION)
  s = _ARTICLES.sub(" ", s)
  return " ".join(s.split())


def extract_answer(response: str) -> str | None:
  """The last complete ``<answer>…</answer>`` of a response, stripped."""
  found = _ANSWER.findall(response)
  return found[-1].strip() if found else None


def _golds(golds: str | Sequence[str]) -> list[str]:
  golds = [golds] if isinstance(golds, str) else list(golds)
  if not golds:
    raise ValueError("no gold answers given; every question needs at least one.")
  return golds


def _token_f1(prediction: str, gold: str) -> float:
  pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
  common = collections.Counter(pred) & collections.Counter(ref)
  overlap = sum(common.values())
  if overlap == 0:
    return 0.0
  precision, recall = overlap / len(pred), overlap / len(ref)
  return 2 * precision * recall / (precision + recall)


def f1(prediction: str | None, golds: str | Sequence[str]) -> float:
  if prediction is None:
    return 0.0
  return max(_token_f1(prediction, g) for g in _golds(golds))


def exact_match(prediction: str | None, golds: str | Sequence[str]) -> float:
  if prediction is None:
    return 0.0
  pred = normalize_answer(prediction)
  return float(any(pred == normalize_answer(g) for g in _golds(golds)))


def substring_match(prediction: str | None, golds: str | Sequence[str]) -> float:
  if prediction is None:
    return 0.0
  pred = normalize_answer(prediction)
  return float(any(normalize_answer(g) in pred for g in _golds(golds)))


# ------------------------------------------------------- scoring a rollout


def sampled_turns(tokens, loss_mask) -> list[list[int]]:
  """The token ids of each turn the policy sampled: the maximal runs of
  ``loss_mask == 1`` of one row (observations and feedback between turns are 0)."""
  tokens, mask = np.asarray(tokens), np.asarray(loss_mask) == 1
  edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
  return [tokens[start:stop].tolist() for start, stop in zip(edges[::2], edges[1::2])]


def policy_answer(tokenizer, tokens, loss_mask) -> str | None:
  """The last complete ``<answer>…</answer>`` that lies inside one turn the policy
  itself sampled (the loss-mask runs of one row): never the prompt, never a
  document or the invalid-action message (which names the tags), and never an
  answer opened at the end of one turn and closed in a later one."""
  for turn in reversed(sampled_turns(tokens, loss_mask)):
    answer = extract_answer(tokenizer.decode(turn, skip_special_tokens=True))
    if answer is not None:
      return answer
  return None


@dataclasses.dataclass(frozen=True)
class AnswerScores:
  """Each row's answer and its scores (``score_answers``); arrays are [N] float32."""

  train: np.ndarray  # the reward RL trains on (config.rl.reward, one of TRAIN_REWARDS)
  f1: np.ndarray
  em: np.ndarray
  substring_em: np.ndarray
  has_answer: np.ndarray  # 1 where the row's own text holds an <answer>
  answers: tuple  # [N] the answer text, or None


def score_answers(tokenizer, traj, golds: Sequence[Sequence[str]], reward: str) -> AnswerScores:
  """Per-row answers (``policy_answer`` of ``traj.tokens`` / ``traj.loss_mask``)
  scored on the host against each row's gold answers."""
  metrics = {k: np.zeros(len(golds), np.float32) for k in ("f1", "em", "substring_em", "has_answer")}
  answers = []
  for i, gold in enumerate(golds):
    answer = policy_answer(tokenizer, traj.tokens[i], traj.loss_mask[i])
    answers.append(answer)
    metrics["f1"][i] = f1(answer, gold)
    metrics["em"][i] = exact_match(answer, gold)
    metrics["substring_em"][i] = substring_match(answer, gold)
    metrics["has_answer"][i] = answer is not None
  return AnswerScores(train=metrics[reward].copy(), answers=tuple(answers), **metrics)


# The rewards RL can train on (config.rl.reward); F1 is the paper's.
TRAIN_REWARDS = {"f1": f1, "em": exact_match, "substring_em": substring_match}

