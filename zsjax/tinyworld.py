"""The tiny world: a seeded synthetic encyclopedia, its questions and its tokenizer.

Everything the offline default needs is generated here from one seed, nothing is
downloaded:

* entities: people, cities, countries, films and organizations, with made-up
  names (no real-world facts to lean on) drawn from fixed per-kind pools of
  syllable words shared by all worlds (``name_pools``);
* typed relations: a person was *born in* a city and *works for* an
  organization; a city is *located in* a country; a film was *directed by* a
  person; an organization was *founded in* a city;
* one short encyclopedia-style document per entity, stating its relations;
* single-hop questions (one relation) and two-hop questions (a chain of two:
  "In which country was X born?"), each with gold answers and aliases;
* train / dev / test splits, disjoint in questions;
* a version (``WorldSize.version``, ``WORLD_VERSIONS``): how questions and film titles
  are phrased; version 1 stays the worlds earlier results were measured on;
* a byte-level BPE tokenizer trained on the world's text and the template's,
  saved in HF format; the template's tags are ordinary text (several tokens),
  and every pool word is one token (``build`` checks it).

``build(directory, seed)`` writes ``corpus.jsonl`` (``{"id", "title", "kind", "contents"}``),
``{train,dev,test}.parquet`` (``zsjax.data`` columns plus ``hops``, ``bridge``
and ``relation``),
``tokenizer/`` and ``world.json``; ``ensure`` reuses a directory already built
with the same settings.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import datasets
import ml_collections
import numpy as np

from zsjax import simulator, template
from zsjax.data import write_jsonl

_ONSETS = ["b", "br", "c", "d", "dr", "f", "g", "gr", "h", "k", "l", "m", "n", "p", "r", "s",
           "st", "t", "th", "v", "z"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "io"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "m", "k"]
_FILM_WORDS = ["Silent", "Golden", "Last", "Hidden", "Broken", "Distant", "Crimson", "Quiet",
               "Iron", "Winter", "Paper", "Glass", "Burning", "Northern", "Lost", "Open"]
_FILM_NOUNS = ["Harbor", "Garden", "River", "Mirror", "Road", "Letter", "Tower", "Season",
               "Island", "Bridge", "Voyage", "Promise", "Lantern", "Forest", "Echo", "Orchard"]
_ORG_KINDS = ["Guild", "Institute", "Company", "Society", "Foundation", "Works", "Trust"]
_JOBS = ["painter", "engineer", "writer", "chemist", "architect", "composer", "historian",
         "physician", "sculptor", "economist"]


@dataclasses.dataclass(frozen=True)
class WorldSize:
  countries: int = 6
  cities: int = 24
  people: int = 80
  films: int = 30
  organizations: int = 16
  test_fraction: float = 0.15
  dev_fraction: float = 0.1
  vocab_size: int = 1536
  # The world's phrasing (WORLD_VERSIONS, PHRASINGS): 1, the worlds of tiny world v2
  # and v3; 2, facts as fields that questions name, one-word film titles (tiny world
  # v4); 3, version 2 with fields that restate their subject (v5); 4, version 3 with
  # one field a document; 5, each name right after its subject and field.
  version: int = 1

  @classmethod
  def from_config(cls, section) -> "WorldSize":
    """From a ``config.world`` section (configs/tiny_world.py)."""
    return cls(**(section.to_dict() if hasattr(section, "to_dict") else dict(section)))


# Every world draws its names from fixed pools of made-up words, one pool per
# kind of name (countries, cities, people, organizations), and the
# world's tokenizer holds each pool word as a single token. So a 2-layer model
# copies a name (into a query, an answer, a document) as one token instead of
# spelling out syllables, and can tell a city from a person by the word itself
# (the skills a real LLM brings; a model this small does not learn them in
# minutes). Worlds differ in which words name what and in every relation, so
# nothing about one world's facts carries over to another.
POOL_SIZES = {"country": 24, "city": 64, "person": 224, "organization": 40}
# Version 2 worlds also name films from a pool ("Vorath"); drawn after the others,
# so the four pools above are the same words in every version.
FILM_POOL_SIZE = 48
_POOL_SEED = 20260917

# What a world's version changes (WorldSize.version). Version 1's reading failed
# relation by relation (experiments/results/tiny_world_v3): the relations whose answer
# follows " in" in its document (born in, located in, founded in) formed first and
# together, and a film's director ("directed by") or an employer ("works for") did not
# form on some runs. A version 2 document states each fact as a field ("Birthplace:
# Baibrer"), every question names its field ("What is the birthplace of X?"), so one
# skill reads every relation: find the question's field in the document, copy the
# name after it; film titles are one word, first in their document as every subject.
WORLD_VERSIONS = {
    1: "the worlds of tiny world v2 and v3: facts in sentences ('X was born in Y')",
    2: "facts as fields ('Birthplace: Y') that questions name ('What is the birthplace of X?'); "
       "one-word film titles from their own pool",
    3: "version 2 with fields that restate their subject in the question's words ('Employer "
       "of X: Y' for 'What is the employer of X?'); not yet measured end to end",
    4: "version 3 with one field a document: a person's birthplace and employer in two "
       "documents, each with the person's job; being measured",
    5: "each field's name right after its subject, the value right after it ('Liomves employer "
       "Thulbon'), so the two words before a field's value say whose and which it is; one-word "
       "fields ('headquarters' for an organization's founding city); being measured",
}
# Per version: each kind's document and each relation's question (``s``: the subject).
PHRASINGS = {
    1: {"country": "{s} is a country. Its cities include {cities}.",
        "city": "{s} is a city located in {country}.",
        "person": "{s} is a {job} born in {city}. {s} works for {org}.",
        "film": "{s} is a {year} film directed by {person}.",
        "organization": "{s} is an organization founded in {city} in {year}.",
        "born_in": "Where was {s} born?", "works_for": "Who does {s} work for?",
        "birth_country": "In which country was {s} born?",
        "employer_city": "In which city was the employer of {s} founded?",
        "located_in": "In which country is {s} located?", "directed_by": "Who directed {s}?",
        "director_birthplace": "Where was the director of {s} born?",
        "founded_in": "In which city was {s} founded?",
        "founded_country": "In which country was {s} founded?"},
    2: {"country": "{s} is a country. Cities: {cities}.",
        "city": "{s} is a city. Country: {country}.",
        "person": "{s} is {article} {job}. Birthplace: {city}. Employer: {org}.",
        "film": "{s} is a film from {year}. Director: {person}.",
        "organization": "{s} is an organization from {year}. Founding city: {city}.",
        "born_in": "What is the birthplace of {s}?", "works_for": "What is the employer of {s}?",
        "birth_country": "What is the country of the birthplace of {s}?",
        "employer_city": "What is the founding city of the employer of {s}?",
        "located_in": "What is the country of {s}?", "directed_by": "Who is the director of {s}?",
        "director_birthplace": "What is the birthplace of the director of {s}?",
        "founded_in": "What is the founding city of {s}?",
        "founded_country": "What is the country of the founding city of {s}?"},
}
# Version 3: a version 2 warm start on seed 0 (two cores) answered another document's
# employer on 16 of 23 held-out employer questions (experiments/answer_choice.py,
# experiments/results/tiny_world_v4/diagnosis): it found the field, not the person's
# document. Each field names its subject, so the question's "employer of X" stands in
# X's document right before the answer.
PHRASINGS[3] = dict(
    PHRASINGS[2],
    country="{s} is a country. Cities of {s}: {cities}.",
    city="{s} is a city. Country of {s}: {country}.",
    person="{s} is {article} {job}. Birthplace of {s}: {city}. Employer of {s}: {org}.",
    film="{s} is a film from {year}. Director of {s}: {person}.",
    organization="{s} is an organization from {year}. Founding city of {s}: {city}.")
# Version 4: the v3/v4 warm starts that left a relation behind left a person's birthplace
# or employer, the two fields of one document, answering with the other field of Doc 1 or
# the same field of another document (experiments/answer_choice.py, tiny_world_v4 "Stop
# 43"). With one fact a document every answer is the one name its document states.
PHRASINGS[4] = dict(
    PHRASINGS[3],
    person="{s} is {article} {job}. Birthplace of {s}: {city}.",
    person_employer="{s} is {article} {job}. Employer of {s}: {org}.")
# Version 5: the v5 (cite) warm starts that left a relation behind left one of the
# person's two fields, whose clauses ("Birthplace of Liomves:", "Employer of Liomves:")
# end in the same two tokens, so the quote and its document agree on the name only four
# tokens back. Here the two tokens before each name are its subject and its field
# ("Liomves employer Thulbon"), a match a two-layer model makes with one head a token
# back in each of its layers; every field is one word, so an organization's founding
# city is its "headquarters".
PHRASINGS[5] = dict(
    PHRASINGS[2],
    country="{s} is a country. {s} cities {cities}.",
    city="{s} is a city. {s} country {country}.",
    person="{s} is {article} {job}. {s} birthplace {city}. {s} employer {org}.",
    film="{s} is a film from {year}. {s} director {person}.",
    organization="{s} is an organization from {year}. {s} headquarters {city}.",
    employer_city="What is the headquarters of the employer of {s}?",
    founded_in="What is the headquarters of {s}?",
    founded_country="What is the country of the headquarters of {s}?")


def size_record(size: WorldSize) -> dict:
  """``size`` as recorded (``world.json``, a generated world's ``"size"``): version 1
  worlds leave the version out, so they record what they did before versions existed."""
  record = dataclasses.asdict(size)
  if record["version"] == 1:
    del record["version"]
  return record


def _syllable_word(rng: np.random.Generator) -> str:
  parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(2)]
  return "".join(parts).capitalize()


def name_pools(version: int = 1) -> dict[str, list[str]]:
  """The shared pools of name words, by kind (fixed; independent of the seed); a
  version 2 world's also hold ``"film"``."""
  rng = np.random.default_rng(_POOL_SEED)
  seen = {w.lower() for w in _FILM_WORDS + _FILM_NOUNS + _ORG_KINDS + _JOBS}
  pools = {}
  sizes = dict(POOL_SIZES, **({"film": FILM_POOL_SIZE} if version >= 2 else {}))
  for kind, n in sizes.items():
    pools[kind] = []
    while len(pools[kind]) < n:
      word = _syllable_word(rng)
      if word.lower() not in seen and len(word) <= 9:
        seen.add(word.lower())
        pools[kind].append(word)
  return pools


def generate(seed: int, size: WorldSize = WorldSize()) -> dict:
  """The world as plain data: entities, relations, documents and questions."""
  if size.version not in WORLD_VERSIONS:
    raise ValueError(f"WorldSize.version={size.version} (config.world.version) is not one of "
                     f"{sorted(WORLD_VERSIONS)}: {WORLD_VERSIONS}.")
  pools = name_pools(size.version)
  pooled_films = "film" in pools  # name_pools says which versions name films from a pool
  need = {"country": size.countries, "city": size.cities, "person": size.people,
          "organization": size.organizations, **({"film": size.films} if pooled_films else {})}
  for kind, n in need.items():
    if n > len(pools[kind]):
      raise ValueError(f"WorldSize {size} needs {n} distinct {kind} names but the shared "
                       f"pool holds {len(pools[kind])}: make the world smaller.")
  if not pooled_films and size.films > len(_FILM_WORDS) * len(_FILM_NOUNS):
    raise ValueError(f"WorldSize.films={size.films} exceeds the "
                     f"{len(_FILM_WORDS) * len(_FILM_NOUNS)} distinct film titles.")
  rng = np.random.default_rng(seed)

  def draw(kind):
    return [pools[kind][i] for i in rng.permutation(len(pools[kind]))[:need[kind]]]

  countries, cities = draw("country"), draw("city")
  people, orgs = draw("person"), draw("organization")
  used: set[str] = set()

  def fresh(make):
    while True:
      name = make()
      if name not in used:
        used.add(name)
        return name

  if pooled_films:
    films = draw("film")  # one word, first in its document like every other subject
  else:
    films = [fresh(lambda: f"The {rng.choice(_FILM_WORDS)} {rng.choice(_FILM_NOUNS)}")
             for _ in range(size.films)]

  city_country = {c: countries[i % len(countries)] if i < len(countries) else
                  str(rng.choice(countries)) for i, c in enumerate(cities)}
  born_in = {p: str(rng.choice(cities)) for p in people}
  works_for = {p: str(rng.choice(orgs)) for p in people}
  job = {p: str(rng.choice(_JOBS)) for p in people}
  directed_by = {f: str(rng.choice(people)) for f in films}
  founded_in = {o: str(rng.choice(cities)) for o in orgs}
  year = {o: int(rng.integers(1820, 2000)) for o in orgs}
  film_year = {f: int(rng.integers(1950, 2020)) for f in films}

  org_kind = {o: str(rng.choice(_ORG_KINDS)) for o in orgs}
  # Aliases: an organization's full name ("Diogoth Guild"), a country's formal one.
  aliases = {o: [f"{o} {org_kind[o]}"] for o in orgs}
  aliases.update({c: [f"Republic of {c}"] for c in countries})

  text = PHRASINGS[size.version]
  docs = []
  for c in countries:
    members = [x for x in cities if city_country[x] == c]
    docs.append((c, text["country"].format(s=c, cities=", ".join(members))))
  for c in cities:
    docs.append((c, text["city"].format(s=c, country=city_country[c])))
  for p in people:
    article = "an" if job[p][0] in "aeiou" else "a"
    docs.append((p, text["person"].format(s=p, job=job[p], article=article, city=born_in[p],
                                          org=works_for[p])))
    if "person_employer" in text:  # one fact a document (version 4)
      docs.append((p, text["person_employer"].format(s=p, job=job[p], article=article,
                                                     org=works_for[p])))
  for f in films:
    docs.append((f, text["film"].format(s=f, year=film_year[f], person=directed_by[f])))
  for o in orgs:
    docs.append((o, text["organization"].format(s=o, city=founded_in[o], year=year[o])))

  kind = {**{c: "country" for c in countries}, **{c: "city" for c in cities},
          **{p: "person" for p in people}, **{f: "film" for f in films},
          **{o: "organization" for o in orgs}}

  def golds(entity):
    return [entity] + aliases.get(entity, [])

  def ask(relation, subject, answer, hops=1, bridge=""):
    return (relation, text[relation].format(s=subject), golds(answer), hops, bridge)

  # (relation, question, gold answers, hops, bridge entity of a two-hop chain or "")
  questions = []
  for p in people:
    questions.append(ask("born_in", p, born_in[p]))
    questions.append(ask("works_for", p, works_for[p]))
    questions.append(ask("birth_country", p, city_country[born_in[p]], 2, born_in[p]))
    questions.append(ask("employer_city", p, founded_in[works_for[p]], 2, works_for[p]))
  for c in cities:
    questions.append(ask("located_in", c, city_country[c]))
  for f in films:
    questions.append(ask("directed_by", f, directed_by[f]))
    questions.append(ask("director_birthplace", f, born_in[directed_by[f]], 2, directed_by[f]))
  for o in orgs:
    questions.append(ask("founded_in", o, founded_in[o]))
    questions.append(ask("founded_country", o, city_country[founded_in[o]], 2, founded_in[o]))

  order = rng.permutation(len(questions))
  n_test = int(round(size.test_fraction * len(questions)))
  n_dev = int(round(size.dev_fraction * len(questions)))
  split_of = {}
  for rank, i in enumerate(order):
    split_of[int(i)] = "test" if rank < n_test else "dev" if rank < n_test + n_dev else "train"
  rows = {"train": [], "dev": [], "test": []}
  for i, (relation, question, answers, hops, bridge) in enumerate(questions):
    rows[split_of[i]].append({"id": f"tw-{i}", "question": question, "golden_answers": answers,
                              "data_source": "single_hop" if hops == 1 else "two_hop",
                              "hops": hops, "bridge": bridge,
                              "relation": relation})
  return {"seed": seed, "size": size_record(size),
          "corpus": [{"id": f"doc-{i}", "title": t, "kind": kind[t], "contents": text}
                     for i, (t, text) in enumerate(docs)],
          "splits": rows}


def train_tokenizer(texts, vocab_size: int, directory: str | Path):
  """A byte-level BPE tokenizer trained on ``texts``, saved as an HF tokenizer
  directory (``<|endoftext|>`` is EOS and padding); returns the loaded tokenizer."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      special_tokens=["<|endoftext|>"], show_progress=False))
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                 pad_token="<|endoftext|>")
  fast.save_pretrained(str(directory))
  return fast


def build(directory: str | Path, seed: int, size: WorldSize = WorldSize()) -> dict:
  """Writes the world to ``directory``; returns the paths as a dict."""
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  world = generate(seed, size)
  write_jsonl(directory / "corpus.jsonl", world["corpus"])
  for split, rows in world["splits"].items():
    datasets.Dataset.from_list(rows).to_parquet(str(directory / f"{split}.parquet"))
  for hops, name in ((1, "single_hop"), (2, "two_hop")):
    write_jsonl(directory / f"test_{name}.jsonl",
                [r for r in world["splits"]["test"] if r["hops"] == hops])
  texts = [d["contents"] for d in world["corpus"]]
  texts += [r["question"] for rows in world["splits"].values() for r in rows]
  texts += [template.INSTRUCTION, template.INVALID_ACTION_FEEDBACK,
            template.render_observation(["Doc text."]), simulator.DEFAULT_TEMPLATE,
            "<think> I need to look this up. </think><search> query </search>"
            "<answer> answer </answer>"]
  # Every pool word (after a space, as names appear in text) becomes one token.
  pool = [w for words in name_pools(size.version).values() for w in words]
  texts = texts * 3 + [" " + " ".join(pool)] * 20
  tokenizer = train_tokenizer(texts, size.vocab_size, directory / "tokenizer")
  split = [w for w in pool if len(tokenizer.tokenize(" " + w)) != 1]
  if split:
    raise ValueError(
        f"WorldSize.vocab_size={size.vocab_size} is too small to hold every name word as "
        f"one token ({len(split)} of {len(pool)} split, e.g. {split[:3]}): raise it.")
  meta = {"seed": seed, "size": size_record(size),
          "counts": {k: len(v) for k, v in world["splits"].items()},
          "documents": len(world["corpus"])}
  (directory / "world.json").write_text(json.dumps(meta, indent=2) + "\n")
  return paths(directory)


def paths(directory: str | Path) -> dict:
  directory = Path(directory)
  return {"corpus": str(directory / "corpus.jsonl"), "tokenizer": str(directory / "tokenizer"),
          **{split: str(directory / f"{split}.parquet") for split in ("train", "dev", "test")},
          "test_single_hop": str(directory / "test_single_hop.jsonl"),
          "test_two_hop": str(directory / "test_two_hop.jsonl")}


def fill_missing_data(config, workdir: str | Path, section: str, field: str,
                      value: Callable[[dict], str]):
  """A job's data when none is given: with ``config.synthetic_data`` set and
  ``config[section][field]`` (the job's data, e.g. ``data``, ``train_files``)
  empty, a copy of the config whose field is ``value(paths)`` of a tiny world
  built in ``WORKDIR/world`` (for ``config.seed``), and whose ``tokenizer`` and
  ``engine.corpus`` are the world's where the config gives none. Otherwise the
  config itself."""
  if not config.synthetic_data or config[section][field]:
    return config
  from zsjax.workdir import holds_checkpoint  # a world under a checkpoint is not rebuilt
  world = ensure(Path(workdir) / "world", config.seed,
                 rebuild=not holds_checkpoint(Path(workdir)))
  config = ml_collections.ConfigDict(config.to_dict())
  config[section][field] = value(world)
  config.tokenizer = config.tokenizer or world["tokenizer"]
  config.engine.corpus = config.engine.corpus or world["corpus"]
  return config


def ensure(directory: str | Path, seed: int, size: WorldSize = WorldSize(),
           rebuild: bool = True) -> dict:
  """``build`` unless ``directory`` already holds this seed's world. A directory
  holding another world is rebuilt only with ``rebuild``; otherwise (a run's
  checkpoint was trained on it) a ValueError names both seeds."""
  meta = Path(directory) / "world.json"
  if meta.exists():
    old = json.loads(meta.read_text())
    if old.get("seed") == seed and old.get("size") == size_record(size):
      return paths(directory)
    if not rebuild:
      raise ValueError(
          f"{directory} holds the tiny world of seed {old.get('seed')} (size {old.get('size')}), "
          f"and this run asks for seed {seed} (size {size_record(size)}). The run's "
          f"checkpoints were trained on that world and its tokenizer: rebuilding it in place "
          f"would resume them on other data. Use a new --workdir, or "
          f"--config.seed={old.get('seed')}.")
  return build(directory, seed, size)


__all__ = ["WorldSize", "WORLD_VERSIONS", "PHRASINGS", "name_pools", "size_record", "generate",
           "train_tokenizer", "build", "paths", "ensure", "fill_missing_data"]
