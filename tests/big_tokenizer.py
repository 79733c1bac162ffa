"""A byte-level BPE tokenizer of realistic size (>= 100k tokens), built offline in
a few seconds: trained on the template's texts, QA-style sentences and many
random words, with Qwen-style special tokens and chat template. Its merges join
tags with neighbouring text (``>\\n\\n``, `` <``), as real tokenizers' do."""

from __future__ import annotations

import functools

import numpy as np

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _corpus(seed: int) -> list[str]:
  from zsjax import simulator, template

  rng = np.random.default_rng(seed)
  letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
  words = ["".join(rng.choice(letters, rng.integers(3, 11))) for _ in range(60000)]
  lines = [" ".join(words[i:i + 12]) for i in range(0, len(words), 12)]
  texts = [template.INSTRUCTION, template.INVALID_ACTION_FEEDBACK, simulator.DEFAULT_TEMPLATE,
           template.render_observation(["Paris is the capital of France.", "It is big."]),
           "<think> I should look it up. </think><search> capital of France </search>"
           "<answer> Paris </answer>", "Question: What is the capital of France?\n",
           "Doc 1: The Seine flows through Paris.\nDoc 2: Paris is in France.\n"]
  return texts * 200 + lines * 2


@functools.lru_cache(maxsize=2)
def make(vocab_size: int = 120_000, seed: int = 0):
  """A ``transformers`` tokenizer: eos ``<|im_end|>`` (an instruct model's end),
  pad ``<|endoftext|>``, Qwen's chat template, ``vocab_size`` tokens."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  return _train(tok, _corpus(seed), vocab_size)


# The pre-tokenizer regexes of real tokenizers (their tokenizer.json files): Qwen2 /
# Qwen2.5 / Qwen3 split digits one by one, Llama 3 keeps up to three together. Both
# join punctuation with the newlines after it ("?\n", ".\n") and a space with the
# letters after it, unlike GPT-2's.
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@functools.lru_cache(maxsize=4)
def make_pretokenized(pattern: str = QWEN2_PATTERN, vocab_size: int = 4000, seed: int = 0):
  """A ``transformers`` tokenizer whose pre-tokenizer is a real model's: a regex
  ``Split`` and then ByteLevel without its own regex, as Qwen2's and Llama 3's
  tokenizer.json files have it. It has the specials and chat template of ``make``."""
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  rng = np.random.default_rng(seed)
  letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
  words = ["".join(rng.choice(letters, rng.integers(3, 9))) for _ in range(3000)]
  questions = [" ".join(words[i:i + 5]) + "?\nDoc 1: " + " ".join(words[i + 5:i + 9]) + ".\n"
               for i in range(0, len(words) - 9, 9)]
  return _train(tok, _corpus(seed)[:2000] + questions * 3, vocab_size)


def _train(tok, texts, vocab_size: int):
  """``tok`` trained on ``texts``, as a ``transformers`` tokenizer with Qwen-style
  specials (eos ``<|im_end|>``, pad ``<|endoftext|>``) and chat template."""
  import transformers
  from tokenizers import pre_tokenizers, trainers

  tok.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      special_tokens=SPECIAL, show_progress=False))
  out = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                             pad_token="<|endoftext|>")
  out.chat_template = CHAT_TEMPLATE
  return out
