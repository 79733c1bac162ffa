"""Fault drill: the RL and eval jobs against a search server that misbehaves.

  python experiments/fault_drill.py --out=experiments/results/fault_drill [--work=DIR]

A local stub simulator server on 127.0.0.1 (tests/stub_server.py) is, per
scenario: healthy (``ok``), ``dead`` (nothing listens), ``slow`` (answers after
2 s, past the 0.5 s deadline), ``trickle`` (a valid answer 4 bytes every 0.2 s),
``error`` (HTTP 500), ``garbage`` (not JSON) or ``dies`` (closes). Except for
``dead`` and ``error_at_start`` (HTTP 500 from the first request), a failing
server answers the health check and the first search call, then fails. For each, a tiny RL run (the
zerosearch tiny config on a tiny world, ``engine.kind=http``, 4 steps) and an
eval job (the search method on two small sets) run with a policy that always
searches: its first tokens are forced to ``<search> ... </search>``
(``tests/scripted.py``), so every step and every question calls the engine.

Each outcome is checked, not just printed: the run either finishes with the
failure share reported (and printed), or stops with a message naming the
engine's error; it ends within its time bound (search calls x the engine's
per-call deadline, plus the run's compute); what it had written before the
fault (checkpoints, metrics, scored sets) is still there. Writes
``OUT/fault_drill.md`` (the table) and ``OUT/fault_drill.json``; the last line
printed is a JSON summary. ``--scenarios`` and ``--jobs`` run a subset (the
test suite runs a short drill). The ``sig*`` scenarios stop a healthy RL run
with SIGTERM or Ctrl-C (SIGINT) during a checkpoint save or a step, then rerun
it: the step under way must finish and be saved (a save in flight completes;
a second signal in a step stops it at once and the last complete checkpoint
stands), the message must name that checkpoint, and the rerun must finish every
step. About 6 minutes on
2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the stub server, the scripted sampler, configs

# Each failing server answers the health check and the first search call well
# (healthy_for=2), then fails: the run has started and written something.
SCENARIOS = {
    "ok": dict(mode="ok"),
    "dead": dict(mode="ok", dead=True),
    "error_at_start": dict(mode="error"),
    "slow": dict(mode="slow", delay_s=2.0, healthy_for=2),
    "trickle": dict(mode="trickle", trickle_s=0.2, healthy_for=2),
    "error": dict(mode="error", healthy_for=2),
    "garbage": dict(mode="garbage", healthy_for=2),
    "dies": dict(mode="ok", die_after=2),
    # 200s that hold no usable completion (issue 30 item 1)
    "no_choices": dict(mode="no_choices", healthy_for=2),
    "empty_text": dict(mode="empty_text", healthy_for=2),
    "fewer": dict(mode="fewer", healthy_for=2),
    "no_index": dict(mode="no_index", healthy_for=2),
    # a healthy server; the run is stopped by a signal (RL only): during the blocking
    # part of step 2's checkpoint save, or in the middle of step 3 with checkpoints
    # every 2 steps (the stop saves step 3), or twice in step 3 (stops at once: step 2)
    "sigterm_in_save": dict(mode="ok", signal="SIGTERM", at="save", step=2),
    "sigint_in_save": dict(mode="ok", signal="SIGINT", at="save", step=2),
    "sigterm_in_step": dict(mode="ok", signal="SIGTERM", at="step", step=3, every=2),
    "sigterm_twice_in_step": dict(mode="ok", signal="SIGTERM", at="step", step=3, every=2,
                                  times=2),
}
RL_ONLY = ("sigterm_in_save", "sigint_in_save", "sigterm_in_step", "sigterm_twice_in_step")
ENGINE = dict(timeout_s=0.5, max_retries=1, backoff_s=0.05, max_failed_share=0.2,
              max_failed_steps=2)
RL_STEPS = 4
QUERY = " <search> capital </search>"


def _searching(tokenizer, rows: int, base):
  """A sampler whose first tokens in every row are ``QUERY``."""
  from scripted import Scripted, script_rows

  ids = tokenizer.encode(QUERY, add_special_tokens=False)
  return Scripted(script_rows([ids] * rows), base)


def _server(scenario: dict):
  from stub_server import StubServer

  server = StubServer(scenario["mode"], delay_s=scenario.get("delay_s", 1.0),
                      trickle_s=scenario.get("trickle_s", 0.5),
                      die_after=scenario.get("die_after"),
                      healthy_for=scenario.get("healthy_for", 0))
  if scenario.get("dead"):
    server.close()
  return server


def _engine_section(config, url: str) -> None:
  config.engine.update(dict(kind="http", url=url, model="sim", **ENGINE))


def rl_case(name: str, world: dict, work: Path) -> dict:
  """One RL run against scenario ``name``; returns its outcome row."""
  from config_files import load_config

  from zsjax import sampling, search, train_rl
  from zsjax.checkpoint import Checkpointer
  from zsjax.metrics import read_jsonl

  scenario = SCENARIOS[name]
  server = _server(scenario)
  config = load_config("zerosearch", "tiny")
  config.progress = False
  config.synthetic_data = False
  config.data.train_files, config.tokenizer = world["train"], world["tokenizer"]
  config.rl.total_steps = RL_STEPS
  config.rollout.update(dict(max_new_tokens=12, max_turns=1))
  config.checkpoint.update(dict(async_save=False, export_hf=False,
                                every=scenario.get("every", 1)))
  _engine_section(config, server.url)
  rows = config.rl.prompts_per_step * config.rl.samples_per_prompt
  original = sampling.from_config
  workdir = work / f"rl_{name}"
  console = io.StringIO()
  start = time.perf_counter()
  outcome, message = "finished", ""
  resumed_steps, interrupted_at = [], []
  try:
    sampling.from_config = lambda section: _searching(  # noqa: E731
        _tokenizer(world), rows, original(section))
    with contextlib.redirect_stderr(console), _signal_at(scenario) as armed:
      try:
        job = train_rl.setup(config, workdir)
        train_rl.train(job)
      except search.EngineError as e:
        outcome, message = ("refused at start" if "did not answer a test request" in str(e)
                            else "stopped"), str(e)
      except KeyboardInterrupt as e:  # the scenario's signal (Terminated for SIGTERM)
        outcome = f"interrupted ({type(e).__name__})"
        message = next((line for line in console.getvalue().splitlines()
                        if "last complete checkpoint" in line), "")
    if "signal" in scenario:  # the same command again: it resumes and finishes
      interrupted_at = Checkpointer(workdir / "checkpoints").all_steps()
      armed.clear()
      with contextlib.redirect_stderr(io.StringIO()):
        train_rl.train(train_rl.setup(config, workdir))
      resumed_steps = [r["step"] for r in read_jsonl(workdir / "metrics.jsonl")]
  finally:
    sampling.from_config = original
    server.close()
  seconds = time.perf_counter() - start
  metrics = read_jsonl(workdir / "metrics.jsonl") if (workdir / "metrics.jsonl").exists() else []
  steps = Checkpointer(workdir / "checkpoints").all_steps() \
      if (workdir / "checkpoints").exists() else []
  if resumed_steps:
    steps = interrupted_at  # what the interrupted run left, before the rerun
  # time bound: every step's one search call at its deadline, plus the health check
  engine = search.HttpSimulatorEngine("http://x", "m", timeout_s=ENGINE["timeout_s"],
                                      max_retries=ENGINE["max_retries"],
                                      backoff_s=ENGINE["backoff_s"])
  return {"job": "rl", "scenario": name, "outcome": outcome, "seconds": seconds,
          "search_bound_s": (RL_STEPS + 1) * engine.call_deadline_s,
          "failed_share": [r["rollout/failed_share"] for r in metrics],
          "metrics_steps": [r["step"] for r in metrics], "checkpoints": steps,
          "resumed_steps": resumed_steps,
          "printed": [line for line in console.getvalue().splitlines() if "failed" in line],
          "message": message}


@contextlib.contextmanager
def _signal_at(scenario: dict):
  """Sends the scenario's signal to this process in the blocking part of step
  ``step``'s checkpoint save (``at="save"``) or during step ``step`` (``"step"``),
  with SIGTERM handled as ``zsjax.main`` handles it. Yields a list whose clearing
  disarms it (for the rerun)."""
  import os
  import signal

  import orbax.checkpoint as ocp

  from zsjax import interrupts, train_rl

  armed = [True] if "signal" in scenario else []
  if not armed:
    yield armed
    return
  signum = getattr(signal, scenario["signal"])
  # both handlers as in a foreground `zsjax.main` run (a drill started with `&` from a
  # script ignores SIGINT), put back after
  previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  save, score = ocp.CheckpointManager.save, train_rl.score_answers
  calls = [0]

  def save_then(self, step, *args, **kwargs):
    if armed and scenario["at"] == "save" and step == scenario["step"]:
      os.kill(os.getpid(), signum)
    return save(self, step, *args, **kwargs)

  def score_then(*args, **kwargs):
    calls[0] += 1
    if armed and scenario["at"] == "step" and calls[0] == scenario["step"]:
      for _ in range(scenario.get("times", 1)):
        os.kill(os.getpid(), signum)
    return score(*args, **kwargs)

  interrupts.install()
  signal.signal(signal.SIGINT, signal.default_int_handler)
  ocp.CheckpointManager.save, train_rl.score_answers = save_then, score_then
  try:
    yield armed
  finally:
    ocp.CheckpointManager.save, train_rl.score_answers = save, score
    for s, handler in previous.items():
      signal.signal(s, handler)


def eval_case(name: str, world: dict, work: Path, policy: Path) -> dict:
  """One eval job (search method, two sets) against scenario ``name``."""
  from config_files import load_config

  from zsjax import evaluate, search
  from zsjax.metrics import read_jsonl

  scenario = SCENARIOS[name]
  server = _server(scenario)
  config = load_config("eval", "tiny")
  config.progress = False
  config.synthetic_data = False
  config.tokenizer = world["tokenizer"]
  config.policy.checkpoint = str(policy)
  config.prompt_format = "plain"
  config.eval.methods = "search"
  config.eval.sample_size = 8
  config.eval.sets = f"single_hop={world['test_single_hop']},two_hop={world['test_two_hop']}"
  _engine_section(config, server.url)
  original = evaluate.Greedy
  workdir = work / f"eval_{name}"
  console = io.StringIO()
  start = time.perf_counter()
  outcome, message, results = "finished", "", {}
  try:
    evaluate.Greedy = lambda: _searching(_tokenizer(world), config.eval.batch_size,  # noqa: E731
                                         original())
    with contextlib.redirect_stderr(console):
      try:
        results = evaluate.run(config, str(workdir))
        if results.get("ok") is False:
          outcome = "finished, exit 1"
      except search.EngineError as e:
        outcome, message = "refused at start", str(e)
  finally:
    evaluate.Greedy = original
    server.close()
  seconds = time.perf_counter() - start
  predictions = workdir / "predictions.jsonl"  # a complete run's; a stopped one's is partial
  if not predictions.exists():
    predictions = workdir / "predictions.partial.jsonl"
  sets = {k: v for k, v in results.get("methods", {}).get("search", {}).items()
          if k != "average"}
  engine = search.HttpSimulatorEngine("http://x", "m", timeout_s=ENGINE["timeout_s"],
                                      max_retries=ENGINE["max_retries"],
                                      backoff_s=ENGINE["backoff_s"])
  batches = sum(-(-min(8, _count(world[k])) // config.eval.batch_size)
                for k in ("test_single_hop", "test_two_hop"))
  return {"job": "eval", "scenario": name, "outcome": outcome, "seconds": seconds,
          "search_bound_s": (batches * config.rollout.max_turns + 1) * engine.call_deadline_s,
          "failed_share": [round(v["failed_share"], 3) for v in sets.values()],
          "predictions": len(read_jsonl(predictions)) if predictions.exists() else 0,
          "printed": [line for line in console.getvalue().splitlines() if "failed" in line],
          "message": message or " ".join(results.get("engine_failures", []))}


def _count(path: str) -> int:
  with open(path, encoding="utf-8") as f:
    return sum(1 for line in f if line.strip())


_TOKENIZERS: dict = {}


def _tokenizer(world: dict):
  from zsjax import hf

  if world["tokenizer"] not in _TOKENIZERS:
    _TOKENIZERS[world["tokenizer"]] = hf.load_tokenizer(world["tokenizer"])
  return _TOKENIZERS[world["tokenizer"]]


def tiny_policy(world: dict, work: Path) -> Path:
  """A random tiny policy as an HF checkpoint (the eval job loads one)."""
  import jax

  from config_files import load_config
  from zsjax import hf, model

  directory = work / "policy"
  if not (directory / "config.json").exists():
    tokenizer = _tokenizer(world)
    fields = load_config("zerosearch", "tiny").policy.model.to_dict()
    fields["vocab_size"] = len(tokenizer)
    cfg = model.ModelConfig.from_dict(fields)
    hf.save_checkpoint(directory, cfg, model.init_params(cfg, jax.random.key(0)))
  return directory


def paper_scale_hang(scale: float = 0.01) -> dict:
  """The paper config's served-simulator settings against a server that never
  answers, with every time limit multiplied by ``scale``: RL's search calls until
  it stops (``max_failed_steps`` steps of ``max_turns`` calls of
  prompts x samples chat requests), timed, and the same divided by ``scale``: what
  a hung server costs at the paper defaults. Also the count of progress lines."""
  from config_files import load_config
  from stub_server import StubServer

  from zsjax import search, simulator

  config = load_config("zerosearch", "llama3.2-3b")
  e, r = config.engine, config.rl
  rows, turns, steps = r.prompts_per_step * r.samples_per_prompt, config.rollout.max_turns, \
      e.max_failed_steps
  server = StubServer("slow", delay_s=3600.0)
  engine = search.HttpSimulatorEngine(
      server.url, "sim", simulator.SimulatorPrompt(chat=True), timeout_s=e.timeout_s * scale,
      max_retries=e.max_retries, backoff_s=e.backoff_s * scale, concurrency=e.concurrency)
  lines = []
  engine.log = lines.append
  calls = []
  try:
    for _ in range(steps * turns):
      start = time.perf_counter()
      result = engine.search([search.SearchRequest(f"q{i}") for i in range(rows)])
      calls.append(time.perf_counter() - start)
      assert all(result.failed)
  finally:
    server.close()
  old_bound = steps * turns * engine.call_bound_s(rows)  # every request waits its deadline
  return {"rows": rows, "turns": turns, "failing_steps": steps,
          "timeout_s": e.timeout_s, "max_retries": e.max_retries,
          "concurrency": e.concurrency, "scale": scale, "requests_sent": len(server.requests),
          "requests": rows * turns * steps, "progress_lines": len(lines),
          "first_step_s": sum(calls[:turns]) / scale, "until_stop_s": sum(calls) / scale,
          "without_the_down_rule_s": old_bound / scale}


def check(row: dict) -> list[str]:
  """What a row's outcome must satisfy; returns the violations."""
  bad = []
  name, job = row["scenario"], row["job"]
  if row["seconds"] > row["search_bound_s"] + 120:
    bad.append(f"took {row['seconds']:.0f} s, past the bound")
  scenario = SCENARIOS[name]
  if "signal" in scenario:
    # the step under way finishes and is saved; a second signal stops it at once
    kept = scenario["step"] - (scenario.get("times", 1) > 1)
    if not row["outcome"].startswith("interrupted"):
      bad.append(f"the run did not stop on {scenario['signal']}")
    if f"the last complete checkpoint: step {kept}" not in row["message"]:
      bad.append(f"the message did not name checkpoint step {kept}")
    if kept not in row["checkpoints"] or max(row["checkpoints"]) != kept:
      bad.append(f"checkpoint step {kept} is missing or not the last")
    if row["resumed_steps"] != list(range(1, RL_STEPS + 1)):
      bad.append(f"the rerun did not resume and finish (steps {row['resumed_steps']})")
  elif name == "ok":
    if row["outcome"] != "finished" or any(row["failed_share"]):
      bad.append("a healthy server was reported failing")
  elif name in ("dead", "error_at_start"):
    if row["outcome"] != "refused at start" or "127.0.0.1" not in row["message"]:
      bad.append("a server failing at start was not refused with its URL")
  elif job == "rl":
    if row["outcome"] != "stopped" or "last error" not in row["message"]:
      bad.append("RL went on against a failing engine")
    if not row["printed"]:
      bad.append("the failed share was not printed")
    if 1 not in row["checkpoints"]:
      bad.append("the checkpoint written before the fault is gone")
  else:
    if row["outcome"] != "finished, exit 1" or not any(s > 0.2 for s in row["failed_share"]):
      bad.append("eval against a failing engine did not fail")
    if row["predictions"] == 0:
      bad.append("nothing scored was kept")
  return bad


