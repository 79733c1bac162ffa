"""The tiny world over seeds: run the main job per seed, then report over seeds.

  python experiments/tiny_world_seeds.py --root=/tmp/tw --seeds=0,1,2 --run
  python experiments/tiny_world_seeds.py --root=/tmp/tw --seeds=0 --run \\
      --name=seed_{seed}_one_core --prefix="taskset -c 0" \\
      --cache=/tmp/tw/cache_one_core                  # every stage again, other rounding
  python experiments/tiny_world_seeds.py --root=/tmp/tw --seeds=0,1,2,3,4 --run --jobs=2 \\
      --name=seed_{seed}_one_core --prefix="taskset -c {slot}" \\
      --cache=/tmp/tw/cache_one_core                  # two at a time, one per core
  python experiments/tiny_world_seeds.py --root=/tmp/tw --seeds=0,1,2 --out=DIR
  (--arg=v2: the config's arg, configs/tiny_world.py:v2)

``--run`` runs each missing ``ROOT/<name>`` (``--name``, default ``seed_{seed}``)
with ``python -m zsjax.main --config=configs/tiny_world.py``, the stage cache
``ROOT/cache`` (a finished stage is reused), and any ``--set=KEY=VALUE`` flags.
The report (``--out``, default ``ROOT``) reads every finished run of ``--seeds``
in each rounding of ``--roundings`` (default: ``seed_<seed>``, the job as run,
and ``seed_<seed>_one_core``) and writes:

* ``report.md``: a row per run (warm start, baselines, RL against the simulator
  and BM25, the paired gain ± one standard error over the test questions, two-hop
  EM and searches, the warm start's steps, minutes); per rounding the mean ± std
  over seeds of every method's EM and searches; the spread across the roundings of
  one seed next to the spread across seeds; stage minutes with each run's CPU;
  the simulator's control; the targets of issue 27, met or not; the commits and
  package versions; each run's full table;
* ``summary.json`` (what the tables say, as numbers) and ``plots/*.png`` (a line
  per run and RL stage, a colour per seed: training reward, searches per question
  by hops, p_noise);
* a final JSON line on stdout.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import queue
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zsjax import report as tiny_report  # noqa: E402
from zsjax.metrics import read_jsonl  # noqa: E402

CONFIG = "configs/tiny_world.py"
# The report's roundings: the job as the README runs it (all the machine's cores), and
# pinned to one core (--prefix="taskset -c N" --name=seed_{seed}_one_core).
ROUNDINGS = "all cores=seed_{seed},one core=seed_{seed}_one_core"


def run_seed(root: Path, name: str, seed: int, prefix: str, sets: list[str],
             cache: Path, arg: str = "") -> None:
  workdir = root / name
  if (workdir / "results.json").exists():
    print(f"{workdir}: finished, skipped", flush=True)
    return
  command = shlex.split(prefix) + [
      sys.executable, "-m", "zsjax.main", f"--config={CONFIG}{':' + arg if arg else ''}", f"--workdir={workdir}",
      f"--config.seed={seed}", f"--config.stage_cache={cache}",
      "--config.progress=False"] + [f"--config.{s}" for s in sets]
  print(" ".join(shlex.quote(c) for c in command), flush=True)
  start = time.time()
  with open(root / f"{name}.log", "w") as log:
    subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT,
                   cwd=Path(__file__).resolve().parent.parent)
  print(f"{workdir}: {time.time() - start:.0f} s", flush=True)


def run_all(root: Path, seeds: list[int], args) -> None:
  """``run_seed`` for each seed, ``args.jobs`` at a time: a free slot number (0, 1,
  ...) replaces ``{slot}`` in the prefix, so ``--prefix="taskset -c {slot}"
  --jobs=2`` runs two seeds at once, each pinned to its own core."""
  slots: queue.Queue = queue.Queue()
  for slot in range(args.jobs):
    slots.put(slot)
  cache = Path(args.cache) if args.cache else root / "cache"

  def one(seed):
    slot = slots.get()
    try:
      run_seed(root, args.name.format(seed=seed), seed, args.prefix.replace("{slot}", str(slot)),
               args.set, cache, args.arg)
    finally:
      slots.put(slot)

  with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
    for done in [pool.submit(one, seed) for seed in seeds]:
      done.result()  # a failed run stops the report with its error


def mean_std(values) -> tuple[float, float]:
  values = np.asarray(values, float)
  return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else float("nan")


def fmt(values, scale=100.0, digits=1) -> str:
  m, s = mean_std(np.asarray(values) * scale)
  return f"{m:.{digits}f} ± {s:.{digits}f}" if not np.isnan(s) else f"{m:.{digits}f}"


# What each run's row reports, in EM points (searches as they are): name -> f(results).
def _em(method, split="all"):
  return lambda r: 100 * r["methods"][method][split]["em"]


KEYS = {
    "warm start single-hop": _em("warm_start", "single_hop"),
    "warm start": _em("warm_start"),
    "direct": _em("direct"),
    "RAG": _em("rag"),
    "RL(sim)": _em("rl_simulator"),
    "RL(BM25)": _em("rl_real_search"),
    "RL(sim) - warm start": lambda r: 100 * r["gains_over_warm_start"]["rl_simulator"]["em"],
    "RL(sim) two-hop": _em("rl_simulator", "two_hop"),
    "RL(sim) two-hop searches": lambda r: r["methods"]["rl_simulator"]["two_hop"]["searches"],
}


def spread(runs: dict[tuple[int, str], dict], key: str) -> tuple[float, float]:
  """(across roundings, across seeds) for ``KEYS[key]``: the pooled std of one seed's
  runs over the roundings (seeds run in more than one), and the pooled std over seeds
  of one rounding's runs (roundings with more than one seed)."""
  f = KEYS[key]
  def pooled(groups):
    groups = [np.asarray(g, float) for g in groups if len(g) > 1]
    if not groups:
      return float("nan")
    dev = sum(float(((g - g.mean()) ** 2).sum()) for g in groups)
    return float(np.sqrt(dev / sum(len(g) - 1 for g in groups)))
  seeds = sorted({s for s, _ in runs})
  roundings = sorted({r for _, r in runs})
  across_roundings = pooled([[f(v) for (s, _), v in runs.items() if s == seed] for seed in seeds])
  across_seeds = pooled([[f(v) for (_, r), v in runs.items() if r == rounding]
                         for rounding in roundings])
  return across_roundings, across_seeds


