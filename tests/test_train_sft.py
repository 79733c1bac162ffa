"""The sft job's early stop (``sft.stop_nll``): it ends a cooldown after its
held-out check passes, on a warmup-stable-decay schedule, resumes on the same
schedule, and runs to its cap when the check never passes."""

import json
import math

import jax
import numpy as np
import pytest

from config_files import load_config
from zsjax import train_sft
from zsjax.checkpoint import Checkpointer
from zsjax.data import batch_rows, write_jsonl
from zsjax.metrics import read_jsonl
from zsjax.train_step import learning_rate_schedule

LR, WARMUP, CAP, EVERY, COOLDOWN = 1e-2, 0.1, 40, 5, 6


def _config(world, tmp_path, stop_nll):
  rows = [{"prompt": f"Question: where is {name}?\n", "target": f"<answer> {name} </answer>",
           "split": split} for split, names in (("train", ["Lund", "Oslo", "Bern"] * 4),
                                                ("test", ["Riga", "Kiev"]))
          for name in names]
  config = load_config("sim_tuning", "sft")
  config.progress = False
  config.tokenizer = world["tokenizer"]
  config.model.model.update(dict(embed_dim=32, mlp_dim=64, num_layers=1, num_heads=2,
                                 num_kv_heads=1, head_dim=16))
  config.sft.update(dict(data=str(write_jsonl(tmp_path / "data.jsonl", rows)), max_length=32,
                         batch_size=8, total_steps=CAP, learning_rate=LR, warmup_fraction=WARMUP,
                         decay="cosine", eval_every=EVERY, stop_nll=stop_nll,
                         cooldown_steps=COOLDOWN))
  config.checkpoint.update(dict(every=4, async_save=False, export_hf=False))
  return config


def _lrs(workdir):
  return [r["optim/lr"] for r in read_jsonl(workdir / "metrics.jsonl")]


def _expected_lrs(start, end):
  """The warmup-stable-decay rates written out: linear warmup, the rate held, then a
  cosine to 0 over the COOLDOWN steps after ``start`` (update k is step k + 1)."""
  warmup = round(WARMUP * CAP)
  out = []
  for k in range(end):
    if k < warmup:
      out.append(LR / warmup + (LR - LR / warmup) * k / (warmup - 1))
    elif k < start:
      out.append(LR)
    else:
      out.append(LR * 0.5 * (1 + math.cos(math.pi * (k - start) / COOLDOWN)))
  return out


