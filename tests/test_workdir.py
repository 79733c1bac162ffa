"""A workdir belongs to one run (lock, identity), partial files from a crash are
tolerated, and the entry point reports a full disk in one line."""

import json
import re
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from zsjax import metrics, workdir
from config_files import load_config

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}


def test_a_second_run_in_a_held_workdir_fails_at_once_naming_the_holder(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time\nfrom zsjax import workdir\n"
       f"with workdir.lock({str(tmp_path)!r}):\n  print('held', flush=True)\n  time.sleep(60)"],
      env=ENV, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    start = time.perf_counter()
    with pytest.raises(workdir.WorkdirBusy, match=rf"in use by another zsjax run \(pid "
                                                  rf"{holder.pid} on "):
      with workdir.lock(tmp_path):
        pass
    assert time.perf_counter() - start < 30.0  # not the holder's 60 s: no waiting
  finally:
    holder.kill()
    holder.wait()
  with workdir.lock(tmp_path):  # a killed holder leaves no stale lock
    pass


def test_a_resume_refuses_a_change_to_what_defines_the_run(tmp_path):
  config = load_config("zerosearch", "tiny")
  log = []
  assert workdir.check_identity(tmp_path, config, log=log.append) == []
  recorded = json.loads((tmp_path / "run.json").read_text())
  assert recorded["job"] == "rl" and recorded["config"]["seed"] == 0

  # a first run that stopped during set-up left nothing to resume: the new one is recorded
  config.seed = 2
  assert workdir.check_identity(tmp_path, config, log=log.append) == []
  assert "left no checkpoint or results" in log.pop()
  assert json.loads((tmp_path / "run.json").read_text())["config"]["seed"] == 2
  config.seed = 0
  workdir.check_identity(tmp_path, config, log=log.append)
  log.clear()
  (tmp_path / "checkpoints" / "1").mkdir(parents=True)  # now the run has a checkpoint

  config.seed, config.rl.algorithm = 1, "ppo"
  with pytest.raises(workdir.RunMismatch) as caught:
    workdir.check_identity(tmp_path, config, log=log.append)
  message = str(caught.value)
  assert "config.seed: 0 -> 1" in message and "config.rl.algorithm: 'reinforce' -> 'ppo'" in message
  assert "new --workdir" in message and log == []

  # more steps would re-base the warmup and the noise curriculum: refused, the fix named
  config = load_config("zerosearch", "tiny")
  config.rl.total_steps, config.progress = 50, False
  with pytest.raises(workdir.RunMismatch, match=r"span 3 steps \(recorded in run.json\); this "
                                                r"one would lay them over 50 .*add "
                                                r"--config.rl.schedule_steps=3; or use a new"):
    workdir.check_identity(tmp_path, config, log=log.append)
  # allowed: more steps on the recorded schedules, no progress bar, smaller micro-batches
  config.rl.schedule_steps, config.rl.micro_batch_size = 3, 4
  notes = workdir.check_identity(tmp_path, config, log=log.append)
  assert sorted(notes) == ["config.progress: True -> False",
                           "config.rl.micro_batch_size: 8 -> 4",
                           "config.rl.schedule_steps: 0 -> 3", "config.rl.total_steps: 3 -> 50"]
  assert len(log) == 4 and all("(allowed)" in line for line in log)
  assert json.loads((tmp_path / "run.json").read_text())["config"]["rl.total_steps"] == 50
  config.rl.schedule_steps = 0  # and back: the span would be 50 again, not the recorded 3
  with pytest.raises(workdir.RunMismatch, match="span 3 steps"):
    workdir.check_identity(tmp_path, config, log=log.append)


def test_a_run_that_failed_before_its_first_checkpoint_binds_nothing(tmp_path):
  """A NaN at step 1 (or out of memory) leaves metrics but no checkpoint: the fix
  its message names (a lower learning rate) is taken, not refused."""
  config = load_config("zerosearch", "tiny")
  workdir.check_identity(tmp_path, config)
  (tmp_path / "metrics.jsonl").write_text("")
  (tmp_path / "checkpoints" / "1.orbax-checkpoint-tmp-123").mkdir(parents=True)  # torn save
  config.rl.learning_rate = 1e-6
  log = []
  assert workdir.check_identity(tmp_path, config, log=log.append) == []
  assert "left no checkpoint or results" in log[0]
  assert json.loads((tmp_path / "run.json").read_text())["config"]["rl.learning_rate"] == 1e-6


CALLS = []


def record_call(config, workdir_):
  CALLS.append((config.seed, str(workdir_)))
  (Path(workdir_) / "checkpoints" / "1").mkdir(parents=True)  # the run has a checkpoint
  return {}


