"""Checks that a change of code shape left behaviour alone.

Runs a fixed set of jobs into OUT and records what they produced; a second call
with ``--compare=OTHER`` says whether two such records are the same:

  # at the commit before the change (a git worktree), then after it, same machine
  (cd /tmp/base && python experiments/check_unchanged.py --out=/tmp/before)
  python experiments/check_unchanged.py --out=/tmp/after --compare=/tmp/before

The jobs: ``configs/tiny_world.py:ci`` (every stage of the pipeline) and
``configs/zerosearch.py:tiny`` with REINFORCE, GRPO and PPO. Compared:
``predictions.jsonl`` and ``samples.jsonl`` byte for byte, and every
``metrics.jsonl`` record with its wall-clock keys (``time``, ``time/*``,
``perf/*``) dropped, value for value. About 5 minutes on 2 cores. The last line printed is a
JSON object; the exit code is 1 when the records differ.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

JOBS = {
    "tiny_world_ci": "configs/tiny_world.py:ci",
    "zerosearch_reinforce": "configs/zerosearch.py:tiny,reinforce",
    "zerosearch_grpo": "configs/zerosearch.py:tiny,grpo",
    "zerosearch_ppo": "configs/zerosearch.py:tiny,ppo",
}
# Keys whose values are wall-clock measurements, not behaviour.
CLOCK_PREFIXES = ("time/", "perf/")
BYTE_FILES = ("predictions.jsonl", "samples.jsonl")


def _metrics(path: Path) -> list[dict]:
  records = []
  for line in path.read_text().splitlines():
    if line.strip():
      record = json.loads(line)
      records.append({k: v for k, v in record.items()
                      if k != "time" and not k.startswith(CLOCK_PREFIXES)})
  return records


def record(workdir: Path) -> dict:
  """What one job's workdir holds that behaviour decides: ``{relative path: value}``."""
  out = {}
  for path in sorted(workdir.rglob("*")):
    if not path.is_file():
      continue
    rel = str(path.relative_to(workdir))
    if path.name == "metrics.jsonl":
      out[rel] = _metrics(path)
    elif path.name in BYTE_FILES:
      out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
  return out


def run_jobs(out: Path, jobs: dict[str, str]) -> dict:
  out.mkdir(parents=True, exist_ok=True)
  records = {}
  env = dict(os.environ, PYTHONPATH=str(Path.cwd()))
  for name, config in jobs.items():
    workdir = out / name
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "zsjax.main", f"--config={config}",
                    f"--workdir={workdir}", "--config.progress=False"], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)
    records[name] = record(workdir)
  (out / "record.json").write_text(json.dumps(records, indent=1, sort_keys=True) + "\n")
  return records


def differences(a: dict, b: dict) -> list[str]:
  found = []
  for job in sorted(set(a) | set(b)):
    files_a, files_b = a.get(job, {}), b.get(job, {})
    for rel in sorted(set(files_a) | set(files_b)):
      if rel not in files_a or rel not in files_b:
        found.append(f"{job}/{rel}: only in {'the first' if rel in files_a else 'the second'}")
      elif files_a[rel] != files_b[rel]:
        found.append(f"{job}/{rel}: differs")
  return found


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, help="directory for the jobs' workdirs")
  parser.add_argument("--compare", default="", help="another run's OUT to compare with")
  parser.add_argument("--jobs", default=",".join(JOBS), help="comma-separated subset of jobs")
  args = parser.parse_args(argv)
  jobs = {name: JOBS[name] for name in args.jobs.split(",")}
  records = run_jobs(Path(args.out), jobs)
  summary = {"out": args.out, "jobs": sorted(jobs),
             "files": sum(len(files) for files in records.values())}
  if args.compare:
    other = json.loads((Path(args.compare) / "record.json").read_text())
    other = {name: other[name] for name in jobs if name in other}
    found = differences(other, records)
    for line in found:
      print(line)
    summary.update(compared_with=args.compare, unchanged=not found, differences=len(found))
  print(json.dumps(summary))
  return 1 if args.compare and not summary["unchanged"] else 0


if __name__ == "__main__":
  sys.exit(main())