def targets(runs: dict[tuple[int, str], dict], minutes: float = 7.0) -> list[dict]:
  """Tiny world v3's targets (issue 27) over every run (seed, rounding):
  ``{target, value, met}``, values in EM points (searches, minutes)."""
  res = list(runs.values())
  value = lambda key: [KEYS[key](r) for r in res]  # noqa: E731
  gains = [r["gains_over_warm_start"]["rl_simulator"] for r in res]
  control = lambda key: float(np.mean([r["simulator_control"]["groups"]["answerable"][key]  # noqa: E731
                                       for r in res])) * 100
  rounding, seed = spread(runs, "RL(sim) - warm start")
  rows = [
      ("warm start single-hop EM >= 85 in every run", min(value("warm start single-hop")),
       ">=", 85),
      ("RAG - direct > 0 in every run (all EM)",
       min(a - b for a, b in zip(value("RAG"), value("direct"))), ">", 0),
      ("RL(sim) - warm start >= +20 in every run (min; and > 2 SE in every run)",
       min(value("RL(sim) - warm start")), ">=", 20,
       all(g["em"] > 2 * g["stderr"] for g in gains)),
      ("|mean RL(sim) - mean RL(BM25)| <= 5 (all EM)",
       abs(np.mean(value("RL(sim)")) - np.mean(value("RL(BM25)"))), "<=", 5),
      ("RL(sim) two-hop EM >= 40 in every run", min(value("RL(sim) two-hop")), ">=", 40),
      ("RL(sim) two-hop searches per question >= 1.8 in every run",
       min(value("RL(sim) two-hop searches")), ">=", 1.8),
      ("spread of RL(sim) - warm start across roundings of a seed <= across seeds "
       f"(across seeds: {seed:.1f})", rounding, "<=", seed),
      ("simulator useful holds the answer >= 80% (answerable queries, mean)",
       control("useful"), ">=", 80),
      ("simulator noisy holds the answer <= 20% (answerable queries, mean)",
       control("noisy"), "<=", 20),
      (f"every run <= {minutes:g} min (on this report's machines)",
       max(r["total_seconds"] for r in res) / 60, "<=", minutes),
  ]
  compare = {">=": np.greater_equal, ">": np.greater, "<=": np.less_equal}
  return [{"target": t, "value": float(v), "met": bool(compare[op](v, bound)) and all(also)}
          for t, v, op, bound, *also in rows]


