"""Run a hyperparameter sweep declared in a config file, and collect its results.

A config file declares sweeps next to ``get_config``:

  def sweep(add):                      # --sweep=default
    for seed in (0, 1, 2):
      for lr in (1e-4, 3e-4):
        add(seed=seed, **{"rl.rl.learning_rate": lr})

  def sweep_algorithms(add):           # --sweep=algorithms
    ...

``add(**overrides)`` adds one point: ``--config.<key>=<value>`` flags for
``python -m zsjax.main``. ``--set=KEY=VALUE`` (repeatable) adds a flag to every
point without naming points by it (e.g. a shared ``stage_cache``). Random search
is a sweep function that draws values from a seeded generator. Each point gets its own workdir
``ROOT/<key=value+...>``; a point whose ``sweep_point.json`` exists is finished
and skipped, so a sweep resumes. ``--print`` prints the commands (one per line,
for a cluster scheduler) instead of running them.

Collection reads every finished point's final metrics (the job's JSON outputs,
flattened to dotted keys), groups points that differ only in ``seed``, and
writes ``ROOT/sweep.csv`` (one row per point), ``ROOT/sweep.md`` (mean ± std
over seeds per group) and ``ROOT/plots/<metric>.png`` -- for ``--sweep=NAME``
other than default: ``ROOT/sweep_NAME.csv``, ``ROOT/sweep_NAME.md`` and
``ROOT/plots/NAME/``, so several sweeps can share a root and their common points.
``--hide=KEY,...`` leaves keys out of the group names in the table.

  python experiments/sweep.py --config=configs/tiny_world.py:v2 --sweep=algorithms \\
      --root=/tmp/sweep_alg --metrics=methods.rl_simulator.all.em,total_seconds
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import importlib.util
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# Files a job leaves in its workdir with its final numbers, in order of preference.
RESULT_FILES = ("results.json", "rl_summary.json", "sft_summary.json", "sim_tuning.json",
                "model_check.json")


def config_module(path: str | Path):
  """A ``configs/<name>.py`` file imported as a module (``get_config``, sweeps)."""
  path = Path(path)
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_sweep(config_path: str, name: str = "default") -> list[dict]:
  """The points (override dicts) of sweep ``name`` in ``config_path``."""
  path = Path(config_path.split(":")[0])
  module = config_module(path)
  fn_name = "sweep" if name == "default" else f"sweep_{name}"
  fn = getattr(module, fn_name, None)
  if fn is None:
    found = sorted(n for n in dir(module) if n == "sweep" or n.startswith("sweep_"))
    raise SystemExit(f"{path} has no {fn_name}(add); it declares {found or 'no sweeps'}.")
  points: list[dict] = []
  fn(lambda **overrides: points.append(dict(overrides)))
  if not points:
    raise SystemExit(f"{path}:{fn_name} added no points.")
  return points


def point_name(overrides: dict) -> str:
  return ",".join(f"{k}={v}" for k, v in sorted(overrides.items())) or "base"


def point_dir(overrides: dict) -> str:
  """The point's workdir name: no commas (config fields such as data files split
  on them)."""
  return point_name(overrides).replace(",", "+")


def command(config: str, workdir: Path, overrides: dict, common: dict | None = None) -> list[str]:
  flags = [f"--config.{k}={v}" for k, v in sorted({**(common or {}), **overrides}.items())]
  return [sys.executable, "-m", "zsjax.main", f"--config={config}", f"--workdir={workdir}",
          *flags]


def flatten(tree, prefix: str = "") -> dict[str, float]:
  out = {}
  if isinstance(tree, dict):
    for k, v in tree.items():
      out.update(flatten(v, f"{prefix}{k}."))
  elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
    out[prefix[:-1]] = float(tree)
  return out


def final_metrics(workdir: Path) -> dict[str, float]:
  for name in RESULT_FILES:
    path = workdir / name
    if path.exists():
      return flatten(json.loads(path.read_text()))
  raise FileNotFoundError(f"{workdir} has none of {RESULT_FILES}.")


def run_points(config: str, root: Path, points: list[dict], *, dry_run: bool = False,
               env=None, common: dict | None = None) -> list[dict]:
  """Runs (or prints) every unfinished point; returns the finished points' records."""
  records = []
  for overrides in points:
    workdir = root / point_dir(overrides)
    marker = workdir / "sweep_point.json"
    cmd = command(config, workdir, overrides, common)
    if dry_run:
      print(" ".join(shlex.quote(c) for c in cmd))
      continue
    if not marker.exists():
      print(f"[sweep] running {point_name(overrides)}", flush=True)
      start = time.perf_counter()
      result = subprocess.run(cmd, env=env, capture_output=True, text=True)
      if result.returncode != 0:
        (workdir).mkdir(parents=True, exist_ok=True)
        (workdir / "sweep_error.log").write_text(result.stdout + result.stderr)
        print(f"[sweep] FAILED {point_name(overrides)} (exit {result.returncode}); see "
              f"{workdir / 'sweep_error.log'}", flush=True)
        continue
      marker.write_text(json.dumps({"overrides": overrides,
                                    "wall_seconds": time.perf_counter() - start,
                                    "metrics": final_metrics(workdir)}, indent=2) + "\n")
    else:
      print(f"[sweep] finished before: {point_name(overrides)}", flush=True)
    records.append(json.loads(marker.read_text()))
  return records


