"""A tiny-world run's warm start as it was at one of its Orbax checkpoints: the
setup the diagnostics in experiments/ share (answer_choice, reading_order,
warm_start_continue)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from configs import tiny_world  # noqa: E402
from zsjax import pipeline, train_sft  # noqa: E402
from zsjax.checkpoint import Checkpointer  # noqa: E402

# The documents of a rendered observation (template.render_observation), one match each.
DOCUMENTS = re.compile(r"Doc \d+: (.*?)(?=\nDoc \d+:|</information>)", re.S)


def add_run_arguments(parser) -> None:
  """The flags that name a run's warm-start checkpoint: --workdir, --seed, --step, --arg,
  and --set FIELD=VALUE for each config field the run set apart from its arg (a probe's
  ``--config_set``: e.g. ``--arg=v4 --set=world.version=3 --set=demo_think=cite``)."""
  parser.add_argument("--workdir", required=True, help="a tiny world run")
  parser.add_argument("--seed", type=int, required=True, help="the run's config.seed")
  parser.add_argument("--step", type=int, required=True, help="a warm-start checkpoint step")
  parser.add_argument("--arg", default="v4", help="the run's config arg")
  parser.add_argument("--set", action="append", default=[],
                      help="FIELD=VALUE of the run's config, as the run had it")


def run_config(args, overrides: dict | None = None):
  """The tiny world config of the run ``args`` names (``add_run_arguments``: its arg
  and ``--set`` fields), with ``overrides`` (``{"field.path": "text"}``, typed as each
  field is) on top."""
  from plan_rl import apply_overrides

  config = tiny_world.get_config(args.arg)
  apply_overrides(config, dict(item.split("=", 1) for item in getattr(args, "set", [])))
  apply_overrides(config, overrides or {})
  config.seed, config.progress = args.seed, False
  return config


def restore(run: Path, config, step: int, data: str, workdir: Path, **sft_fields):
  """``(job, sft, state)``: the warm-start job of ``config`` on ``data`` (a jsonl of
  rows) with the run's tokenizer and ``sft_fields`` set, set up in ``workdir``, and
  its train state restored from ``run``'s warm-start checkpoint ``step`` (a pipeline
  workdir's ``warm_start/checkpoints``, or a reading probe's ``checkpoints``)."""
  job = pipeline.job_config(config, "warm_start", {"tokenizer": str(run / "world" / "tokenizer"),
                                                   "sft.data": data})
  job.sft.update(sft_fields)
  sft = train_sft.setup(job, workdir)
  stage = run / "warm_start" if (run / "warm_start").exists() else run  # a pipeline's or a probe's
  checkpointer = Checkpointer.from_config(stage.resolve() / "checkpoints", job.checkpoint)
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
