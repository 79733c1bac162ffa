"""The tiny world's report: what the job's results say and show.

* ``METHODS`` / ``SPLITS``: the rows and columns of the comparison;
* ``controllability``: does the simulator RL trains against control quality,
  on the test questions' queries (``control_queries``), next to BM25;
* ``paired_gains``: each method's test-EM gain over a base, paired by question;
* ``results_table``: ``results.md``; ``plot_runs`` / ``plot_training``: the RL
  curves as PNGs.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np

from zsjax import hf, search, sim_tuning, tinyworld
from zsjax.data import write_jsonl
from zsjax.metrics import read_jsonl
from zsjax.simulator import SimulatorPrompt, parse_documents

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

METHODS = ("warm_start", "direct", "rag", "rl_simulator", "rl_real_search")
SPLITS = ("single_hop", "two_hop", "all")


# Groups of the controllability report's queries: answerable ones first.
CONTROL_GROUPS = ("single_hop_question", "bridge", "two_hop_question", "other_question")
ANSWERABLE = ("single_hop_question", "bridge")


def control_queries(questions: list[dict], titles, seed: int) -> list[dict]:
  """The queries the controllability report asks about each of ``questions``
  (the test split: held out from every stage), as rows ``{question,
  golden_answers, query, subject, group}``: a single-hop question itself; a
  two-hop question itself and its bridge entity (whose document holds the
  answer); and another question of the same relation (a query about the wrong
  entity). ``subject``: the entity the query asks about (the longest of the
  world's ``titles`` in it)."""
  by_length = sorted(titles, key=lambda t: (-len(t), t))

  def subject(query):
    return next((t for t in by_length if t in query), "")

  rng = np.random.default_rng(seed)
  by_relation: dict[str, list[dict]] = {}
  for q in questions:
    by_relation.setdefault(q["relation"], []).append(q)
  rows = []
  for q in questions:
    queries = [(q["question"], "single_hop_question" if q["hops"] == 1 else "two_hop_question")]
    if q["bridge"]:
      queries.append((q["bridge"], "bridge"))
    others = [o for o in by_relation[q["relation"]] if o["question"] != q["question"]]
    if others:
      queries.append((others[rng.integers(len(others))]["question"], "other_question"))
    rows += [{"question": q["question"], "golden_answers": list(q["golden_answers"]),
              "query": query, "subject": subject(query), "group": group}
             for query, group in queries]
  return rows


def answers(documents, subject: str, golds) -> bool:
  """Whether one of ``documents`` answers a query about ``subject``: names it
  and a gold answer in the same document (a document about something else that
  happens to hold the answer's name does not)."""
  return any(subject in d and any(g in d for g in golds) for d in documents)


def controllability(config, workdir: Path, simulator: Path) -> dict:
  """Does the simulator RL trains against control quality? For the test
  questions' queries (``control_queries``), rendered as RL's policy writes them
  and generated as RL generates them (``config.rl.simulator``: temperature and
  token budget, the question and gold answer in the prompt), the share whose
  *useful* and whose *noisy* documents hold the question's gold answer, per
  group, next to the real engine's share (BM25's top-k for the same query). On
  the answerable groups a useful result should hold it and a noisy one should
  not; on ``other_question`` neither should (the answer leaking into a wrong
  query's results would reward miscopied queries)."""
  paths = tinyworld.paths(workdir / "world")
  rows = control_queries(read_jsonl(paths["test_single_hop"]) + read_jsonl(paths["test_two_hop"]),
                         [d["title"] for d in read_jsonl(paths["corpus"])], config.seed)
  cfg, params = hf.load_checkpoint(simulator)
  tokenizer = hf.load_tokenizer(paths["tokenizer"])
  rl = config.rl
  texts = sim_tuning.simulated_documents(
      cfg, params, tokenizer, rows,
      sim_prompt=SimulatorPrompt.from_config(config.simulator_template, config.top_k),
      max_new_tokens=rl.simulator.max_new_tokens, max_query_tokens=rl.rollout.max_query_tokens,
      batch_size=config.eval_batch_size, seed=config.seed, temperature=rl.simulator.temperature,
      sampling_method=rl.simulator.sampling_method)
  engine = search.BM25Engine.from_jsonl(paths["corpus"], top_k=config.top_k)
  real = engine.search([search.SearchRequest(r["query"]) for r in rows]).documents
  holds = sim_tuning.RuleJudge()

  def share(mask, found):
    picked = [f for f, m in zip(found, mask) if m]
    return float(np.mean(picked)) if picked else float("nan")

  documents = {mode: [parse_documents(t, config.top_k) for t in texts[mode]] for mode in texts}
  documents["real"] = [list(d) for d in real]
  found = {}
  for mode, docs in documents.items():
    found[mode] = [holds.useful("", r["golden_answers"], "", d) for r, d in zip(rows, docs)]
    found[f"{mode}_answers"] = [answers(d, r["subject"], r["golden_answers"])
                                for r, d in zip(rows, docs)]
  report = {"simulator": str(simulator), "groups": {}}
  groups = {g: [r["group"] == g for r in rows] for g in CONTROL_GROUPS}
  groups["answerable"] = [r["group"] in ANSWERABLE for r in rows]
  for name, mask in groups.items():
    report["groups"][name] = {"queries": int(sum(mask)),
                              **{mode: share(mask, f) for mode, f in found.items()}}
  write_jsonl(workdir / "simulator_samples.jsonl",
              [dict(r, useful=u, noisy=n) for r, u, n in
               zip(rows[:64], texts["useful"], texts["noisy"])])
  return report


def controllability_table(report: dict) -> str:
  """% of queries whose documents hold the gold answer, and (after the slash)
  whose documents answer the query (``answers``)."""
  lines = ["| queries | n | simulator useful | simulator noisy | real engine (BM25) |",
           "|---|---|---|---|---|"]
  for name, g in report["groups"].items():
    lines.append(f"| {name} | {g['queries']} | " + " | ".join(
        f"{100 * g[mode]:.1f} / {100 * g[mode + '_answers']:.1f}"
        for mode in ("useful", "noisy", "real")) + " |")
  return "\n".join(lines)


def paired_gains(records: list[dict], base: str = "warm_start") -> dict:
  """Each method's test-EM gain over ``base`` on the same questions:
  ``{method: {"em": mean of per-question differences, "stderr": their sample
  standard deviation (ddof 1) over sqrt(n), "n": questions}}``. ``records``: the evaluation's
  predictions (``method``, ``set``, ``id``, ``em``). Pairing removes the spread
  of question difficulty that two independent standard errors would carry."""
  by_method: dict[str, dict] = {}
  for r in records:
    by_method.setdefault(r["method"], {})[(r["set"], r["id"])] = float(r["em"])
  if base not in by_method:
    return {}
  gains = {}
  for method, scores in by_method.items():
    if method == base:
      continue
    if scores.keys() != by_method[base].keys():
      raise ValueError(f"method {method!r} was evaluated on other questions than {base!r}.")
    diff = np.array([scores[q] - by_method[base][q] for q in sorted(scores)])
    stderr = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("nan")
    gains[method] = {"em": float(diff.mean()), "stderr": stderr, "n": int(len(diff))}
  return gains


# How results.md says each method is prompted.
PROMPTS = {
    "warm_start": "the search template (``config.instruction``), BM25 as the engine, greedy",
    "direct": "``evaluate.DIRECT_INSTRUCTION`` and the question, no search (a format in the "
              "warm start's demonstrations)",
    "rag": "``evaluate.RAG_INSTRUCTION``, BM25's top-k documents for the question, then the "
           "question; no further search (a format in the warm start's demonstrations)",
    "rl_simulator": "the search template after RL against the simulator; BM25 at test",
    "rl_real_search": "the search template after RL against BM25",
}


def _gain_line(gains: dict, base: str) -> list[str]:
  if not gains:
    return []
  n = next(iter(gains.values()))["n"]
  return ["", f"All-EM gain over {base}, paired over the same {n} test questions "
          "(± one standard error): " + ", ".join(
              f"{m} {100 * g['em']:+.1f} ± {100 * g['stderr']:.1f}"
              for m, g in gains.items()) + "."]


def results_table(results: dict) -> str:
  lines = ["| method | " + " | ".join(f"{s} EM" for s in SPLITS) + " | all substring EM | "
           "all F1 | searches / question (single, two-hop) |",
           "|---|" + "---|" * (len(SPLITS) + 3)]
  for method in (m for m in METHODS if m in results["methods"]):
    r = results["methods"][method]
    cells = [f"{100 * r[s]['em']:.1f}" for s in SPLITS]
    searches = (f" ({r['single_hop']['searches']:.2f}, {r['two_hop']['searches']:.2f})"
                if "searches" in r["single_hop"] else "")
    cells += [f"{100 * r['all']['substring_em']:.1f}", f"{100 * r['all']['f1']:.1f}",
              f"{r['searches_per_question']:.2f}{searches}"]
    lines.append(f"| {method} | " + " | ".join(cells) + " |")
  lines += _gain_line(results.get("gains_over_warm_start") or {}, "warm_start")
  rag = {m: g for m, g in (results.get("gains_over_rag") or {}).items() if m.startswith("rl_")}
  lines += _gain_line(rag, "rag")
  lines += ["", "Prompts: " + "; ".join(f"{m}: {PROMPTS[m]}" for m in METHODS
                                        if m in results["methods"]) + "."]
  control = results.get("simulator_control")
  if control:
    lines += ["", "Simulator control (test questions' queries as RL writes them; % whose "
              "documents hold the question's gold answer / % with a document that names the "
              "query's subject and the answer):", "", controllability_table(control)]
  warm = results.get("warm_start", {})
  if "reading_nll" in warm:
    stop = {None: "", -1: "; the early stop's check never passed"}.get(
        warm.get("formed_step"), f"; the early stop's check passed at step {warm.get('formed_step')}")
    before = (f"{warm['reading_nll_before']:.3f} -> " if "reading_nll_before" in warm
              else "")  # absent: resumed from a checkpoint that predates keeping it
    lines += ["", f"Warm start: {warm['steps']} steps; held-out reading check (answer NLL on a "
              f"world never demonstrated) {before}{warm['reading_nll']:.3f}"
              + (f" (worst relation {warm['reading_nll_worst']:.3f})"
                 if "reading_nll_worst" in warm else "") + f"{stop}."]
  seconds = results["stage_seconds"]
  lines += ["", "Stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())
            + f"; total {sum(seconds.values()):.0f} s."]
  env = results.get("environment")
  if env:
    lines += ["", f"Machine: {env['cpu']}, {env['cores']} cores; commit {env['commit']}; "
              + ", ".join(f"{k} {v}" for k, v in env["packages"].items()) + "."]
  return "\n".join(lines)


# The RL plots: file name, title, and the metrics drawn (one line each per run).
PLOTS = (("reward_f1", "training reward (F1)", ("reward/f1",)),
         ("reward_em", "training EM", ("reward/em",)),
         ("rollout_searches", "searches per trajectory", ("rollout/searches",)),
         ("searches_by_hops", "searches per trajectory (single-hop, two-hop)",
          ("rollout/searches/single_hop", "rollout/searches/two_hop")),
         ("reward_f1_by_hops", "training reward F1 (single-hop, two-hop)",
          ("reward/f1/single_hop", "reward/f1/two_hop")),
         ("curriculum_p_noise", "noise probability", ("curriculum/p_noise",)))


# The warm start's curves (its metrics.jsonl): x is the sft step.
WARM_START_PLOTS = (("warm_start_check", "warm start: held-out reading check (answer NLL)",
                     ("eval/nll",)),
                    ("warm_start_loss", "warm start: training loss", ("loss/nll",)))


def plot_runs(runs: dict[str, list[dict]], directory: Path, colors: dict | None = None,
              plots=PLOTS, xlabel: str = "RL step") -> list:
  """One PNG per ``plots`` entry (default ``PLOTS``) under ``directory``: a line per
  run (``runs``: label -> metrics.jsonl records) and metric, metrics told apart by
  line style. ``colors``: label -> color (runs of one seed share one). Returns the
  files."""
  directory.mkdir(parents=True, exist_ok=True)
  written = []
  for name, title, keys in plots:
    if not any(k in rec for records in runs.values() for rec in records for k in keys):
      continue
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, records in runs.items():
      for key, style in zip(keys, ("-", "--")):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
          suffix = f" {key.rsplit('/', 1)[-1]}" if len(keys) > 1 else ""
          ax.plot(*zip(*points), style, label=label + suffix,
                  color=(colors or {}).get(label))
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(directory / f"{name}.png", dpi=100)
    plt.close(fig)
    written.append(directory / f"{name}.png")
  return written


def plot_training(workdir: Path) -> None:
  """``plot_runs`` of RL against the simulator and against BM25 into ``WORKDIR/plots``."""
  runs = {name: read_jsonl(workdir / name / "metrics.jsonl")
          for name in ("rl_simulator", "rl_real_search")
          if (workdir / name / "metrics.jsonl").exists()}
  plot_runs(runs, workdir / "plots")


__all__ = ["METHODS", "SPLITS", "CONTROL_GROUPS", "ANSWERABLE", "PROMPTS", "PLOTS",
           "WARM_START_PLOTS",
           "control_queries", "answers", "controllability", "controllability_table",
           "paired_gains", "results_table", "plot_runs", "plot_training"]
