"""A workdir belongs to one run: a lock while a job runs, and the run's identity.

* ``lock(workdir)``: an exclusive ``fcntl.flock`` on ``WORKDIR/.zsjax.lock`` held
  for the whole job. A second job started in the same workdir fails at once,
  naming the holder (pid, host, start time, command). The kernel drops the lock
  when its process ends, killed or not, so a crash never leaves a stale lock.
* ``check_identity(workdir, config)``: the first run of a resumable job writes
  ``WORKDIR/run.json`` (its config, flattened to dotted keys). A later run in the
  same workdir resumes it, so every field that defines the run (seed, model,
  data, tokenizer, algorithm, ...) must be unchanged: a change is refused with
  the fields listed and the fix (a new workdir). Only the fields of
  ``MAY_CHANGE`` (the number of steps, logging, checkpoint cadence, mesh, the
  engine's address and limits) may change, and each change is printed. A field
  of ``LATER_FIELDS`` missing from the record (a run recorded before the field
  was written into the config files) counts as the value the code then used.
* Identity does not rest on ``run.json`` alone. Its ``inputs`` hold a content
  fingerprint (``fingerprint``: sizes and SHA-256 digests) of every local file
  or directory the config names (data, tokenizer, checkpoints, corpus), so a
  file replaced under the same path is refused too; the training loops save
  the seed, the schedules' span and the same fingerprints with each checkpoint
  and check them before resuming, so a workdir whose ``run.json`` is missing or
  was deleted is still checked (``refuse_changed_inputs``).

``zsjax.main`` does the lock and ``check_identity`` before a job builds anything.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import hashlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterator

LOCK_FILE = ".zsjax.lock"
IDENTITY_FILE = "run.json"

# Jobs that resume from their workdir, and so have an identity to keep.
RESUMABLE = ("rl", "sft", "sim_tuning", "tiny_world")

# Dotted config keys (fnmatch patterns) that may differ between a run and its
# resumption: they change how long it runs, how it logs, checkpoints or is laid out
# on devices, or where the engine is reached; not what it computes.
_EVERY_JOB = ("progress", "distributed.*", "mesh.*", "sharding", "sharding_rules",
              "checkpoint.every", "checkpoint.max_to_keep", "checkpoint.async_save",
              "engine.url", "engine.timeout_s", "engine.max_retries", "engine.backoff_s",
              "engine.concurrency",
              "engine.max_failed_share", "engine.max_failed_steps", "rollout.attention_view",
              "*logits_chunk",  # memory only: the same log-probs in pieces
              "*attention_impl")  # the same attention on another kernel
MAY_CHANGE = {
    # the steps may change, their schedules' span may not (HORIZONS); memory-only knobs
    # change how a step is cut into pieces, not what it computes
    "rl": _EVERY_JOB + ("rl.total_steps", "rl.schedule_steps", "rl.sample_every",
                        "rl.sample_rows", "rl.micro_batch_size", "rl.score_batch_size",
                        "rl.offload_reference", "rl.offload_optimizer", "rl.pack_tokens",
                        "rl.old_logp_pass",  # the same gradient without a pass
                        # memory: the same trajectories' distribution (another random
                        # stream with more waves; a shared prefill is the same cache)
                        "rollout.waves", "rollout.share_prompt",
                        "checkpoint.export_hf"),
    "sft": _EVERY_JOB + ("sft.total_steps", "sft.schedule_steps", "sft.eval_every",
                         "checkpoint.export_hf"),
    "sim_tuning": _EVERY_JOB,
    # a pipeline's stages are made once: only what is recomputed on every run may change
    "tiny_world": _EVERY_JOB + ("stage_cache", "eval_batch_size", "eval_sample_size",
                                "eval_prompt_width"),
}

# Jobs whose schedules (learning rate, noise curriculum) span a number of steps: the
# config section holding total_steps and schedule_steps (0 = total_steps). A resume
# keeps the recorded span, so a longer or shorter run is on the same schedules.
HORIZONS = {"rl": "rl", "sft": "sft"}


# Fields written into the config files after runs were recorded without them, with
# the value the code used while they were absent. Matched on the end of a dotted key,
# so the tiny world's job sections are covered too ("rl.rollout.dtype",
# "sim_tuning.sim_tuning.sampling.method"). A record without one reads as that value,
# and a stage-cache key leaves one out while it holds that value
# (zsjax.stages.config_fields), so older workdirs and caches resume. Add a field here
# when adding it to a config whose runs resume.
LATER_FIELDS = {
    "rollout.dtype": "",
    "rollout.attention_view": 512,
    "rl.scoring_dtype": "",
    "rl.reference_dtype": "",
    "rl.offload_reference": False,
    "rl.offload_optimizer": False,
    "rl.pack_tokens": 0,
    "rl.old_logp_pass": True,
    "sampling.method": "gumbel",
    "simulator.sampling_method": "gumbel",
    "simulator.top_p": 1.0,
    "data.prompt_style": "zsjax",
    "sim_tuning.policy_chat_template": False,
    "sim_tuning.judge_chat_template": False,
    "rollout.retokenize": False,
    "rollout.waves": 1,
    "rollout.share_prompt": False,
    "rl.schedule_steps": 0,
    "demo_balance_relations": False,
    "demo_shuffle_documents": False,
    "demo_think": "",
    "policy.logits_chunk": 0,
    "model.logits_chunk": 0,
    "policy.attention_impl": "auto",
    "simulator.attention_impl": "auto",
    "model.attention_impl": "auto",
    "sft.schedule_steps": 0,
    "sft.stop_nll": 0.0,  # the early stop (zsjax.train_sft), off before it existed
    "sft.cooldown_steps": 0,
    "world.version": 1,  # the tiny world's phrasing (zsjax.tinyworld.WORLD_VERSIONS)
    "sft.stop_group": "",  # the early stop's check by group (tiny world v4)
    "sft.stop_passes": 1,
    "sft.focus": 0.0,  # drawing more of the check's worst group (zsjax.train_sft)
    # the reading stage (zsjax.pipeline.READING), off before it existed
    "reading_drills": 0,
    "reading_documents": 1,
    "reading_nll_max": 0.25,
    "reading_steps": 500,
    "reading_batch_size": 16,
    "reading_max_length": 128,
    "reading_learning_rate": 8e-3,
    "distributed.auto": False,
    "distributed.local_device_ids": [],
}


# Config fields (the last part of a dotted key) that name a run's inputs: their
# contents are fingerprinted, so a file replaced under the same path is noticed.
INPUT_FIELDS = ("train_files", "tokenizer", "checkpoint", "judge_checkpoint", "corpus", "data",
                "orbax_dir")
_WHOLE = 64 << 20  # files up to this size are hashed whole; larger: size, head and tail
_PART = 4 << 20
_MAX_FILES = 2000  # a directory with more files is fingerprinted by its names and sizes


def _digest_file(path: Path, digest) -> None:
  size = path.stat().st_size
  digest.update(f"{size}\0".encode())
  with open(path, "rb") as f:
    if size <= _WHOLE:
      for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
    else:
      digest.update(f.read(_PART))
      f.seek(size - _PART)
      digest.update(f.read(_PART))


def fingerprint(path: str | os.PathLike) -> str:
  """``"<bytes>:<sha256 prefix>"`` of a file or a directory's files (names, sizes
  and contents; a file over 64 MiB by its size, first and last 4 MiB)."""
  path = Path(path)
  digest, total = hashlib.sha256(), 0
  files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
  for file in files:
    size = file.stat().st_size
    total += size
    digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode() + b"\0")
    if len(files) > _MAX_FILES:
      digest.update(f"{size}\0".encode())
    else:
      _digest_file(file, digest)
  return f"{total}:{digest.hexdigest()[:16]}"


def input_fingerprints(config) -> dict[str, dict]:
  """``{dotted key: {"path": value, "fingerprint": ...}}`` for each config field of
  ``INPUT_FIELDS`` naming existing local paths (a comma-separated list of files
  is fingerprinted together)."""
  out = {}
  for key, value in flatten(config).items():
    if key.rsplit(".", 1)[-1] not in INPUT_FIELDS or not isinstance(value, str) or not value:
      continue
    whole = Path(value)
    parts = [whole] if whole.exists() else [Path(v) for v in value.split(",") if v]
    if not parts or not all(p.exists() for p in parts):
      continue
    try:
      out[key] = {"path": value, "fingerprint": ",".join(fingerprint(p) for p in parts)}
    except OSError as e:  # unreadable here (permissions, removed meanwhile): not compared
      out[key] = {"path": value, "fingerprint": f"unreadable ({e.strerror or e})"}
  return out


def changed_inputs(recorded: dict, now: dict) -> list[str]:
  """Lines naming each input whose path is the same but whose contents differ."""
  lines = []
  for key, then in sorted((recorded or {}).items()):
    current = now.get(key)
    readable = current and not any(x["fingerprint"].startswith("unreadable")
                                   for x in (current, then))
    if readable and current["path"] == then["path"] and \
        current["fingerprint"] != then["fingerprint"]:
      lines.append(f"  config.{key}={then['path']!r}: its contents changed since the run "
                   f"started ({then['fingerprint']} -> {current['fingerprint']})")
  return lines


def refuse_changed_inputs(workdir, recorded: dict | None, now: dict, where: str) -> None:
  """Raises ``RunMismatch`` when an input recorded (``where``: a checkpoint, run.json)
  has other contents now."""
  lines = changed_inputs(recorded or {}, now)
  if lines:
    raise RunMismatch(
        f"{workdir} holds a run whose inputs were other files ({where}):\n" + "\n".join(lines)
        + "\nResuming would train on other data, tokenizer or weights than its checkpoints "
        "were. Put the original files back, or use a new --workdir for a new run.")


def later_default(key: str) -> tuple[bool, Any]:
  """``(True, value)`` when dotted ``key`` is (inside) a ``LATER_FIELDS`` field."""
  for field, default in LATER_FIELDS.items():
    if key == field or key.endswith("." + field):
      return True, default
  return False, None


def without_later_defaults(tree: Any, prefix: str) -> Any:
  """A plain config section (at dotted ``prefix``) without the ``LATER_FIELDS`` that
  hold their old default: what a record made before those fields looked like."""
  if not isinstance(tree, dict):
    return tree
  out = {}
  for key, value in tree.items():
    name = f"{prefix}.{key}" if prefix else key
    later, default = later_default(name)
    plain = json.loads(json.dumps(value, default=str))
    if later and plain == default:
      continue
    out[key] = without_later_defaults(value, name)
  return out


class WorkdirBusy(RuntimeError):
  """Another run holds the workdir."""


class RunMismatch(ValueError):
  """A run was started in a workdir that holds a different run."""


@contextlib.contextmanager
def lock(workdir: str | os.PathLike) -> Iterator[Path]:
  """Holds the workdir exclusively for the ``with`` body: a lock on the directory
  itself (which deleting a file cannot drop) and on ``WORKDIR/.zsjax.lock``, which
  names the holder."""
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / LOCK_FILE
  directory = os.open(workdir, os.O_RDONLY)
  handle = None
  try:
    handle = open(path, "a+", encoding="utf-8")
    try:
      fcntl.flock(directory, fcntl.LOCK_EX | fcntl.LOCK_NB)
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      handle.seek(0)
      holder = handle.read().strip() or ("a process whose lock file is gone: it was deleted "
                                         "while the run held it")
      raise WorkdirBusy(
          f"{workdir} is in use by another zsjax run ({holder}). Wait for it to finish, or "
          "give this run another --workdir.") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}, started "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(sys.argv)}")
    handle.flush()
    yield path
  finally:
    if handle is not None:
      handle.close()  # closing drops the locks
    os.close(directory)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """A config (ConfigDict or dict) as ``{"a.b.c": value}``; tuples become lists."""
  if hasattr(tree, "to_dict"):
    tree = tree.to_dict()
  out: dict[str, Any] = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if hasattr(value, "to_dict") or isinstance(value, dict):
      out.update(flatten(value, name + "."))
    else:
      out[name] = json.loads(json.dumps(value, default=str))
  return out


def _may_change(job: str, key: str) -> bool:
  return any(fnmatch.fnmatchcase(key, pattern) for pattern in MAY_CHANGE.get(job, _EVERY_JOB))


def holds_checkpoint(workdir: Path) -> bool:
  """Whether ``WORKDIR/checkpoints`` holds a complete step (a digit-named directory;
  a save torn by a crash leaves only a temporary one)."""
  checkpoints = Path(workdir) / "checkpoints"
  return checkpoints.is_dir() and any(p.is_dir() and p.name.isdigit()
                                      for p in checkpoints.iterdir())


def holds_results(workdir: Path) -> bool:
  """Whether a run left something a rerun resumes from: a complete checkpoint (a
  step directory) or stage outputs. Metrics alone do not count: without a
  checkpoint a rerun starts from step 0 and drops them, so a run that failed
  before its first save (a NaN at step 1, out of memory) binds no setting."""
  return (holds_checkpoint(workdir)
          or any((workdir / name).exists() for name in ("stage_seconds.json", "results.json",
                                                       "trajectories.jsonl")))


def _check_horizon(workdir: Path, section: str, before: dict, now: dict) -> None:
  def span(flat):
    return flat.get(f"{section}.schedule_steps", 0) or flat.get(f"{section}.total_steps")
  if span(before) != span(now):
    from zsjax.checkpoint import horizon_message
    raise RunMismatch(horizon_message(workdir, span(before), span(now),
                                      now.get(f"{section}.total_steps"), f"config.{section}",
                                      f"recorded in {IDENTITY_FILE}"))


def checkpoint_record(workdir: Path) -> tuple[dict | None, str]:
  """The run record (``{"job", "config", "inputs"}``, ``identity_record``) the newest
  checkpoint under ``WORKDIR/checkpoints`` carries in its JSON part, and where it
  was read; ``(None, "")`` when none carries one. Read as the JSON file Orbax wrote
  (``<step>/extra/metadata``), newest readable step first: no Orbax manager, so no
  collective, and one process may call it alone (``zsjax.main``)."""
  checkpoints = Path(workdir) / "checkpoints"
  if not checkpoints.is_dir():
    return None, ""
  steps = sorted((int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()), reverse=True)
  for step in steps:
    try:
      saved = json.loads((checkpoints / str(step) / "extra" / "metadata").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
      continue  # a damaged or older-layout step: the resume names it
    record = saved.get("record") if isinstance(saved, dict) else None
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
      return None, ""  # the newest readable step predates the record
    return record, f"checkpoint step {saved.get('step', step)}"
  return None, ""


def identity_record(workdir: str | os.PathLike) -> dict | None:
  """``WORKDIR/run.json`` as ``check_identity`` wrote it for this run (job, config,
  inputs), or None: RL and SFT save it in each checkpoint, the run's second record."""
  path = Path(workdir) / IDENTITY_FILE
  try:
    record = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError):
    return None
  return {k: record[k] for k in ("job", "config", "inputs") if k in record}