def engine_error(message: str) -> str:
  """The engine's error as a message quotes it ("" when none)."""
  for start, end in (("last error: ", ". Fix"), ("last error: ", ";"), (" s: ", ". Start")):
    if start in message and end in message.split(start, 1)[1]:
      return message.split(start, 1)[1].split(end, 1)[0]
  return ""


def table(rows: list[dict]) -> str:
  lines = ["| job | server | outcome | failed share (per step / set) | seconds (search-time "
           "bound) | kept | the engine's error, as reported |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    kept = (f"checkpoints {r['checkpoints']}" if r["job"] == "rl"
            else f"{r['predictions']} predictions")
    if r.get("resumed_steps"):
      kept += f"; rerun: steps 1-{r['resumed_steps'][-1]}"
    share = ", ".join(f"{s:.2f}" for s in r["failed_share"]) or "-"
    error = (engine_error(r["message"]) or (r["message"] if "signal" in SCENARIOS[r["scenario"]]
                                            else "")).replace("|", "/")[:80]
    lines.append(f"| {r['job']} | {r['scenario']} | {r['outcome']} | {share} | "
                 f"{r['seconds']:.1f} ({r['search_bound_s']:.1f}) | {kept} | {error} |")
  return "\n".join(lines) + "\n"


def run(scenarios, jobs, work: Path) -> list[dict]:
  from zsjax import tinyworld

  world = tinyworld.ensure(work / "world", 0)
  rows = []
  for job in jobs:
    for name in scenarios:
      if job == "eval" and name in RL_ONLY:
        continue
      row = rl_case(name, world, work) if job == "rl" else eval_case(
          name, world, work, tiny_policy(world, work))
      row["violations"] = check(row)
      rows.append(row)
      print(f"[drill] {job}/{name}: {row['outcome']} in {row['seconds']:.1f} s"
            + (f" VIOLATIONS {row['violations']}" if row["violations"] else ""), flush=True)
  return rows


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="")
  parser.add_argument("--work", default="")
  parser.add_argument("--scenarios", default=",".join(SCENARIOS))
  parser.add_argument("--jobs", default="rl,eval")
  parser.add_argument("--paper_scale", type=int, default=1,
                      help="also time a hung server at the paper defaults, scaled (1/0)")
  args = parser.parse_args(argv)
  logging.getLogger().setLevel(logging.ERROR)  # the drill's own lines, not the libraries'
  work = Path(args.work or tempfile.mkdtemp(prefix="fault_drill_"))
  rows = run([s for s in args.scenarios.split(",") if s], [j for j in args.jobs.split(",") if j],
             work)
  markdown = table(rows)
  hang = paper_scale_hang() if args.paper_scale else None
  if hang:
    markdown += (
        f"\nA hung served simulator at the paper defaults (`zerosearch.py:llama3.2-3b`: "
        f"{hang['rows']} chat requests a call, {hang['turns']} calls a step, "
        f"timeout_s={hang['timeout_s']:g}, max_retries={hang['max_retries']}, concurrency="
        f"{hang['concurrency']}, max_failed_steps={hang['failing_steps']}), every limit "
        f"scaled by {hang['scale']:g} and the times divided by it: the first failing step "
        f"takes {hang['first_step_s'] / 60:.1f} min, RL stops after "
        f"{hang['until_stop_s'] / 60:.1f} min ({hang['requests_sent']} of "
        f"{hang['requests']} requests sent, {hang['progress_lines']} progress lines); "
        f"every request waiting out its deadline would take "
        f"{hang['without_the_down_rule_s'] / 3600:.1f} h.\n")
    print(markdown.rsplit("\n\n", 1)[-1])
  print(markdown)
  from zsjax import environment

  summary = {"cases": len(rows), "violations": sum(len(r["violations"]) for r in rows),
             "paper_scale_hang": hang, "environment": environment.describe()}
  if args.out:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fault_drill.md").write_text(markdown)
    (out / "fault_drill.json").write_text(json.dumps({**summary, "rows": rows}, indent=2) + "\n")
  print(json.dumps({k: v for k, v in summary.items() if k != "environment"}))
  return 1 if summary["violations"] else 0


if __name__ == "__main__":
  sys.exit(main())
