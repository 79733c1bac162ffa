"""Every ``--config.*`` override that the README and the config files' docstrings
show gets through ``zsjax.main``'s flag parsing onto its config, and reaches the job."""

import logging
import re
import shlex
from pathlib import Path

import pytest
from absl import flags

from zsjax import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "configs").glob("*.py"))]
SEEN = []


def _commands(text: str) -> list[list[str]]:
  """The ``python -m zsjax.main`` commands of a text, continuation lines joined."""
  text = text.replace("\\\\\n", " ").replace("\\\n", " ")
  out = []
  for line in text.splitlines():
    if "python -m zsjax.main" in line:
      words = shlex.split(line.split("python -m zsjax.main", 1)[1].split("#")[0])
      out.append([w for w in words if w.startswith("--")])
  return out


COMMANDS = [(path.name, words) for path in DOCS for words in _commands(path.read_text())]
# overrides written in prose, e.g. "(rejected with `--config.eval.on_error=raise`)"
# ("--config.seed=N": a placeholder, tried as 1)
PROSE = sorted({re.sub(r"=N$", "=1", m) for path in DOCS
                for m in re.findall(r"`(--config\.[\w.]+=[^`\s]+)`", path.read_text())})


def record(config, workdir):
  SEEN.append(config)
  return {}


def run_main(argv, monkeypatch, tmp_path):
  """``zsjax.main.main`` on ``argv`` (its own flag definitions, on fresh flag values),
  with every job replaced by ``record``: the config the job would get."""
  for job in main.JOBS:
    monkeypatch.setitem(main.JOBS, job, f"{__name__}:record")
  argv = ["zsjax.main"] + [a for a in argv if not a.startswith("--workdir=")] + [
      f"--workdir={tmp_path}"]
  values = flags.FlagValues()
  config, workdir = main.define_flags(values, argv)
  monkeypatch.setattr(main, "_CONFIG", config)
  monkeypatch.setattr(main, "_WORKDIR", workdir)
  values(argv)
  level = logging.getLogger().level
  SEEN.clear()
  try:
    main.main(["zsjax.main"])
  finally:
    logging.getLogger().setLevel(level)
  assert len(SEEN) == 1
  return SEEN[0]


def _value(config, dotted):
  for part in dotted.split("."):
    config = config[part]
  return config


def _check(config, overrides):
  for word in overrides:
    key, _, text = word[len("--config."):].partition("=")
    value = _value(config, key)
    as_text = ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)
    assert as_text == text, (key, value, text)


def test_the_docs_show_commands_and_knobs():
  assert len(COMMANDS) >= 10 and len(PROSE) >= 1
  shown = {w.split("=")[0] for _, words in COMMANDS for w in words}
  for knob in ("--config.rollout.dtype", "--config.rl.scoring_dtype", "--config.sampling.method",
               "--config.simulator.sampling_method", "--config.rollout.attention_view",
               "--config.rl.rollout.dtype"):
    assert knob in shown


@pytest.mark.parametrize("source,argv", COMMANDS, ids=[f"{s}:{' '.join(a)[:60]}"
                                                       for s, a in COMMANDS])
def test_every_documented_command_parses_and_reaches_its_job(source, argv, monkeypatch, tmp_path):
  config = run_main(argv, monkeypatch, tmp_path)
  _check(config, [w for w in argv if w.startswith("--config.")])


@pytest.mark.parametrize("word", PROSE)
def test_every_override_written_in_prose_parses_on_a_config_that_has_it(word, monkeypatch,
                                                                        tmp_path):
  key = word[len("--config."):].partition("=")[0]
  tried = 0
  for path in sorted((ROOT / "configs").glob("*.py")):
    argv = [f"--config={path.relative_to(ROOT)}", word]
    try:
      config = run_main(argv, monkeypatch, tmp_path / path.stem)
    except (flags.Error, KeyError):
      continue  # this config has no such field
    _check(config, [word])
    tried += 1
  assert tried, f"no config file has the field of {word}"