def test_the_entry_point_takes_the_lock_and_checks_the_run_before_the_job(tmp_path, monkeypatch):
  """Through ``main.run_job``, as a user's second command would go: the job itself
  never starts in a held workdir, nor in one holding another run."""
  from zsjax import main

  monkeypatch.setitem(main.JOBS, "rl", f"{__name__}:record_call")
  CALLS.clear()
  config = load_config("zerosearch", "tiny")
  main.run_job(config, str(tmp_path))
  assert CALLS == [(0, str(tmp_path))]
  config.seed = 1
  with pytest.raises(workdir.RunMismatch, match="config.seed: 0 -> 1"):
    main.run_job(config, str(tmp_path))
  config.seed = 0
  with workdir.lock(tmp_path):  # held (here by this process; flock locks are per open file)
    with pytest.raises(workdir.WorkdirBusy, match="in use by another zsjax run"):
      main.run_job(config, str(tmp_path))
  assert CALLS == [(0, str(tmp_path))]


def test_an_empty_workdir_flag_is_refused_before_anything_is_written(tmp_path, monkeypatch):
  from absl import app

  from zsjax import main

  monkeypatch.chdir(tmp_path)
  for empty in ("", "  "):
    with pytest.raises(app.UsageError, match="--workdir=.* is empty"):
      main.run_job(load_config("zerosearch", "tiny"), empty)
  assert list(tmp_path.iterdir()) == []  # not the current directory either


def test_deleting_the_lock_file_does_not_let_a_second_run_in(tmp_path):
  with workdir.lock(tmp_path) as path:
    path.unlink()  # what issue 30 item 11 did under a live holder
    with pytest.raises(workdir.WorkdirBusy, match="lock file is gone"):
      with workdir.lock(tmp_path):
        pass
  with workdir.lock(tmp_path):  # released with the holder
    pass


def test_jobs_that_do_not_resume_have_no_identity(tmp_path):
  assert workdir.check_identity(tmp_path, load_config("eval", "tiny")) == []
  assert not (tmp_path / "run.json").exists()