def compare_runs(workdir: Path, job: str, before: dict, now: dict, recorded_inputs: dict | None,
                 inputs: dict, where: str, log=print) -> list[str]:
  """Checks the run about to resume (flat config ``now``, its ``inputs``) against a
  record (``before``, ``recorded_inputs``, read from ``where``): raises
  ``RunMismatch`` listing the fields that define the run and differ (an input read
  from another path with the same contents is not a difference), the schedules' span
  or an input's changed contents; returns the allowed changes."""
  before = dict(before)
  for key in set(now) - set(before):  # recorded before the field was written
    later, default = later_default(key)
    if later:
      before[key] = default
  keys = sorted(set(before) | set(now))
  changed = [k for k in keys if before.get(k, "<absent>") != now.get(k, "<absent>")]
  recorded_inputs = recorded_inputs or {}

  def same_contents(key):  # an input moved, not replaced
    then, current = recorded_inputs.get(key), inputs.get(key)
    return bool(then and current and then["fingerprint"] == current["fingerprint"]
                and not then["fingerprint"].startswith("unreadable"))

  refused = [k for k in changed if not _may_change(job, k) and not same_contents(k)]
  if refused:
    lines = "\n".join(f"  config.{k}: {before.get(k, '<absent>')!r} -> "
                      f"{now.get(k, '<absent>')!r}" for k in refused)
    raise RunMismatch(
        f"{workdir} holds a {job!r} run started with other settings ({where}); resuming it "
        f"with these would mix two runs:\n{lines}\nUse a new --workdir for a new run, or "
        f"rerun with the recorded values.")
  if job in HORIZONS and changed:
    _check_horizon(workdir, HORIZONS[job], before, now)
  refuse_changed_inputs(workdir, recorded_inputs, inputs, where)
  return [f"config.{k}: {before.get(k, '<absent>')!r} -> {now.get(k, '<absent>')!r}"
          for k in changed]


