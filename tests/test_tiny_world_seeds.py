"""The tiny world's seeds-and-roundings report: its spreads and targets (issue 27)."""

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))

import tiny_world_seeds  # noqa: E402


def fake_run(rng, gain: float, seconds: float = 300.0) -> dict:
  """A results.json holding what the targets read."""
  splits = lambda em, searches=1.0: {s: {"em": em, "searches": searches}  # noqa: E731
                                      for s in ("single_hop", "two_hop", "all")}
  warm = float(rng.uniform(0.4, 0.5))
  methods = {"warm_start": dict(splits(warm), single_hop={"em": 0.9, "searches": 1.0}), "direct": splits(0.0), "rag": splits(0.4),
             "rl_simulator": splits(warm + gain, 1.9), "rl_real_search": splits(warm + gain)}
  group = {"useful": 0.9, "noisy": 0.1, "useful_answers": 0.9, "noisy_answers": 0.1}
  return {"methods": methods, "total_seconds": seconds,
          "gains_over_warm_start": {"rl_simulator": {"em": gain, "stderr": 0.04, "n": 100}},
          "simulator_control": {"groups": {"answerable": group}}}


def test_spread_pools_within_seed_and_within_rounding_variances(tmp_path):
  rng = np.random.default_rng(0)
  gains = rng.uniform(0.2, 0.35, size=(4, 2))  # seed x rounding
  labels = {"all cores": "seed_{seed}", "one core": "seed_{seed}_one_core"}
  for seed in range(4):
    for k, pattern in enumerate(labels.values()):
      d = tmp_path / pattern.format(seed=seed)
      d.mkdir()
      (d / "results.json").write_text(json.dumps(fake_run(rng, float(gains[seed, k]))))
  (tmp_path / "seed_9").mkdir()  # unfinished: no results.json
  runs = tiny_world_seeds.collect(tmp_path, [0, 1, 2, 3, 9], labels)
  assert sorted(runs) == [(s, r) for s in range(4) for r in sorted(labels)]
  across_roundings, across_seeds = tiny_world_seeds.spread(runs, "RL(sim) - warm start")
  g = 100 * gains
  # two runs a seed: each seed's variance is (a - b)^2 / 2; four seeds a rounding
  assert np.isclose(across_roundings, np.sqrt(np.mean((g[:, 0] - g[:, 1]) ** 2 / 2)))
  assert np.isclose(across_seeds, np.sqrt(np.mean(g.var(axis=0, ddof=1))))
  checks = {c["target"].split(" (")[0]: c for c in tiny_world_seeds.targets(runs)}
  spread_check = next(c for t, c in checks.items() if t.startswith("spread"))
  assert spread_check["met"] == (across_roundings <= across_seeds)
  every = checks["RL(sim) - warm start >= +20 in every run"]
  assert np.isclose(every["value"], g.min()) and every["met"] == (g.min() >= 20)


def test_against_another_set_subtracts_run_by_run():
  rng = np.random.default_rng(2)
  runs = {f"seed_{s}": {k: float(v) for k, v in zip(tiny_world_seeds.AGAINST_KEYS,
                                                       rng.uniform(0, 100, 5))} for s in range(3)}
  base = {run: {k: v - 1.0 - i for k, v in row.items()} for i, (run, row) in enumerate(runs.items())}
  base["seed_7"] = base.pop("seed_2")  # not in this set: left out
  lines, out = tiny_world_seeds.against({"runs": runs}, {"runs": base}, "v0")
  assert sorted(out["runs"]) == ["seed_0", "seed_1"]
  assert out["runs"]["seed_1"]["RL(sim)"] == 2.0
  mean, std = out["mean_std"]["RL(BM25)"]
  assert np.isclose(mean, 1.5) and np.isclose(std, np.std([1.0, 2.0], ddof=1))
  assert "| seed_1 | +2.0 |" in "\n".join(lines) and "mean ± std (2 runs)" in lines[-1]


def test_a_single_run_below_a_per_run_target_fails_it():
  rng = np.random.default_rng(1)
  runs = {(s, "all cores"): fake_run(rng, 0.3) for s in range(3)}
  assert all(c["met"] for c in tiny_world_seeds.targets(runs, minutes=10)
             if not c["target"].startswith("spread"))
  runs[(1, "all cores")] = fake_run(rng, 0.3, seconds=700.0)  # one slow run
  runs[(2, "all cores")]["gains_over_warm_start"]["rl_simulator"]["stderr"] = 0.2  # gain < 2 SE
  checks = {c["target"].split(" (")[0]: c["met"] for c in tiny_world_seeds.targets(runs, 10)}
  assert not checks["RL(sim) - warm start >= +20 in every run"]
  assert not checks["every run <= 10 min"]
  assert checks["warm start single-hop EM >= 85 in every run"]
  runs[(0, "all cores")]["methods"]["warm_start"]["single_hop"]["em"] = 0.84
  checks = {c["target"].split(" (")[0]: c["met"] for c in tiny_world_seeds.targets(runs, 10)}
  assert not checks["warm start single-hop EM >= 85 in every run"]


def test_keep_copies_the_small_files_and_thins_the_warm_start_curve(tmp_path):
  run = tmp_path / "seed_0"
  (run / "warm_start").mkdir(parents=True)
  (run / "rl_simulator").mkdir()
  (run / "results.json").write_text("{}")
  (run / "rl_simulator" / "metrics.jsonl").write_text('{"step": 1}\n')
  (run / "warm_start" / "checkpoints").mkdir()  # stays behind
  records = [{"step": s, "loss/nll": 1.0 / s, "time": 0.0, **({"eval/nll": 0.5} if s % 100 == 0
                                                                else {})} for s in range(1, 301)]
  (run / "warm_start" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  out = tmp_path / "kept" / "seed_0"
  tiny_world_seeds.keep(run, out)
  assert (out / "results.json").read_text() == "{}"
  assert (out / "rl_simulator" / "metrics.jsonl").exists() and not (out / "warm_start").exists()
  curve = [json.loads(line) for line in (out / "warm_start_curve.jsonl").read_text().splitlines()]
  assert [r["step"] for r in curve] == [1, 51, 100, 101, 151, 200, 201, 251, 300]
  assert all("time" not in r for r in curve)
  assert [r["step"] for r in curve if "eval/nll" in r] == [100, 200, 300]


def test_runs_at_a_time_each_hold_their_own_slot(tmp_path, monkeypatch):
  import argparse
  import threading
  import time

  held, calls, lock = set(), [], threading.Lock()

  def fake_run_seed(root, name, seed, prefix, sets, cache, arg):
    slot = prefix.split()[-1]
    with lock:
      assert slot not in held  # no two runs share a slot (a core)
      held.add(slot)
      calls.append((seed, prefix, name))
    time.sleep(0.05)
    with lock:
      held.discard(slot)

  monkeypatch.setattr(tiny_world_seeds, "run_seed", fake_run_seed)
  args = argparse.Namespace(jobs=2, cache="", name="seed_{seed}_one_core", set=[], arg="v3",
                            prefix="taskset -c {slot}")
  tiny_world_seeds.run_all(tmp_path, [0, 1, 2, 3, 4], args)
  assert sorted(c[0] for c in calls) == [0, 1, 2, 3, 4]
  assert {c[1] for c in calls} == {"taskset -c 0", "taskset -c 1"}
  assert {c[2] for c in calls} == {f"seed_{s}_one_core" for s in range(5)}