def test_the_early_stop_cools_down_after_its_check_and_resumes_on_the_same_schedule(world,
                                                                                     tmp_path):
  config = _config(world, tmp_path, stop_nll=1e9)  # the first check passes
  summary = train_sft.run(config, str(tmp_path / "whole"))
  assert summary["sft/formed_step"] == EVERY and summary["sft/steps"] == EVERY + COOLDOWN
  np.testing.assert_allclose(_lrs(tmp_path / "whole"), _expected_lrs(EVERY, EVERY + COOLDOWN),
                             rtol=1e-5, atol=1e-9)
  assert "eval/nll" in read_jsonl(tmp_path / "whole" / "metrics.jsonl")[-1]  # the end's check

  # killed after step 8 (its checkpoint holds the cooldown): the rerun ends where the
  # whole run did, on the same schedule, with the same parameters
  with pytest.raises(KeyboardInterrupt):
    train_sft.train(_recording(train_sft.setup(config, tmp_path / "killed"), {}, kill_at=8))
  resumed_job = train_sft.setup(config, tmp_path / "killed")
  resumed = train_sft.train(resumed_job)
  assert resumed["resumed_from"] == 8 and resumed["sft/steps"] == EVERY + COOLDOWN
  assert resumed["sft/formed_step"] == EVERY
  # the check before training (step 0) survives the resume (report.results_table prints it)
  assert resumed["eval/nll_before"] == summary["eval/nll_before"] > summary["eval/nll"]
  np.testing.assert_allclose(_lrs(tmp_path / "killed")[-3:], _lrs(tmp_path / "whole")[-3:],
                             rtol=1e-6)
  final = {}
  for name in ("whole", "killed"):
    checkpointer = Checkpointer.from_config(tmp_path / name / "checkpoints", config.checkpoint)
    state, extra = checkpointer.restore(resumed_job.target, EVERY + COOLDOWN)
    checkpointer.close()
    assert extra["cooldown"] == [EVERY, COOLDOWN] and extra["formed_step"] == EVERY
    final[name] = state.params
  for a, b in zip(jax.tree_util.tree_leaves(final["whole"]),
                  jax.tree_util.tree_leaves(final["killed"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_a_check_that_never_passes_runs_to_the_cap_and_cools_down_there(world, tmp_path):
  config = _config(world, tmp_path, stop_nll=1e-9)
  summary = train_sft.run(config, str(tmp_path / "run"))
  assert summary["sft/formed_step"] == -1 and summary["sft/steps"] == CAP
  np.testing.assert_allclose(_lrs(tmp_path / "run"), _expected_lrs(CAP - COOLDOWN, CAP),
                             rtol=1e-5, atol=1e-9)
  evals = [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "eval/nll" in r]
  assert evals == list(range(EVERY, CAP + 1, EVERY))
  assert json.loads((tmp_path / "run" / "sft_summary.json").read_text())["eval/nll"] > 1e-9


@pytest.mark.parametrize("change,needle", [
    (dict(cooldown_steps=40), r"config.sft.cooldown_steps=40 must be below config.sft.total_steps=40"),
    (dict(stop_nll=-1.0), r"config.sft.stop_nll=-1.0 and config.sft.cooldown_steps=6 must be >= 0"),
    (dict(eval_every=0), r"config.sft.eval_every=0: the early stop's check runs every"),
])
def test_bad_early_stop_settings_are_named(world, tmp_path, change, needle):
  config = _config(world, tmp_path, stop_nll=0.5)
  train_sft.check_config(config)
  config.sft.update(change)
  with pytest.raises(ValueError, match=needle):
    train_sft.check_config(config)


def test_an_early_stop_without_held_out_rows_is_refused(world, tmp_path):
  config = _config(world, tmp_path, stop_nll=0.5)
  rows = [r for r in read_jsonl(config.sft.data) if r["split"] == "train"]
  config.sft.data = str(write_jsonl(tmp_path / "train_only.jsonl", rows))
  with pytest.raises(ValueError, match=r"config.sft.stop_nll=0.5: .* has no 'test' split"):
    train_sft.setup(config, tmp_path / "run")


def _grouped(config, tmp_path):
  """The test rows in two groups: names the train rows hold (read back easily) and
  names they do not (hard)."""
  rows = read_jsonl(config.sft.data)
  rows += [{"prompt": f"Question: where is {name}?\n", "target": f"<answer> {name} </answer>",
            "split": "test"} for name in ("Lund", "Oslo")]
  rows = [dict(r, group="seen" if r["target"].split()[1] in ("Lund", "Oslo", "Bern") else "unseen")
          for r in rows]
  config.sft.data = str(write_jsonl(tmp_path / "grouped.jsonl", rows))
  config.sft.stop_group = "group"
  return config


def test_a_check_by_group_stops_on_its_worst_group_and_reports_each(world, tmp_path):
  config = _grouped(_config(world, tmp_path, stop_nll=1e-9), tmp_path)
  train_sft.run(config, str(tmp_path / "capped"))  # never passes: the whole curve
  evals = [r for r in read_jsonl(tmp_path / "capped" / "metrics.jsonl") if "eval/nll" in r]
  for r in evals:
    assert r["eval/nll_worst"] == max(r["eval/nll/seen"], r["eval/nll/unseen"])
    assert min(r["eval/nll/seen"], r["eval/nll/unseen"]) <= r["eval/nll"] <= r["eval/nll_worst"]
  # each group's NLL is that group's rows evaluated alone (an independent packing)
  job = train_sft.setup(config, tmp_path / "capped")
  checkpointer = Checkpointer.from_config(tmp_path / "capped" / "checkpoints", config.checkpoint)
  state, _ = checkpointer.restore(job.target, CAP)
  checkpointer.close()
  tok = job.tokenizer
  for group in ("seen", "unseen"):
    rows = [r for r in read_jsonl(config.sft.data) if r["split"] == "test" and r["group"] == group]
    packed, _ = train_sft.packed_split(tok, rows, config.sft.max_length, tok.eos_token_id,
                                       tok.pad_token_id, group)
    alone = train_sft.evaluate_nll(job.eval_fn, state.params, packed, config.sft.batch_size,
                                   job.plan)
    np.testing.assert_allclose(alone, evals[-1][f"eval/nll/{group}"], rtol=1e-5)
  # a threshold the mean meets before the worst group does: the stop waits for the worst
  means = {r["step"]: r["eval/nll"] for r in evals}
  worst = {r["step"]: r["eval/nll_worst"] for r in evals}
  step = next((k for k in means if worst[k] > 1.05 * means[k] and k < CAP - COOLDOWN), None)
  assert step is not None, "the two groups' NLL never differed: the test cannot tell"
  threshold = (means[step] + worst[step]) / 2
  config.sft.stop_nll = threshold
  summary = train_sft.run(config, str(tmp_path / "stopped"))
  # the same curve as the capped run's until it forms (-1: the worst never passed)
  expected = next((k for k in worst if worst[k] <= threshold), -1)
  mean_would = next(k for k in means if means[k] <= threshold)
  assert summary["sft/formed_step"] == expected and expected != mean_would


def test_the_early_stop_waits_for_several_passing_checks_in_a_row(world, tmp_path):
  config = _config(world, tmp_path, stop_nll=1e9)
  config.sft.stop_passes = 3
  summary = train_sft.run(config, str(tmp_path / "run"))
  assert summary["sft/formed_step"] == 3 * EVERY and summary["sft/steps"] == 3 * EVERY + COOLDOWN


def test_bad_check_by_group_settings_are_named(world, tmp_path):
  config = _config(world, tmp_path, stop_nll=0.5)
  config.sft.stop_passes = 0
  with pytest.raises(ValueError, match=r"config.sft.stop_passes=0 must be >= 1"):
    train_sft.check_config(config)
  config.sft.stop_passes = 1
  config.sft.stop_group = "relation"
  with pytest.raises(ValueError, match=r"config.sft.stop_group='relation': the test split .* "
                                       r"has no such column"):
    train_sft.setup(config, tmp_path / "run")


def _two_groups(world, tmp_path, focus):
  """Cities and rivers, each group's test names never trained on (neither check passes)."""
  config = _config(world, tmp_path, stop_nll=1e-9)
  rows = [{"prompt": prompt.format(name), "target": f"<answer> {name} </answer>", "split": split,
           "kind": kind}
          for kind, prompt, train, test in (
              ("city", "Question: where is {}?\n", ["Lund", "Oslo", "Bern"], ["Riga", "Kiev"]),
              ("river", "Question: which river flows past the mill, {}?\n", ["Rhine", "Volga"],
               ["Elbe", "Oder"]))
          for split, names in (("train", train * 5), ("test", test)) for name in names]
  config.sft.update(dict(data=str(write_jsonl(tmp_path / "kinds.jsonl", rows)),
                         stop_group="kind", focus=focus, total_steps=16))
  return config


def _recording(job, batches, kill_at=None):
  build = job.make_update

  def make_update(cooldown):
    update = build(cooldown)

    def recorded(state, batch, key):
      if int(state.step) == kill_at:
        raise KeyboardInterrupt
      batches[int(state.step) + 1] = {k: np.asarray(v) for k, v in batch.items()}
      return update(state, batch, key)
    return recorded

  job.make_update = make_update
  job.update = make_update(train_sft.first_cooldown(job.config.sft))
  return job


def test_focus_draws_rows_of_the_worst_group_and_resumes_the_same(world, tmp_path):
  config = _two_groups(world, tmp_path, focus=0.5)
  batches = {}
  job = _recording(train_sft.setup(config, tmp_path / "whole"), batches)
  train_sft.train(job)
  records = read_jsonl(tmp_path / "whole" / "metrics.jsonl")
  checks = {r["step"]: r for r in records if "eval/nll" in r}
  tok, n = job.tokenizer, round(0.5 * config.sft.batch_size)

  def kinds(rows):
    return [{("river" if "river" in t else "city") for t in
             tok.decode(rows["tokens"][i][rows["segment_ids"][i] > 0]).split("Question:")[1:]}
            for i in range(len(rows["tokens"]))]

  focus = None
  for step in range(1, 17):
    rows = batches[step]
    if focus is None:  # before the first check: the plain epoch order
      index = batch_rows(len(job.train["tokens"]), config.sft.batch_size, config.seed, step - 1)
      np.testing.assert_array_equal(rows["tokens"], job.train["tokens"][index])
    else:  # the last n rows hold only the focused group's examples
      assert all(k == {focus} for k in kinds(rows)[-n:]), (step, focus)
    assert records[step - 1]["data/focus_rows"] == (n if focus else 0)
    if step in checks:  # the worst group of this check is drawn from after it
      nll = {g: checks[step][f"eval/nll/{g}"] for g in ("city", "river")}
      focus = max(nll, key=nll.get)
  assert len({frozenset(k) for k in kinds(batches[16])[:-n]}) > 1  # the rest: both kinds

  # killed after step 8 and resumed: the same rows, the same parameters
  resumed = {}
  with pytest.raises(KeyboardInterrupt):
    train_sft.train(_recording(train_sft.setup(config, tmp_path / "killed"), resumed, kill_at=8))
  train_sft.train(_recording(train_sft.setup(config, tmp_path / "killed"), resumed))
  for step in range(9, 17):
    np.testing.assert_array_equal(resumed[step]["tokens"], batches[step]["tokens"])
  final = []
  for name in ("whole", "killed"):
    checkpointer = Checkpointer.from_config(tmp_path / name / "checkpoints", config.checkpoint)
    state, extra = checkpointer.restore(job.target, 16)
    checkpointer.close()
    final.append(state.params)
  for a, b in zip(*map(jax.tree_util.tree_leaves, final)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_bad_focus_settings_are_named(world, tmp_path):
  config = _two_groups(world, tmp_path, focus=1.5)
  with pytest.raises(ValueError, match=r"config.sft.focus=1.5 must lie in \[0, 1\]"):
    train_sft.check_config(config)
  config.sft.update(dict(focus=0.5, stop_group=""))
  with pytest.raises(ValueError, match=r"config.sft.focus=0.5 .* needs config.sft.stop_group"):
    train_sft.check_config(config)
  config.sft.update(dict(focus=0.01, stop_group="kind"))
  with pytest.raises(ValueError, match=r"less than one row"):
    train_sft.check_config(config)


def _signalled(job, at_step, times):
  """``job`` whose update sends SIGTERM ``times`` times while step ``at_step`` runs."""
  import os
  import signal
  build = job.make_update

  def make_update(cooldown):
    update = build(cooldown)

    def signalled(state, batch, key):
      if int(state.step) + 1 == at_step:
        for _ in range(times):
          os.kill(os.getpid(), signal.SIGTERM)
      return update(state, batch, key)
    return signalled

  job.make_update = make_update
  job.update = make_update(train_sft.first_cooldown(job.config.sft))
  return job


@pytest.mark.parametrize("async_save", [False, True])
def test_sigterm_finishes_the_step_under_way_and_saves_it(world, tmp_path, sigterm_raises,
                                                          async_save):
  from zsjax import interrupts

  config = _config(world, tmp_path, stop_nll=1e-9)  # the check never passes: no cooldown
  config.sft.total_steps = 12
  config.checkpoint.update(every=1000, async_save=async_save)  # no periodic save till the end
  whole = train_sft.run(config, str(tmp_path / "whole"))
  # one SIGTERM during step 7, long before any periodic save: step 7 finishes and is
  # saved, so nothing run is lost; the rerun ends with the whole run's parameters
  with pytest.raises(interrupts.Terminated):
    train_sft.train(_signalled(train_sft.setup(config, tmp_path / "killed"), 7, times=1))
  checkpointer = Checkpointer.from_config(tmp_path / "killed" / "checkpoints", config.checkpoint)
  assert checkpointer.all_steps() == [7]
  checkpointer.close()
  assert [r["step"] for r in read_jsonl(tmp_path / "killed" / "metrics.jsonl")] == list(range(1, 8))
  resumed_job = train_sft.setup(config, tmp_path / "killed")
  resumed = train_sft.train(resumed_job)
  assert resumed["resumed_from"] == 7 and resumed["sft/steps"] == 12
  assert resumed["loss/nll"] == pytest.approx(whole["loss/nll"], rel=1e-5)
  final = {}
  for name in ("whole", "killed"):
    checkpointer = Checkpointer.from_config(tmp_path / name / "checkpoints", config.checkpoint)
    final[name] = checkpointer.restore(resumed_job.target, 12)[0].params
    checkpointer.close()
  for a, b in zip(jax.tree_util.tree_leaves(final["whole"]),
                  jax.tree_util.tree_leaves(final["killed"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  # two SIGTERMs in one step (a periodic save's, every 4): the second stops the run
  # at once, so step 8 is lost and the last complete checkpoint, step 4, stands
  config.checkpoint.every = 4
  with pytest.raises(interrupts.Terminated):
    train_sft.train(_signalled(train_sft.setup(config, tmp_path / "twice"), 8, times=2))
  checkpointer = Checkpointer.from_config(tmp_path / "twice" / "checkpoints", config.checkpoint)
  assert checkpointer.all_steps() == [4]
  checkpointer.close()
  assert [r["step"] for r in read_jsonl(tmp_path / "twice" / "metrics.jsonl")] == list(range(1, 8))
