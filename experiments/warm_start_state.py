"""A tiny-world run's warm start as it was at one of its Orbax checkpoints: the
setup the diagnostics in experiments/ share (answer_choice, reading_order,
warm_start_continue)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zsjax import pipeline, train_sft  # noqa: E402
from zsjax.checkpoint import Checkpointer  # noqa: E402


def restore(run: Path, config, step: int, data: str, workdir: Path, **sft_fields):
  """``(job, sft, state)``: the warm-start job of ``config`` on ``data`` (a jsonl of
  rows) with the run's tokenizer and ``sft_fields`` set, set up in ``workdir``, and
  its train state restored from ``run``'s warm-start checkpoint ``step``."""
  job = pipeline.job_config(config, "warm_start", {"tokenizer": str(run / "world" / "tokenizer"),
                                                   "sft.data": data})
  job.sft.update(sft_fields)
  sft = train_sft.setup(job, workdir)
  checkpointer = Checkpointer.from_config((run / "warm_start").resolve() / "checkpoints",
                                          job.checkpoint)
  try:
    state, _ = checkpointer.restore(sft.target, step)
  finally:
    checkpointer.close()
  return job, sft, state


def answer_nll(job, sft, params, rows: list[dict]) -> float:
  """The mean NLL of ``rows``' loss-carrying target tokens under ``params``."""
  eos, pad = sft.tokenizer.eos_token_id, sft.tokenizer.pad_token_id or 0
  examples, _ = train_sft.tokenize_examples(sft.tokenizer, rows, job.sft.max_length, eos)
  return train_sft.evaluate_nll(sft.eval_fn, params, train_sft.pack(examples, job.sft.max_length, pad),
                                job.sft.batch_size, sft.plan)
