"""Supervised tuning (``job="sft"``): the loss on target tokens only, packed rows.

Used for the search simulator (prompt = the simulator prompt with the
useful/noisy keyword, target = its documents) and for a policy warm start
(prompt = the policy prompt, target = a demonstration).

Each example is ``prompt + target + EOS``; the loss is the mean next-token
negative log-likelihood over the target and EOS tokens (prompt tokens have loss
weight 0). Examples are packed first-fit into rows of ``max_length`` tokens,
each with its own segment id and positions from 0, so attention never crosses
examples. Same sharding, checkpoints, metrics and HF export as RL; a restarted
run resumes from its last checkpoint and the data order follows from the step.

Shape legend: B rows per batch, L ``max_length``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from zsjax import data as data_lib
from zsjax import hf
from zsjax import workdir as workdir_lib
from zsjax.checkpoint import Checkpointer, abstract_like, check_checkpoint_config, export_hf
from zsjax.metrics import MetricWriter, console, metrics_at
from zsjax.sharding import ShardingPlan, is_main_process
from zsjax.train_step import (create_train_state, init_state, make_optimizer,
                              make_update_step, next_token_loss)


def _target_pieces(row) -> list[tuple[str, int]]:
  """The target as ``(text, loss weight)`` pieces: ``target`` whole, or, when the
  row has ``target_segments`` (texts) and ``target_loss`` (0/1 each), piece by
  piece, e.g. a demonstration whose inserted documents get no loss."""
  if row.get("target_segments"):
    return list(zip(row["target_segments"], row["target_loss"]))
  return [(row["target"], 1)]


def tokenize_examples(tokenizer, rows, max_length: int, eos_id: int):
  """``[(ids, target_mask)]`` per example: prompt then target then EOS, cut to
  ``max_length`` (the target's tail is dropped). Segmented targets are tokenized
  piece by piece, the way a rollout inserts them. Also returns how many were cut."""
  out, cut = [], 0
  for row in rows:
    prompt = tokenizer.encode(row["prompt"], add_special_tokens=False)
    ids, mask = list(prompt), [0] * len(prompt)
    for text, weight in _target_pieces(row):
      piece = tokenizer.encode(text, add_special_tokens=False)
      ids += piece
      mask += [int(weight)] * len(piece)
    ids.append(eos_id)
    mask.append(1)
    if len(ids) > max_length:
      cut += 1
      ids, mask = ids[:max_length], mask[:max_length]
    if sum(mask):
      out.append((ids, mask))
  return out, cut


def pack(examples, max_length: int, pad_id: int) -> dict[str, np.ndarray]:
  """First-fit packing into rows of ``max_length``: ``tokens``, ``loss_mask``,
  ``segment_ids`` (1, 2, ... per example; 0 = padding) and ``positions``, each
  ``[R, L]``. The examples' order is kept within a row."""
  rows: list[list[tuple[list[int], list[int]]]] = []
  room: list[int] = []
  for example in examples:
    n = len(example[0])
    for r, free in enumerate(room):
      if free >= n:
        rows[r].append(example)
        room[r] -= n
        break
    else:
      rows.append([example])
      room.append(max_length - n)
  shape = (len(rows), max_length)
  out = {"tokens": np.full(shape, pad_id, np.int32), "loss_mask": np.zeros(shape, np.int32),
         "segment_ids": np.zeros(shape, np.int32), "positions": np.zeros(shape, np.int32)}
  for r, row in enumerate(rows):
    at = 0
    for segment, (ids, mask) in enumerate(row, 1):
      n = len(ids)
      out["tokens"][r, at:at + n] = ids
      out["loss_mask"][r, at:at + n] = mask
      out["segment_ids"][r, at:at + n] = segment
      out["positions"][r, at:at + n] = np.arange(n)
      at += n
  return out


def packed_split(tokenizer, dataset, max_length: int, eos_id: int, pad_id: int, what: str):
  examples, cut = tokenize_examples(tokenizer, dataset, max_length, eos_id)
  if not examples:
    raise ValueError(f"{what}: no example has a target token within max_length={max_length}.")
  packed = pack(examples, max_length, pad_id)
  return packed, {"examples": len(examples), "rows": len(packed["tokens"]), "cut": cut,
                  "target_tokens": int(packed["loss_mask"].sum())}


def evaluate_nll(eval_fn, params, packed, batch_size: int, plan) -> float:
  """Mean target-token NLL over all packed rows (the last batch padded with empty rows)."""
  total, count = nll_sum(eval_fn, params, packed, batch_size, plan)
  return total / max(count, 1.0)


def nll_sum(eval_fn, params, packed, batch_size: int, plan) -> tuple[float, float]:
  """The target-token NLL summed over all packed rows, and the target tokens counted."""
  rows = len(packed["tokens"])
  total = count = 0.0
  for start in range(0, rows, batch_size):
    batch = {k: v[start:start + batch_size] for k, v in packed.items()}
    short = batch_size - len(batch["tokens"])
    if short:
      batch = {k: np.concatenate([v, np.zeros((short,) + v.shape[1:], v.dtype)])
               for k, v in batch.items()}
    nll, n = eval_fn(params, plan.put_batch(batch))
    total += float(nll)
    count += float(n)
  return total, count


def evaluate_check(eval_fn, params, held_out, groups, batch_size: int, plan) -> dict:
  """The held-out metrics: ``eval/nll`` (the mean target-token NLL) and
  ``eval/perplexity``; with ``groups`` (name -> packed rows, ``sft.stop_group``)
  also each group's mean, ``eval/nll/<name>``, and the worst, ``eval/nll_worst``
  (the mean is then taken over the groups' tokens together)."""
  if not groups:
    nll = evaluate_nll(eval_fn, params, held_out, batch_size, plan)
    return {"eval/nll": nll, "eval/perplexity": float(np.exp(nll))}
  sums = {name: nll_sum(eval_fn, params, packed, batch_size, plan)
          for name, packed in groups.items()}
  nll = sum(t for t, _ in sums.values()) / max(sum(c for _, c in sums.values()), 1.0)
  out = {"eval/nll": nll, "eval/perplexity": float(np.exp(nll))}
  out.update({f"eval/nll/{name}": t / max(c, 1.0) for name, (t, c) in sums.items()})
  out["eval/nll_worst"] = max(out[f"eval/nll/{name}"] for name in groups)
  return out


def check_value(s, metrics: dict) -> float:
  """The number the early stop compares with ``sft.stop_nll``: the worst group's
  NLL with ``sft.stop_group``, else the mean."""
  return metrics["eval/nll_worst"] if s.get("stop_group", "") else metrics["eval/nll"]


@dataclasses.dataclass
class SFTJob:
  """What ``setup`` builds; the loop reads it."""

  config: ml_collections.ConfigDict
  workdir: Path
  key: jax.Array
  plan: ShardingPlan
  tokenizer: Any
  cfg: Any  # the model's ModelConfig
  state: Any  # a fresh TrainState (used when there is no checkpoint)
  target: Any  # the checkpoint's abstract tree
  train: dict  # packed rows: tokens, segment_ids, positions, loss_mask [R, L]
  train_info: dict
  held_out: dict | None  # the packed test split
  update: Any  # jitted (state, batch, rng) -> (state, metrics), on the schedule's first plan
  eval_fn: Any  # jitted (params, batch) -> (nll sum, target tokens)
  # cooldown (start, steps) -> an update on that schedule (learning_rate_schedule's
  # cooldown); the early stop rebuilds the step once, when its check passes
  make_update: Any = None
  # sft.stop_group: the test split packed group by group (name -> packed rows)
  held_out_groups: dict | None = None
  # sft.focus: the train split's rows of each checked group, packed apart (name -> rows)
  train_groups: dict | None = None


def first_cooldown(s) -> tuple[int, int] | None:
  """The cooldown an early-stopping job plans before its check passes: the last
  ``sft.cooldown_steps`` of ``sft.total_steps`` (None: the job does not stop early)."""
  if not s.stop_nll:
    return None
  return s.total_steps - s.cooldown_steps, s.cooldown_steps


def schedule_steps(s) -> int:
  """The steps the learning-rate schedule spans: ``sft.schedule_steps``, or
  ``sft.total_steps`` when it is 0 (or absent)."""
  return s.get("schedule_steps", 0) or s.total_steps


def check_config(config) -> None:
  """Fails before any work, naming the field, the value and the fix."""
  s = config.sft
  if s.get("schedule_steps", 0) < 0:
    raise ValueError(f"config.sft.schedule_steps={s.schedule_steps} must be >= 0 (0: the "
                     "schedule spans config.sft.total_steps).")
  if s.batch_size <= 0 or s.total_steps <= 0:
    raise ValueError(f"config.sft.batch_size={s.batch_size} and config.sft.total_steps="
                     f"{s.total_steps} must be positive.")
  if not s.learning_rate > 0:
    raise ValueError(f"config.sft.learning_rate={s.learning_rate} must be > 0 (a negative rate "
                     "would climb the loss).")
  for name in ("weight_decay", "grad_clip"):
    if s.get(name, 0.0) < 0:
      raise ValueError(f"config.sft.{name}={s[name]} must be >= 0 (0 turns it off).")
  if not 0.0 <= s.get("warmup_fraction", 0.0) <= 1.0:
    raise ValueError(f"config.sft.warmup_fraction={s.warmup_fraction} must lie in [0, 1] (the "
                     "share of the schedule's steps spent warming the learning rate up).")
  if s.stop_nll < 0 or s.cooldown_steps < 0:
    raise ValueError(f"config.sft.stop_nll={s.stop_nll} and config.sft.cooldown_steps="
                     f"{s.cooldown_steps} must be >= 0 (stop_nll 0: no early stop).")
  if s.stop_nll and not 0 <= s.cooldown_steps < s.total_steps:
    raise ValueError(f"config.sft.cooldown_steps={s.cooldown_steps} must be below "
                     f"config.sft.total_steps={s.total_steps} (the cap) when config.sft.stop_nll "
                     "is set: the check may pass only before the cap's cooldown.")
  if s.get("stop_passes", 1) < 1:
    raise ValueError(f"config.sft.stop_passes={s.stop_passes} must be >= 1 (how many checks in "
                     "a row must pass before the early stop's cooldown begins).")
  focus = s.get("focus", 0.0)
  if not 0.0 <= focus <= 1.0:
    raise ValueError(f"config.sft.focus={focus} must lie in [0, 1] (the share of each batch "
                     "drawn from the worst group of the check; 0: off).")
  if focus and not (s.stop_nll and s.get("stop_group", "")):
    raise ValueError(f"config.sft.focus={focus} draws rows of the group whose check fails "
                     "worst: it needs config.sft.stop_group (the groups) and config.sft.stop_nll "
                     "> 0 (what failing means). Set both, or config.sft.focus=0.")
  if focus and focus_rows(s) < 1:
    raise ValueError(f"config.sft.focus={focus} of config.sft.batch_size={s.batch_size} rows is "
                     "less than one row: raise either.")
  if s.stop_nll and s.eval_every < 1:
    raise ValueError(f"config.sft.eval_every={s.eval_every}: the early stop's check runs every "
                     "eval_every steps; set it >= 1.")
  check_checkpoint_config(config.checkpoint)


def setup(config: ml_collections.ConfigDict, workdir: str | Path) -> SFTJob:
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  check_config(config)
  s, plan = config.sft, ShardingPlan.from_config(config)
  if s.batch_size % plan.batch_divisor:
    raise ValueError(f"config.sft.batch_size={s.batch_size} is not a multiple of data x fsdp = "
                     f"{plan.batch_divisor} (mesh {plan.sizes}).")
  tokenizer = hf.config_tokenizer(config, "model")
  eos = tokenizer.eos_token_id
  if eos is None:
    raise ValueError(f"the tokenizer in {tokenizer.name_or_path} has no EOS token; SFT targets "
                     "end in it.")
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
  key = jax.random.key(config.seed)
  cfg, initial = hf.load_model(config.model, plan, jax.random.fold_in(key, 1), len(tokenizer),
                               (eos,), what="model")

  splits = data_lib.load_sft(s.data, on_error=s.on_error)
  if "train" not in splits:
    raise ValueError(f"config.sft.data={s.data!r} has no 'train' split (found {sorted(splits)}).")
  train, train_info = packed_split(tokenizer, splits["train"], s.max_length, eos, pad, "train")
  held_out = None
  if "test" in splits and len(splits["test"]):
    held_out, _ = packed_split(tokenizer, splits["test"], s.max_length, eos, pad, "test")
  if s.stop_nll and held_out is None:
    raise ValueError(f"config.sft.stop_nll={s.stop_nll}: the early stop checks the held-out "
                     f"NLL, and config.sft.data={s.data!r} has no 'test' split. Add test rows, "
                     "or set config.sft.stop_nll=0.")
  groups = None
  if held_out is not None and s.get("stop_group", ""):
    groups = grouped_split(tokenizer, splits["test"], s.stop_group, s.max_length, eos, pad,
                           f"config.sft.data={s.data!r}")
  train_groups = None
  if s.get("focus", 0.0):
    train_groups = grouped_split(tokenizer, splits["train"], s.stop_group, s.max_length, eos, pad,
                                 f"config.sft.data={s.data!r}", split="train", only=groups)

  def optimizer(cooldown):
    return make_optimizer(s.learning_rate, schedule_steps(s), warmup_fraction=s.warmup_fraction,
                          decay=s.decay, weight_decay=s.weight_decay, clip_norm=s.grad_clip,
                          cooldown=cooldown)

  tx, _ = optimizer(first_cooldown(s))  # the state's structure: the same for every schedule
  state, shardings = create_train_state(cfg, tx, plan, params=initial)
  spec = {k: jax.ShapeDtypeStruct((s.batch_size, s.max_length), jnp.int32) for k in train}
  batch_shardings = plan.batch(spec)
  loss_fn = functools.partial(next_token_loss, cfg)

  def make_update(cooldown):
    tx_, schedule = optimizer(cooldown)
    return make_update_step(lambda p, b, r: loss_fn(p, b, r), tx_, plan, shardings,
                            batch_shardings, schedule)

  def eval_step(params, batch):
    with plan.context():
      loss, metrics = loss_fn(params, batch)
    count = metrics["data/target_tokens"]
    return loss * count, count

  eval_fn = jax.jit(eval_step, in_shardings=(shardings.params, batch_shardings),
                    out_shardings=(plan.replicated(), plan.replicated()))
  target = abstract_like(jax.eval_shape(lambda: init_state(cfg, tx, jax.random.key(0))), shardings)
  return SFTJob(config=config, workdir=workdir, key=key, plan=plan, tokenizer=tokenizer, cfg=cfg,
                state=state, target=target, train=train, train_info=train_info,
                held_out=held_out, update=make_update(first_cooldown(s)), eval_fn=eval_fn,
                make_update=make_update, held_out_groups=groups, train_groups=train_groups)


def grouped_split(tokenizer, dataset, column: str, max_length: int, eos_id: int, pad_id: int,
                  what: str, split: str = "test", only=None) -> dict:
  """A split packed group by group: rows grouped by ``column``'s value
  (``sft.stop_group``), in sorted order of the values; with ``only``, just those
  values (each must have rows)."""
  if column not in dataset.column_names:
    raise ValueError(f"config.sft.stop_group={column!r}: the {split} split of {what} has no such "
                     f"column (it has {sorted(dataset.column_names)}). Name one of them, or set "
                     "config.sft.stop_group='' to check the mean.")
  values = [str(v) for v in dataset[column]]
  present = set(values)
  names = sorted(present) if only is None else sorted(only)
  missing = [name for name in names if name not in present]
  if missing:
    raise ValueError(f"config.sft.focus: the {split} split of {what} has no rows with "
                     f"{column} in {missing}, groups of the check; it cannot draw more of them. "
                     "Add such rows, or set config.sft.focus=0.")
  groups = {}
  for name in names:
    rows = dataset.select([i for i, v in enumerate(values) if v == name])
    groups[name], _ = packed_split(tokenizer, rows, max_length, eos_id, pad_id,
                                   f"{split} rows with {column}={name!r}")
  return groups


def focus_rows(s) -> int:
  """How many of a step's ``sft.batch_size`` rows ``sft.focus`` draws from its group."""
  return round(s.get("focus", 0.0) * s.batch_size)


def focus_group(s, metrics: dict) -> str | None:
  """``sft.focus``'s group after a check: the group whose NLL is highest among those
  above ``sft.stop_nll`` (ties: the first name), or None when every group passes."""
  failing = {k[len("eval/nll/"):]: v for k, v in metrics.items()
             if k.startswith("eval/nll/") and v > s.stop_nll}
  return max(sorted(failing), key=failing.get) if failing else None


def batch_of(job: SFTJob, step: int, focus: str | None) -> dict:
  """Training step ``step``'s rows (from 1): ``sft.batch_size`` rows of the train split
  in epoch order; while a group fails the check (``focus``), ``n = round(sft.focus *
  batch_size)`` of them are drawn from that group's rows (in their own epoch order)
  and the rest, ``batch_size - n``, from the train split at position ``(step - 1) *
  (batch_size - n)``: a pure function of the step and the focus, so a resume draws
  the same rows, but a change of focus moves the train split's position."""
  s, train = job.config.sft, job.train
  n = focus_rows(s) if focus is not None else 0
  index = data_lib.batch_rows(len(train["tokens"]), s.batch_size - n, job.config.seed, step - 1)
  batch = {k: v[index] for k, v in train.items()}
  if n:
    rows = job.train_groups[focus]
    extra = data_lib.batch_rows(len(rows["tokens"]), n, job.config.seed, step - 1)
    batch = {k: np.concatenate([v, rows[k][extra]]) for k, v in batch.items()}
  return batch


def train(job: SFTJob) -> dict:
  """The loop: resume or start, step, evaluate, write, checkpoint; export at the end."""
  config, s, plan, workdir = job.config, job.config.sft, job.plan, job.workdir
  checkpointer = Checkpointer.from_config(workdir / "checkpoints", config.checkpoint)
  checkpointer.refuse_other_run(workdir, "seed", config.seed, "config.seed")
  checkpointer.refuse_other_horizon(workdir, schedule_steps(s), s.total_steps, "config.sft")
  inputs = workdir_lib.input_fingerprints(config)  # data, tokenizer, the starting checkpoint
  checkpointer.refuse_changed_inputs(workdir, inputs)
  record = workdir_lib.identity_record(workdir)  # saved in each checkpoint: run.json's copy
  state, extra, resumed = checkpointer.restore_or(job.target, lambda: job.state,
                                                   log=console)
  start = int(extra.get("step", 0))
  summary = {"data": job.train_info, "resumed_from": start}
  # the early stop (sft.stop_nll): the cooldown planned so far, the step the check passed
  cooldown = tuple(extra["cooldown"]) if "cooldown" in extra else first_cooldown(s)
  formed = int(extra.get("formed_step", -1))
  passes = int(extra.get("check_passes", 0))  # checks passed in a row (sft.stop_passes)
  focus = extra.get("focus_group")  # sft.focus: the group drawn more of, None: none yet
  update = job.update if cooldown == first_cooldown(s) else job.make_update(cooldown)
  end = sum(cooldown) if cooldown else s.total_steps
  # the check before training: measured at step 0, kept in every checkpoint so that a
  # resumed run still reports it
  before = dict(extra.get("check_before", {}))
  if job.held_out is not None and start == 0:
    check = evaluate_check(job.eval_fn, state.params, job.held_out, job.held_out_groups,
                           s.batch_size, plan)
    before = {f"{k}_before": float(check[k]) for k in ("eval/nll", "eval/nll_worst")
              if k in check}
  summary.update(before)
  step = start

  def extra_at(at: int) -> dict:  # what a checkpoint at step `at` keeps besides the state
    return {"step": at, "seed": config.seed, "schedule_steps": schedule_steps(s),
            "inputs": inputs,
            **({"check_passes": passes} if s.stop_nll else {}),
            **({"check_before": before} if before else {}),
            **({"focus_group": focus} if job.train_groups else {}),
            **({"cooldown": list(cooldown), "formed_step": formed} if formed >= 0 else {}),
            **({"record": record} if record else {})}

  done = start  # the last step whose state, check and metrics are complete
  try:
    with MetricWriter(workdir, resume_from=start) as writer, tqdm(
        total=end, initial=start, desc="sft", unit="step",
        disable=not is_main_process() or not config.progress) as bar:
      while step < end:
        # a signal lands between steps: the step under way finishes (its check too,
        # every eval_every steps) and the interrupt path below saves it; a second
        # signal stops it at once
        with checkpointer.step_body("SFT", step + 1):
          step += 1
          t0 = time.perf_counter()
          rows = batch_of(job, step, focus)
          state, metrics = update(state, plan.put_batch(rows), job.key)
          metrics = dict(jax.device_get(metrics))
          metrics["time/step_s"] = time.perf_counter() - t0
          metrics["perf/tokens_per_s"] = float(rows["segment_ids"].astype(bool).sum()) / \
              metrics["time/step_s"]
          if job.train_groups:
            metrics["data/focus_rows"] = float(focus_rows(s) if focus is not None else 0)
          if job.held_out is not None and (step % s.eval_every == 0 or step == end):
            metrics.update(evaluate_check(job.eval_fn, state.params, job.held_out,
                                          job.held_out_groups, s.batch_size, plan))
            nll = check_value(s, metrics)
            if job.train_groups and (worst := focus_group(s, metrics)) != focus:
              focus = worst
              console(f"SFT step {step}: " + (
                      f"every group's NLL <= {s.stop_nll}; no focus." if focus is None else
                      f"{s.stop_group}={focus!r} fails worst (NLL "
                      f"{metrics[f'eval/nll/{focus}']:.4f}); {focus_rows(s)} of "
                      f"{s.batch_size} rows a step are drawn from it "
                      f"(config.sft.focus={s.focus})."))
            passes = passes + 1 if s.stop_nll and nll <= s.stop_nll else 0
            if s.stop_nll and formed < 0 and passes >= s.get("stop_passes", 1):
              formed = step  # the check passed: cool down from here (unless the cap's has begun)
              if step < cooldown[0]:
                cooldown, end = (step, s.cooldown_steps), step + s.cooldown_steps
                update, bar.total = job.make_update(cooldown), end
                what = "worst group's" if s.get("stop_group", "") else "held-out"
                console(f"SFT step {step}: {what} NLL {nll:.4f} <= config.sft.stop_nll="
                        f"{s.stop_nll} ({passes} checks in a row); cooling down over "
                        f"{s.cooldown_steps} steps.")
          try:
            last = writer.write(step, metrics)
          except FloatingPointError as e:
            checkpointer.close()
            raise FloatingPointError(f"SFT step {step}: {e} The last checkpoint: "
                                     f"{checkpointer.latest()}.") from None
          summary.setdefault("loss/first", last["loss/nll"])
          summary.update(last)
          bar.set_postfix({"nll": f"{last['loss/nll']:.3f}"}, refresh=False)
          bar.update(1)
          done = step
          if step % config.checkpoint.every == 0 or step == end:
            checkpointer.save(step, state, extra=extra_at(step))
  except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (zsjax.interrupts)
    checkpointer.close_on_interrupt(e, "SFT", step, done, state, extra_at, console)
    raise
  except BaseException:
    checkpointer.close()  # a save in flight completes whatever stopped the loop
    raise
  checkpointer.close()
  if start >= end and start:  # a rerun of a finished run: keep the last metrics
    summary.update(metrics_at(workdir, start))
  summary["sft/steps"] = step
  if s.stop_nll:  # -1: the check never passed (the cap's cooldown ran)
    summary["sft/formed_step"] = formed
  if config.checkpoint.export_hf and is_main_process():
    summary["hf_export"] = str(export_hf(workdir / "hf_export", job.cfg, state.params,
                                         job.tokenizer))
  if is_main_process():
    (workdir / "sft_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  return summary


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  return train(setup(config, workdir))


__all__ = ["tokenize_examples", "pack", "packed_split", "evaluate_nll", "SFTJob", "check_config",
           "setup", "train", "run"]