# What --keep copies of each run (small files; checkpoints and exports stay behind),
# and the warm start's metrics thinned to every 50th step and each reading check.
KEEP = ("results.json", "results.md", "predictions.jsonl", "controllability.json",
        "simulator_samples.jsonl", "rl_simulator/metrics.jsonl", "rl_real_search/metrics.jsonl")
WARM_START_CURVE = "warm_start_curve.jsonl"
CURVE_KEYS = ("step", "loss/nll", "optim/lr", "eval/nll")


def keep(run: Path, out: Path) -> None:
  """Copy ``KEEP`` of the finished run ``run`` to ``out`` (made), and its warm
  start's curve to ``out/WARM_START_CURVE``."""
  for rel in KEEP:
    if (run / rel).exists():
      (out / rel).parent.mkdir(parents=True, exist_ok=True)
      shutil.copyfile(run / rel, out / rel)
  records = read_jsonl(run / "warm_start" / "metrics.jsonl")
  curve = [{k: r[k] for k in CURVE_KEYS if k in r} for r in records
           if (r["step"] - 1) % 50 == 0 or "eval/nll" in r]
  (out / WARM_START_CURVE).write_text("".join(json.dumps(r) + "\n" for r in curve))


def run_name(roundings: dict[str, str], seed: int, label: str) -> str:
  """The workdir name of ``seed``'s run in rounding ``label``."""
  return roundings[label].format(seed=seed)


def collect(root: Path, seeds: list[int], roundings: dict[str, str]) -> dict:
  """Every finished run: ``(seed, rounding label) -> results.json``."""
  runs = {}
  for seed in seeds:
    for label in roundings:
      path = root / run_name(roundings, seed, label) / "results.json"
      if path.exists():
        runs[(seed, label)] = json.loads(path.read_text())
  return runs


def _nll(warm_start: dict, key: str) -> str:
  return f"{warm_start[key]:.3f}" if key in warm_start else "-"


AGAINST_KEYS = ("warm start", "RL(sim)", "RL(BM25)", "RL(sim) - warm start", "RL(sim) two-hop")


def against(summary: dict, baseline: dict, name: str) -> tuple[list[str], dict]:
  """This set's runs minus the same-named runs of another set's ``summary.json``
  (``baseline``; e.g. an earlier design on the same seeds): per run and mean ± std
  over the runs both hold, for ``AGAINST_KEYS``. Markdown lines and the numbers."""
  both = [run for run in summary["runs"] if run in baseline["runs"]]
  diffs = {run: {k: summary["runs"][run][k] - baseline["runs"][run][k] for k in AGAINST_KEYS}
           for run in both}
  lines = ["", f"## Against {name}: this set minus it, run by run (EM points)", "",
           "| run | " + " | ".join(AGAINST_KEYS) + " |", "|---|" + "---|" * len(AGAINST_KEYS)]
  lines += [f"| {run} | " + " | ".join(f"{d[k]:+.1f}" for k in AGAINST_KEYS) + " |"
            for run, d in diffs.items()]
  stats = {k: mean_std([d[k] for d in diffs.values()]) for k in AGAINST_KEYS} if both else {}
  if both:
    lines.append(f"| mean ± std ({len(both)} runs) | " + " | ".join(
        f"{fmt([d[k] for d in diffs.values()], 1)}" for k in AGAINST_KEYS) + " |")
  return lines, {"baseline": name, "runs": diffs, "mean_std": stats}