def select(metrics: dict[str, float], patterns: list[str]) -> list[str]:
  keys = [k for k in metrics if any(fnmatch.fnmatch(k, p) for p in patterns)]
  return sorted(keys, key=lambda k: min(i for i, p in enumerate(patterns)
                                        if fnmatch.fnmatch(k, p)))


def collect(root: Path, records: list[dict], patterns: list[str], sweep: str = "default",
            hide: tuple[str, ...] = ()) -> str:
  """Writes ROOT/sweep[_NAME].csv, .md and plots; returns the markdown table."""
  if not records:
    raise SystemExit(f"no finished points under {root}.")
  keys = select(records[0]["metrics"], patterns)
  if not keys:
    raise SystemExit(f"--metrics {patterns} match none of {sorted(records[0]['metrics'])[:20]}")
  settings = sorted({k for r in records for k in r["overrides"]})
  stem = "sweep" if sweep == "default" else f"sweep_{sweep}"
  with open(root / f"{stem}.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow([*settings, "wall_seconds", *keys])
    for r in records:
      writer.writerow([r["overrides"].get(s, "") for s in settings] + [f"{r['wall_seconds']:.1f}"]
                      + [r["metrics"].get(k, float("nan")) for k in keys])
  groups: dict[str, list[dict]] = {}
  for r in records:
    group = {k: v for k, v in r["overrides"].items() if k != "seed" and k not in hide}
    groups.setdefault(point_name(group) if group else "default", []).append(r)
  lines = ["| setting | seeds | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
  summary = {}
  for name, members in groups.items():
    cells = []
    for k in keys:
      values = np.asarray([m["metrics"].get(k, np.nan) for m in members], float)
      mean, std = float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
      summary.setdefault(k, []).append((name, mean, std))
      cells.append(f"{mean:.4g} ± {std:.2g}")
    lines.append(f"| {name} | {len(members)} | " + " | ".join(cells) + " |")
  markdown = "\n".join(lines) + "\n"
  (root / f"{stem}.md").write_text(markdown)
  _plots(root / "plots" if sweep == "default" else root / "plots" / sweep, summary)
  return markdown


def _plots(directory: Path, summary: dict) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  directory.mkdir(parents=True, exist_ok=True)
  for key, rows in summary.items():
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(rows)), 3.2))
    ax.bar(range(len(rows)), [m for _, m, _ in rows], yerr=[s for _, _, s in rows], capsize=4)
    ax.set_xticks(range(len(rows)), [n for n, _, _ in rows], rotation=20, ha="right", fontsize=7)
    ax.set_title(key, fontsize=9)
    fig.tight_layout()
    fig.savefig(directory / f"{key.replace('/', '_')}.png", dpi=100)
    plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True, help="configs/<name>.py[:arg]")
  parser.add_argument("--sweep", default="default", help="sweep function: default or NAME")
  parser.add_argument("--root", required=True, help="directory holding one workdir per point")
  parser.add_argument("--metrics", default="*", help="comma-separated key patterns to collect")
  parser.add_argument("--set", dest="common", action="append", default=[], metavar="KEY=VALUE",
                      help="a --config.KEY=VALUE flag for every point, not in its name")
  parser.add_argument("--hide", default="", help="comma-separated keys left out of group names")
  parser.add_argument("--print", dest="dry_run", action="store_true",
                      help="print the commands instead of running them")
  args = parser.parse_args(argv)
  points = load_sweep(args.config, args.sweep)
  common = {}
  for item in args.common:
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise SystemExit(f"--set={item!r} is not KEY=VALUE; e.g. --set=stage_cache=/tmp/stages.")
    common[key] = value
  root = Path(args.root)
  root.mkdir(parents=True, exist_ok=True)
  records = run_points(args.config, root, points, dry_run=args.dry_run, common=common)
  if args.dry_run:
    return None
  table = collect(root, records, [p for p in args.metrics.split(",") if p], args.sweep,
                  tuple(k for k in args.hide.split(",") if k))
  print(table)
  failed = len(points) - len(records)
  print(json.dumps({"points": len(points), "finished": len(records), "failed": failed,
                    "root": str(root)}))
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