def check_identity(workdir: str | os.PathLike, config, log=print) -> list[str]:
  """Records the run in ``WORKDIR/run.json``, or checks this run against the one
  recorded: raises ``RunMismatch`` listing the fields that define the run and
  differ; returns (and ``log``s) the allowed changes, then records the new values.
  Without ``run.json`` (deleted, or a workdir from before it) the record each
  checkpoint carries is checked the same way (``checkpoint_record``)."""
  job = config.job
  if job not in RESUMABLE:
    return []
  workdir = Path(workdir)
  path = workdir / IDENTITY_FILE
  now = flatten(config)
  inputs = input_fingerprints(config)
  notes, started = [], time.strftime("%Y-%m-%d %H:%M:%S")
  if path.exists():
    try:
      recorded = json.loads(path.read_text())
      before = recorded["config"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise RunMismatch(f"{path} is unreadable ({e}); it records which run this workdir "
                        "holds. Use a new --workdir. (Moving it aside resumes the run; "
                        "its checkpoint's record is then checked instead.)") from None
    if holds_results(workdir):
      notes = compare_runs(workdir, recorded.get("job", job), before, now,
                           recorded.get("inputs"), inputs, f"recorded in {path}", log)
    else:
      changed = [k for k in sorted(set(before) | set(now))
                 if before.get(k) != now.get(k) and not _may_change(job, k)]
      if changed:
        log(f"{workdir}: the run recorded in {IDENTITY_FILE} left no checkpoint or results "
            f"(it stopped during set-up); recording this one instead")
    started = recorded.get("started", started)
  elif holds_results(workdir):
    saved, where = checkpoint_record(workdir)
    if saved is not None:
      log(f"{workdir}: no {IDENTITY_FILE} (it was removed, or the workdir predates it); the "
          f"run is checked against the record in its {where}")
      notes = compare_runs(workdir, saved.get("job", job), saved["config"], now,
                           saved.get("inputs"), inputs, where, log)
    else:
      log(f"{workdir}: no {IDENTITY_FILE} (the workdir predates it, or it was removed); the "
          "run is checked against its checkpoint (seed, schedules, inputs) instead")
  for note in notes:
    log(f"{workdir}: resuming with a changed setting (allowed): {note}")
  partial = path.with_name(path.name + ".partial")
  partial.write_text(json.dumps({"job": job, "started": started, "config": now,
                                 "inputs": inputs}, indent=2, sort_keys=True) + "\n")
  partial.replace(path)
  return notes


__all__ = ["LOCK_FILE", "IDENTITY_FILE", "RESUMABLE", "MAY_CHANGE", "LATER_FIELDS",
           "WorkdirBusy", "RunMismatch", "lock", "flatten", "holds_checkpoint", "holds_results", "check_identity",
           "later_default", "without_later_defaults", "INPUT_FIELDS", "fingerprint",
           "input_fingerprints", "changed_inputs", "refuse_changed_inputs", "checkpoint_record",
           "compare_runs", "identity_record"]