def report(root: Path, seeds: list[int], runs: dict, out: Path,
           roundings: dict[str, str], baseline: Path | None = None) -> dict:
  """``report.md``, ``summary.json`` and ``plots/`` under ``out`` for ``runs``
  (``collect``'s, of ``seeds``) under ``root``."""
  labels = [r for r in roundings if any(k[1] == r for k in runs)]
  methods = [m for m in tiny_report.METHODS if all(m in r["methods"] for r in runs.values())]
  name = functools.partial(run_name, roundings)
  lines = [f"# Tiny world over seeds and roundings ({len(runs)} runs)", "",
           "Roundings: " + "; ".join(f"{label}: `{roundings[label]}`" for label in labels)
           + ". Test EM %; the gain is paired over the test questions (± one standard error).",
           "", "| run | rounding | " + " | ".join(KEYS) + " | warm start steps (check passed) "
           "| reading check NLL (worst relation) | minutes |",
           "|---|---|" + "---|" * (len(KEYS) + 3)]
  summary = {"seeds": seeds, "roundings": roundings, "runs": {}, "by_rounding": {},
             "spread": {}}
  for (seed, label), r in runs.items():
    values = {k: f(r) for k, f in KEYS.items()}
    g = r["gains_over_warm_start"]["rl_simulator"]
    w = r.get("warm_start", {})
    summary["runs"][name(seed, label)] = dict(values, seed=seed, rounding=label,
                                              stage_seconds=r["stage_seconds"], warm_start=w)
    cells = [f"{v:.2f}" if k.endswith("searches") else f"{v:.1f}" for k, v in values.items()]
    cells[list(KEYS).index("RL(sim) - warm start")] = f"{100 * g['em']:+.1f} ± {100 * g['stderr']:.1f}"
    lines.append(f"| {name(seed, label)} | {label} | " + " | ".join(cells)
                 + f" | {w.get('steps', '-')} ({w.get('formed_step', '-')}) | "
                 f"{_nll(w, 'reading_nll')} ({_nll(w, 'reading_nll_worst')}) | "
                 f"{r['total_seconds'] / 60:.1f} |")
  for label in labels:
    group = [r for (_, lab), r in runs.items() if lab == label]
    lines += ["", f"## {label}: mean ± std over seeds "
              f"{', '.join(str(s) for s, lab in runs if lab == label)}", "",
              "| method | single-hop EM | two-hop EM | all EM | searches single-hop | "
              "searches two-hop |", "|---|---|---|---|---|---|"]
    summary["by_rounding"][label] = {}
    for m in methods:
      cells = {s: [r["methods"][m][s]["em"] for r in group] for s in tiny_report.SPLITS}
      searches = {s: [r["methods"][m][s].get("searches", np.nan) for r in group]
                  for s in ("single_hop", "two_hop")}
      summary["by_rounding"][label][m] = {s: mean_std(v) for s, v in cells.items()}
      lines.append(f"| {m} | {fmt(cells['single_hop'])} | {fmt(cells['two_hop'])} | "
                   f"{fmt(cells['all'])} | {fmt(searches['single_hop'], 1, 2)} | "
                   f"{fmt(searches['two_hop'], 1, 2)} |")
    for m in ("rl_simulator", "rl_real_search"):
      if m in methods:
        gains = [100 * r["gains_over_warm_start"][m]["em"] for r in group]
        summary["by_rounding"][label][f"{m}-warm_start"] = mean_std(gains)
        lines += ["", f"{m} - warm start (all EM): {fmt(gains, 1)} over seeds."]
  lines += ["", "## Spread: pooled std across the roundings of one seed vs across the seeds "
            "of one rounding", "", "| measure | across roundings | across seeds |",
            "|---|---|---|"]
  for key in KEYS:
    a, b = spread(runs, key)
    summary["spread"][key] = {"across_roundings": a, "across_seeds": b}
    lines.append(f"| {key} | {a:.2f} | {b:.2f} |")
  stages = list(next(iter(runs.values()))["stage_seconds"])
  lines += ["", "## Stage minutes", "", "| run | " + " | ".join(stages) + " | total | cpu |",
            "|---|" + "---|" * (len(stages) + 2)]
  for (seed, label), r in runs.items():
    env = r["environment"]
    lines.append(f"| {name(seed, label)} | " + " | ".join(
        f"{r['stage_seconds'].get(s, 0) / 60:.1f}" for s in stages)
        + f" | {r['total_seconds'] / 60:.1f} | {env['cpu']}, {env['cores']} of "
        f"{env.get('machine_cores', '?')} cores |")
  lines += ["", "## Simulator control on the test questions' queries: % whose documents hold "
            "the gold answer / % with a document that names the query's subject and the "
            "answer (`zsjax.report.answers`). Answerable: a single-hop question or a two-hop "
            "question's bridge entity.", "",
            "| run | answerable: useful | noisy | BM25 | two-hop question: useful / noisy / "
            "BM25 (holds) | another entity's question: useful / noisy (holds) |",
            "|---|---|---|---|---|---|"]
  for (seed, label), r in runs.items():
    g = r["simulator_control"]["groups"]
    a, t, o = g["answerable"], g["two_hop_question"], g["other_question"]
    both = lambda x, m: f"{100 * x[m]:.1f} / {100 * x[m + '_answers']:.1f}"  # noqa: E731
    lines.append(f"| {name(seed, label)} | {both(a, 'useful')} | {both(a, 'noisy')} | "
                 f"{both(a, 'real')} | {100 * t['useful']:.1f} / {100 * t['noisy']:.1f} / "
                 f"{100 * t['real']:.1f} | {100 * o['useful']:.1f} / {100 * o['noisy']:.1f} |")
  if baseline is not None:
    extra, summary["against"] = against(summary, json.loads(baseline.read_text()),
                                        str(baseline))
    lines += extra
  checks = targets(runs)
  summary["targets"] = checks
  lines += ["", "## Targets (issue 27)", "", "| target | value | met |", "|---|---|---|"]
  lines += [f"| {c['target']} | {c['value']:.2f} | {'yes' if c['met'] else 'no'} |"
            for c in checks]
  envs = {(r["environment"]["commit"], json.dumps(r["environment"]["packages"], sort_keys=True))
          for r in runs.values()}
  lines += ["", "## Environment", ""] + [f"- commit {c}, packages {p}" for c, p in sorted(envs)]
  lines += ["", "## Per-run tables"]
  for (seed, label), r in runs.items():
    lines += ["", f"### {name(seed, label)} ({label})", "", tiny_report.results_table(r)]
  out.mkdir(parents=True, exist_ok=True)
  (out / "report.md").write_text("\n".join(lines) + "\n")
  (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  curves, colors = {}, {}
  for (seed, label), r in runs.items():
    for stage in ("rl_simulator", "rl_real_search"):
      path = root / name(seed, label) / stage / "metrics.jsonl"
      if path.exists():
        key = f"{name(seed, label)} {stage}"
        curves[key] = read_jsonl(path)
        colors[key] = f"C{(2 * seed + (stage == 'rl_real_search')) % 10}"
  tiny_report.plot_runs(curves, out / "plots", colors)
  warm = {}
  for (seed, label), r in runs.items():
    for path in (root / name(seed, label) / "warm_start" / "metrics.jsonl",
                 root / name(seed, label) / WARM_START_CURVE):
      if path.exists():
        warm[name(seed, label)] = read_jsonl(path)
        break
  tiny_report.plot_runs(warm, out / "plots", {name(s, lab): f"C{s % 10}" for s, lab in runs},
                        plots=tiny_report.WARM_START_PLOTS, xlabel="warm start step")
  print("\n".join(lines))
  return summary


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--root", required=True)
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--run", action="store_true", help="run the missing seeds first")
  parser.add_argument("--name", default="seed_{seed}", help="workdir name under ROOT")
  parser.add_argument("--prefix", default="", help="command prefix, e.g. 'taskset -c 0'; "
                      "{slot} becomes the run's slot number (see --jobs)")
  parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each in a slot "
                      "0..jobs-1)")
  parser.add_argument("--set", action="append", default=[], help="KEY=VALUE config override")
  parser.add_argument("--arg", default="", help="the config's arg (e.g. v3)")
  parser.add_argument("--cache", default="", help="stage cache (default ROOT/cache); a rerun "
                      "that must recompute every stage needs its own")
  parser.add_argument("--out", default="", help="report directory (default ROOT)")
  parser.add_argument("--keep", default="", help="copy each finished run's small files "
                      "(KEEP, the warm start's curve) to KEEP/<name>; the report can then "
                      "be made from there (--root=KEEP)")
  parser.add_argument("--against", default="", help="another set's summary.json (the same "
                      "run names): a section of this set's runs minus those")
  parser.add_argument("--roundings", default=ROUNDINGS,
                      help="LABEL=NAME,...: the workdir names (NAME formatted with the seed) "
                           "of each rounding the report compares")
  args = parser.parse_args(argv)
  root = Path(args.root)
  root.mkdir(parents=True, exist_ok=True)
  seeds = [int(s) for s in args.seeds.split(",") if s]
  if args.run:
    run_all(root, seeds, args)
  roundings = dict(item.split("=", 1) for item in args.roundings.split(","))
  runs = collect(root, seeds, roundings)
  if args.keep:
    for seed, label in runs:
      run = run_name(roundings, seed, label)
      keep(root / run, Path(args.keep) / run)
  if not runs:
    print(json.dumps({"runs": 0, "note": "no finished run under the root"}))
    return
  summary = report(root, seeds, runs, Path(args.out) if args.out else root, roundings,
                   Path(args.against) if args.against else None)
  print(json.dumps({"runs": len(runs), "targets_met": sum(t["met"] for t in summary["targets"]),
                    "targets": len(summary["targets"]),
                    **{f"{label}: {k}": v for label, g in summary["by_rounding"].items()
                       for k, v in g.items() if k.endswith("-warm_start")}}))

if __name__ == "__main__":
  main()