def test_a_torn_last_line_is_dropped_on_resume_and_a_bad_middle_line_is_named(tmp_path, caplog):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n{"step": 3, "a"')
  with pytest.raises(ValueError, match="its last line is not valid JSON"):
    metrics.read_jsonl(path)
  with caplog.at_level(logging.WARNING):
    writer = metrics.MetricWriter(tmp_path, enabled=True, resume_from=2)
  writer.write(3, {"x/a": 3.0})
  writer.close()
  assert [r["step"] for r in metrics.read_jsonl(path)] == [1, 2, 3]
  assert "partial last line" in caplog.text

  path.write_text('{"step": 1}\n{"step": 2\n{"step": 3}\n')
  with pytest.raises(ValueError, match="line 2 is not valid JSON"):
    metrics.read_jsonl(path, torn_tail="drop")

  collected = tmp_path / "collected.jsonl"  # an append-only file: cut back to a clean line
  collected.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "que')
  assert metrics.drop_torn_tail(collected)
  assert collected.read_text() == '{"id": "a"}\n{"id": "b"}\n'
  assert not metrics.drop_torn_tail(collected)


BOOM = """
import sys
from absl import logging
from zsjax import main

def boom(config, workdir):
  logging.info("a library INFO line")
  raise RuntimeError("the checkpoint save failed") from OSError(
      28, "No space left on device", "/data/run/checkpoints/7/state")

main.JOBS["boom"] = "__main__:boom"
sys.argv = ["zsjax.main", "--config=configs/eval.py:tiny", "--workdir=" + sys.argv[1],
            "--config.job=boom"]
from absl import app
main.flags.mark_flags_as_required(["config", "workdir"])
app.run(main.main)
"""


def test_a_full_disk_is_the_last_line_printed_and_library_info_stays_off(tmp_path):
  result = subprocess.run([sys.executable, "-c", BOOM, str(tmp_path)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("zsjax: no space left on device while writing "
                         "/data/run/checkpoints/7/state")
  assert "a library INFO line" not in result.stderr


def test_a_full_disk_reported_as_text_by_a_library_is_still_recognised():
  from zsjax import main

  wrapped = ValueError("async save failed: [Errno 28] No space left on device: '/ckpt/3'")
  assert main._no_space(RuntimeError("step failed")) is None
  assert main._no_space(wrapped).errno == 28
  chained = RuntimeError("save")
  chained.__cause__ = OSError(28, "No space left on device", "/w/metrics.jsonl")
  assert main._no_space(chained).filename == "/w/metrics.jsonl"


RECORDS = Path(__file__).parent / "data" / "records_f2332c3"


@pytest.mark.parametrize("record,name,arg", [("tiny_world_ci", "tiny_world", "ci"),
                                             ("zerosearch_tiny_grpo", "zerosearch", "tiny,grpo")])
def test_a_run_recorded_before_the_knobs_were_fields_resumes(tmp_path, record, name, arg):
  """A record lacking a field added since (workdir.LATER_FIELDS) reads it as the
  default the code used then: the same run resumes with no change noted, and
  setting such a field to another value is refused."""
  (tmp_path / "run.json").write_text((RECORDS / f"{record}.run.json").read_text())
  (tmp_path / "checkpoints" / "1").mkdir(parents=True)  # the run holds results
  old = set(json.loads((tmp_path / "run.json").read_text())["config"])
  config = load_config(name, arg)
  config.progress = False
  added = set(workdir.flatten(config)) - old
  assert added and all(workdir.later_default(k)[0] for k in added), added
  log = []
  assert workdir.check_identity(tmp_path, config, log=log.append) == [] and log == []
  assert set(json.loads((tmp_path / "run.json").read_text())["config"]) == old | added
  (tmp_path / "run.json").write_text((RECORDS / f"{record}.run.json").read_text())
  rollout = config.rl.rollout if name == "tiny_world" else config.rollout
  rollout.dtype = "bfloat16"
  key = "rl.rollout.dtype" if name == "tiny_world" else "rollout.dtype"
  with pytest.raises(workdir.RunMismatch, match=re.escape(f"config.{key}: '' -> 'bfloat16'")):
    workdir.check_identity(tmp_path, config)


def test_tiny_world_stage_keys_are_those_made_before_the_knobs_were_fields():
  """A stage cache filled before the knobs were fields still hits: every stage's
  key is the one that commit computed; a knob set away from its default moves it."""
  from zsjax import pipeline, stages

  recorded = json.loads((RECORDS / "tiny_world_stage_keys.json").read_text())
  now = {}
  for arg, recorded_as in (("ci", "ci"), ("v2", "default")):  # v2: the default of the time
    config = load_config("tiny_world", arg)
    for stage in (pipeline.WORLD, pipeline.PRETRAIN, pipeline.SIM_TUNING, pipeline.WARM_START,
                  pipeline.RL_SIMULATOR, pipeline.RL_REAL_SEARCH):
      now[f"{recorded_as}/{stage.name}"] = stages.StageCache.key(
          stage.name, stages.config_fields(config, *pipeline.COMMON_FIELDS, *stage.reads))
  assert now == recorded
  config = load_config("tiny_world", "ci")
  config.rl.sampling.method = "inverse_cdf"
  moved = stages.StageCache.key("rl_simulator", stages.config_fields(
      config, *pipeline.COMMON_FIELDS, *pipeline.RL_SIMULATOR.reads))
  assert moved != recorded["ci/rl_simulator"]


def _recorded_run(tmp_path):
  """A data file, and a workdir whose run.json records an RL run on it."""
  data_file = tmp_path / "train.jsonl"
  data_file.write_text('{"question": "Q?", "golden_answers": ["a"]}\n')
  run = tmp_path / "run"
  run.mkdir()
  config = load_config("zerosearch", "tiny")
  config.data.train_files = str(data_file)
  workdir.check_identity(run, config)
  return data_file, run, config


def test_identity_does_not_rest_on_run_json(tmp_path):
  """A data file replaced under the same path is refused (from run.json and from the
  checkpoint); with run.json gone, the checkpoint still refuses another seed and
  changed inputs; a tiny world under a checkpoint is not rebuilt for another seed."""
  import jax.numpy as jnp

  from zsjax import tinyworld
  from zsjax.checkpoint import Checkpointer

  data_file, run, config = _recorded_run(tmp_path)
  recorded = json.loads((run / "run.json").read_text())["inputs"]
  assert list(recorded) == ["data.train_files"]
  assert recorded["data.train_files"]["fingerprint"] == workdir.fingerprint(data_file)
  inputs = workdir.input_fingerprints(config)
  ck = Checkpointer(run / "checkpoints", async_save=False)
  ck.save(1, {"w": jnp.zeros(2)}, extra={"step": 1, "seed": 0, "inputs": inputs})
  ck.close()

  data_file.write_text('{"question": "Other?", "golden_answers": ["b"]}\n')  # same path
  with pytest.raises(workdir.RunMismatch, match=r"inputs were other files \(recorded in .*"
                                                r"run.json\):\n  config.data.train_files="
                                                r".*its contents changed since the run started"):
    workdir.check_identity(run, config)
  (run / "run.json").unlink()  # what a user might do; the checkpoint still knows
  log = []
  workdir.check_identity(run, config, log=log.append)
  assert "no run.json" in log[0] and "checked against its checkpoint" in log[0]
  ck = Checkpointer(run / "checkpoints")
  with pytest.raises(workdir.RunMismatch, match=r"\(checkpoint step 1\):\n  config.data."
                                                r"train_files="):
    ck.refuse_changed_inputs(run, workdir.input_fingerprints(config))
  ck = Checkpointer(run / "checkpoints")
  with pytest.raises(ValueError, match=r"holds a 0 run \(checkpoint step 1\); config.seed=1"):
    ck.refuse_other_run(run, "seed", 1, "config.seed")
  data_file.write_text('{"question": "Q?", "golden_answers": ["a"]}\n')  # put back: accepted
  ck = Checkpointer(run / "checkpoints")
  ck.refuse_changed_inputs(run, workdir.input_fingerprints(config))
  ck.close()

  world = run / "world"
  world.mkdir()
  (world / "world.json").write_text(json.dumps({"seed": 0, "size": {}}))
  with pytest.raises(ValueError, match=r"holds the tiny world of seed 0 .* asks for seed 1.*"
                                       r"--config.seed=0"):
    tinyworld.fill_missing_data(_seeded(1), run, "data", "train_files", lambda w: w["train"])
  assert json.loads((world / "world.json").read_text())["seed"] == 0  # nothing rebuilt


def test_without_run_json_the_checkpoints_record_is_checked_in_full(tmp_path):
  """RL and SFT save run.json's record in each checkpoint; with run.json gone, a
  setting that defines the run (a learning rate), a data file at another path with
  other contents, or another seed is refused from it. A file moved with the same
  contents and an allowed knob pass, and run.json is written again."""
  import jax.numpy as jnp

  from zsjax.checkpoint import Checkpointer

  data_file, run, config = _recorded_run(tmp_path)
  record = workdir.identity_record(run)
  assert record["job"] == "rl" and record["config"]["rl.learning_rate"] == config.rl.learning_rate
  ck = Checkpointer(run / "checkpoints", async_save=False)
  ck.save(3, {"w": jnp.zeros(2)}, extra={"step": 3, "seed": 0, "record": record,
                                         "inputs": workdir.input_fingerprints(config)})
  ck.close()
  (run / "run.json").unlink()

  def changed(**fields):
    c = load_config("zerosearch", "tiny")
    c.data.train_files = str(data_file)
    for dotted, value in fields.items():
      section, leaf = dotted.split("__")
      c[section][leaf] = value
    return c

  with pytest.raises(workdir.RunMismatch, match=r"\(checkpoint step 3\).*\n  config.rl."
                                                r"learning_rate: 0.0001 -> 0.1"):
    workdir.check_identity(run, changed(rl__learning_rate=0.1))
  other = tmp_path / "other.jsonl"
  other.write_text('{"question": "Other?", "golden_answers": ["b"]}\n')
  with pytest.raises(workdir.RunMismatch, match=r"config.data.train_files: .*train.jsonl"):
    workdir.check_identity(run, changed(data__train_files=str(other)))
  with pytest.raises(workdir.RunMismatch, match=r"config.seed: 0 -> 4"):
    c = changed()
    c.seed = 4
    workdir.check_identity(run, c)
  assert not (run / "run.json").exists()  # nothing recorded by a refused run
  moved = tmp_path / "moved" / "train.jsonl"  # (a file's fingerprint includes its name)
  moved.parent.mkdir()
  moved.write_bytes(data_file.read_bytes())
  log = []
  notes = workdir.check_identity(run, changed(data__train_files=str(moved),
                                              rl__micro_batch_size=4), log=log.append)
  assert "checked against the record in its checkpoint step 3" in log[0]
  assert any("train_files" in n for n in notes) and any("micro_batch_size" in n for n in notes)
  assert json.loads((run / "run.json").read_text())["config"]["data.train_files"] == str(moved)


def _seeded(seed):
  config = load_config("zerosearch", "tiny")
  config.seed = seed
  return config


def test_a_fingerprint_sees_contents_not_paths(tmp_path):
  a = tmp_path / "a"
  a.mkdir()
  (a / "tokenizer.json").write_text("{}")
  (a / "config.json").write_text('{"x": 1}')
  before = workdir.fingerprint(a)
  assert workdir.fingerprint(a) == before  # stable
  (a / "config.json").write_text('{"x": 2}')  # same size, other bytes
  assert workdir.fingerprint(a) != before
  (a / "config.json").write_text('{"x": 1}')
  assert workdir.fingerprint(a) == before
  (a / "extra.txt").write_text("")
  assert workdir.fingerprint(a) != before  # a file more
