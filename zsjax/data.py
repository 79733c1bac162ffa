"""Question-answering data on ``datasets``: one row format for every source.

Every loader returns a ``datasets.Dataset`` with the columns

  id             str, unique within the dataset (made from source and row when absent)
  question       str
  golden_answers list[str], at least one
  data_source    str  (e.g. "nq", "hotpotqa"; the file's stem when absent)

from any of these row formats, found row by row:

* the common QA format: ``question``, ``golden_answers`` (a list or one string),
  optional ``id``;
* the reference training parquet (Search-R1 / ZeroSearch): ``data_source``,
  ``prompt`` (chat messages), ``golden_answers`` and/or
  ``reward_model.ground_truth.target``, ``extra_info.index``, often ``question``.
  The question is the ``question`` column when present, else the text after the
  last ``Question:`` of the prompt's user message (never the prompt's worked
  example, and never another row's question).

Files are .jsonl, .json or .parquet; .jsonl and .json may be gzip-compressed
(``.jsonl.gz``). Text must be UTF-8: a line that is not is a malformed row
(skipped or raised like any other, naming the byte), and a UTF-16 file is named
with the command that converts it.

Malformed rows (no question, no gold answer, wrong types, bad JSON, bytes that
are not UTF-8) are reported with file, row and field; ``on_error="skip"`` drops them with a logged warning
and lists them in a ``LoadReport``, ``"raise"`` stops at the first one. Nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import os
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import datasets
import numpy as np

COLUMNS = ("id", "question", "golden_answers", "data_source")
ON_ERROR = ("skip", "raise")


class DataError(ValueError):
  """A malformed file or row; the message names the file, row and field."""


@dataclasses.dataclass
class LoadReport:
  """What a load kept and what it skipped (``(file, row, reason)`` per skipped row)."""

  source: str
  kept: int = 0
  skipped: list[tuple[str, int, str]] = dataclasses.field(default_factory=list)

  def summary(self) -> str:
    return f"{self.source}: kept {self.kept} rows, skipped {len(self.skipped)}"


def _nested(row: Mapping[str, Any], *keys):
  value: Any = row
  for key in keys:
    if not isinstance(value, Mapping) or key not in value:
      return None
    value = value[key]
  return value


def _answers(value, field: str) -> list[str]:
  if value is None:
    return []
  if isinstance(value, str):
    value = [value]
  if hasattr(value, "tolist"):  # numpy arrays from parquet
    value = value.tolist()
  if not isinstance(value, (list, tuple)):
    raise DataError(f"field {field!r} is a {type(value).__name__}; expected a list of strings")
  out = []
  for a in value:
    if not isinstance(a, (str, int, float)) or isinstance(a, bool):
      raise DataError(f"field {field!r} holds a {type(a).__name__}; expected strings")
    if str(a).strip():
      out.append(str(a).strip())
  return out


def _question_from_prompt(prompt) -> str | None:
  if hasattr(prompt, "tolist"):
    prompt = prompt.tolist()
  if isinstance(prompt, str):
    text = prompt
  elif isinstance(prompt, (list, tuple)):
    users = [m.get("content", "") for m in prompt if isinstance(m, Mapping)
             and m.get("role") == "user"]
    text = users[-1] if users else ""
  else:
    return None
  if "Question:" not in text:
    return None
  question = text.rsplit("Question:", 1)[1].strip().split("\n")[0].strip()
  return question or None


def normalize_row(row: Mapping[str, Any], *, source: str, index: int) -> dict:
  """One row in the common format; raises ``DataError`` naming the field."""
  if not isinstance(row, Mapping):
    raise DataError(f"row is a {type(row).__name__}, not an object")
  question = row.get("question")
  if question is None and "prompt" in row:
    question = _question_from_prompt(row["prompt"])
    if question is None:
      raise DataError("field 'prompt' holds no 'Question:' line and there is no 'question' field")
  if not isinstance(question, str) or not question.strip():
    raise DataError(f"field 'question' is {question!r}; expected a non-empty string")
  golds = _answers(row.get("golden_answers"), "golden_answers")
  if not golds:
    golds = _answers(_nested(row, "reward_model", "ground_truth", "target"),
                     "reward_model.ground_truth.target")
  if not golds:
    raise DataError("no gold answer: 'golden_answers' and 'reward_model.ground_truth.target' "
                    "are missing or empty")
  data_source = row.get("data_source") or source
  if not isinstance(data_source, str):
    raise DataError(f"field 'data_source' is {data_source!r}; expected a string")
  row_id = row.get("id")
  if row_id is None:
    extra = _nested(row, "extra_info", "index")
    row_id = f"{data_source}-{extra if extra is not None else index}"
  return {"id": str(row_id), "question": question.strip(), "golden_answers": golds,
          "data_source": data_source}


GZIP_MAGIC = b"\x1f\x8b"


def file_kind(path: Path) -> tuple[str, bool]:
  """``(suffix, gzip-compressed)``: ``data.jsonl.gz`` is ``(".jsonl", True)``."""
  suffixes = [x.lower() for x in path.suffixes]
  compressed = bool(suffixes) and suffixes[-1] == ".gz"
  if compressed:
    suffixes = suffixes[:-1]
  if not compressed and path.is_file():
    with open(path, "rb") as f:
      compressed = f.read(2) == GZIP_MAGIC  # compressed without saying so
  return (suffixes[-1] if suffixes else ""), compressed


def _stem(path: Path) -> str:
  """The file's name without its suffixes' data part: ``nq.jsonl.gz`` -> ``nq``."""
  name = path.name[:-3] if path.name.lower().endswith(".gz") else path.name
  return Path(name).stem


def _open_bytes(path: Path):
  """The file's bytes (decompressed when gzip); a UTF-16 file is refused, named."""
  _, compressed = file_kind(path)
  f = gzip.open(path, "rb") if compressed else open(path, "rb")
  try:
    head = f.read(4)
  except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile, a truncated archive
    f.close()
    raise _broken_gzip(path, e) from None
  if head[:2] in (b"\xff\xfe", b"\xfe\xff") or (len(head) == 4 and (
      head[1] == 0 and head[3] == 0 or head[0] == 0 and head[2] == 0)):
    f.close()
    raise DataError(f"{path}: the file is UTF-16, not UTF-8 text. Convert it, e.g. iconv -f "
                    f"UTF-16 -t UTF-8 {path} > {path.with_name('utf8_' + path.name)}")
  f.seek(0)
  return f


def _utf8(raw: bytes) -> str:
  """``raw`` decoded; a DataError naming the first byte that is not UTF-8."""
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of "
                    "the line); re-encode the file as UTF-8 (e.g. iconv -f latin1 -t "
                    "UTF-8)") from None


def _broken_gzip(path: Path, error: BaseException) -> DataError:
  return DataError(f"{path}: not a readable gzip file ({type(error).__name__}: {error}); it "
                   "may be truncated. Compress it again, or give the uncompressed file.")


def text_lines(path: str | Path) -> Iterable[tuple[int, str | DataError]]:
  """``(line number, text or DataError)`` of a UTF-8 text file (gzip or not), one
  line at a time: a line that is not UTF-8 is that line's error, not the file's.
  A gzip file that breaks off raises a DataError naming it."""
  path = Path(path)
  with _open_bytes(path) as f:
    lines = enumerate(f, 1)
    while True:
      try:
        number, raw = next(lines)
      except StopIteration:
        return
      except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise _broken_gzip(path, e) from None
      if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # a byte-order mark is not part of line 1
      try:
        yield number, _utf8(raw)
      except DataError as e:
        yield number, e


def _raw_rows(path: Path) -> Iterable[tuple[int, Any]]:
  """``(row number, row or DataError)`` of a jsonl/json/parquet file (rows from 1)."""
  suffix, _ = file_kind(path)
  if suffix == ".jsonl":
    for number, line in text_lines(path):
      if isinstance(line, DataError):
        yield number, line
        continue
      if not line.strip():
        continue
      try:
        yield number, json.loads(line)
      except json.JSONDecodeError as e:
        yield number, DataError(f"invalid JSON ({e.msg} at column {e.colno})")
  elif suffix == ".json":
    try:
      with _open_bytes(path) as f:
        try:
          raw = f.read()
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
          raise _broken_gzip(path, e) from None
      text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
      line = raw[:e.start].count(b"\n") + 1
      raise DataError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}); "
                      "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t UTF-8).") from None
    try:
      rows = json.loads(text)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") \
          from None
    if isinstance(rows, Mapping) and "data" in rows:
      rows = rows["data"]
    if not isinstance(rows, list):
      raise DataError(f"{path}: a .json file must hold a list of rows (or {{'data': [...]}})")
    yield from enumerate(rows, 1)
  elif suffix == ".parquet":
    try:
      table = datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
    except Exception as e:  # pyarrow's errors do not name the file
      raise DataError(f"{path}: not a readable parquet file ({type(e).__name__}: {e}); "
                      "rewrite it (e.g. datasets.Dataset.to_parquet).") from None
    columns = set(table.column_names)
    if not (columns & {"question", "prompt"}) or not (
        columns & {"golden_answers", "reward_model"}):
      raise DataError(
          f"{path}: columns {sorted(columns)} hold no question ('question' or 'prompt') or no "
          "gold answers ('golden_answers' or 'reward_model'); expected the common QA format "
          "(question, golden_answers) or the Search-R1 training format (data_source, prompt, "
          "reward_model, golden_answers).")
    yield from enumerate(table, 1)
  else:
    raise DataError(f"{path}: unknown file type {suffix!r}; use .jsonl, .json or .parquet "
                    "(.jsonl and .json may be gzip-compressed: .jsonl.gz)")


def load_qa(sources: str | Path | Sequence[str | Path], *, on_error: str = "skip",
            limit: int | None = None, data_source: str | None = None,
            report: list | None = None,
            check: Callable[[dict], None] | None = None) -> datasets.Dataset:
  """Loads and merges local QA files (common or training format) into one
  ``datasets.Dataset`` with ``COLUMNS``. Row ids are made unique across files.

  ``limit``: keep the first ``limit`` good rows of each file. ``report``: a list
  that receives one ``LoadReport`` per file. ``check(row)``: the caller's own test
  of a normalized row (e.g. ``rollout.row_check``: it fits the prompt width); a
  ``DataError`` it raises is handled like a malformed row, by ``on_error``."""
  if on_error not in ON_ERROR:
    raise ValueError(f"on_error={on_error!r} is not one of {ON_ERROR}.")
  if isinstance(sources, (str, Path)):
    # One existing path is taken whole (it may hold a comma); otherwise a
    # comma-separated list of paths.
    whole = Path(sources)
    sources = [whole] if whole.is_file() else [s for s in str(sources).split(",") if s]
  rows: list[dict] = []
  seen: set[str] = set()
  for source in sources:
    path = Path(source)
    if not path.exists():
      raise DataError(f"data file {str(path)!r} does not exist; give a local .jsonl, .json or "
                      ".parquet path (nothing is downloaded).")
    file_report = LoadReport(str(path))
    for number, raw in _raw_rows(path):
      if limit is not None and file_report.kept >= limit:
        break
      try:
        if isinstance(raw, DataError):
          raise raw
        row = normalize_row(raw, source=data_source or _stem(path), index=number - 1)
        if check is not None:
          check(row)
      except DataError as e:
        message = f"{path}, row {number}: {e}"
        if on_error == "raise":
          raise DataError(message + " (on_error='skip' drops such rows with a warning)") from None
        logging.warning("skipping %s", message)
        file_report.skipped.append((str(path), number, str(e)))
        continue
      if row["id"] in seen:  # ids collide across sources (the reference numbering does)
        row["id"] = f"{row['id']}@{_stem(path)}:{number}"
      seen.add(row["id"])
      rows.append(row)
      file_report.kept += 1
    if file_report.skipped:
      logging.warning("%s", file_report.summary())
    if report is not None:
      report.append(file_report)
  if not rows:
    raise DataError(f"no usable rows in {[str(s) for s in sources]}.")
  features = datasets.Features({"id": datasets.Value("string"),
                                "question": datasets.Value("string"),
                                "golden_answers": datasets.Sequence(datasets.Value("string")),
                                "data_source": datasets.Value("string")})
  return datasets.Dataset.from_list(rows, features=features)


def _check_sft_row(row, where: str) -> None:
  for field in ("prompt", "target"):
    value = row.get(field) if isinstance(row, Mapping) else None
    if not isinstance(value, str) or not value.strip():
      raise DataError(f"{where}: field {field!r} is {value!r}; expected a non-empty string")


def load_sft(source: str | Path, *, on_error: str = "skip") -> dict[str, datasets.Dataset]:
  """Supervised examples by split: a ``datasets`` directory (``save_to_disk`` of a
  ``DatasetDict``, or of one ``Dataset`` with a ``split`` column) or a
  jsonl/json/parquet file; rows need string ``prompt`` and ``target`` (a
  ``split`` column, when present, assigns rows; otherwise all are ``train``)."""
  if on_error not in ON_ERROR:
    raise ValueError(f"on_error={on_error!r} is not one of {ON_ERROR}.")
  path = Path(source)
  if not path.exists():
    raise DataError(f"SFT data {str(path)!r} does not exist; give a datasets directory or a "
                    ".jsonl / .json / .parquet file.")
  if path.is_dir():
    loaded = datasets.load_from_disk(str(path))
    raw = {name: list(enumerate(split, 1)) for name, split in loaded.items()} \
        if isinstance(loaded, datasets.DatasetDict) else {"": list(enumerate(loaded, 1))}
  else:
    raw = {"": list(_raw_rows(path))}
  by_split: dict[str, list[dict]] = {}
  for split_name, rows in raw.items():
    for number, row in rows:
      where = f"{path}{'[' + split_name + ']' if split_name else ''}, row {number}"
      try:
        if isinstance(row, DataError):
          raise DataError(f"{where}: {row}")
        _check_sft_row(row, where)
      except DataError as e:
        if on_error == "raise":
          raise
        logging.warning("skipping %s", e)
        continue
      name = split_name or str(row.get("split") or "train")
      by_split.setdefault(name, []).append(dict(row))
  if not by_split:
    raise DataError(f"no usable SFT rows in {path}.")
  return {name: datasets.Dataset.from_list(rows) for name, rows in by_split.items()}


# The seven evaluation sets (METHOD.md §8): FlashRAG's hub copies in the common format,
# the split the paper evaluates, and whether the set is multi-hop.
BENCHMARKS = {
    "nq": ("nq", "test", False), "triviaqa": ("triviaqa", "test", False),
    "popqa": ("popqa", "test", False), "hotpotqa": ("hotpotqa", "dev", True),
    "2wikimultihopqa": ("2wikimultihopqa", "dev", True), "musique": ("musique", "dev", True),
    "bamboogle": ("bamboogle", "test", True)}
HUB_REPO = "RUC-NLPIR/FlashRAG_datasets"


def load_benchmark(name: str, path: str | Path = "", *, on_error: str = "skip",
                   report: list | None = None,
                   check: Callable[[dict], None] | None = None) -> datasets.Dataset:
  """One evaluation set: from a local file (any format ``load_qa`` reads) or, with no
  path and the machine online, from the hub copy (``HUB_REPO``). ``check`` as in
  ``load_qa``."""
  if path:
    return load_qa(path, on_error=on_error, data_source=name, report=report, check=check)
  if name not in BENCHMARKS:
    raise DataError(f"unknown benchmark {name!r} with no local path; known: {sorted(BENCHMARKS)} "
                    "(or give name=path).")
  if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
    raise DataError(f"benchmark {name!r}: no local path and the hub is offline; download "
                    f"{HUB_REPO}/{BENCHMARKS[name][0]} elsewhere and give name=/path/file.jsonl.")
  config_name, split, _ = BENCHMARKS[name]
  hub = datasets.load_dataset(HUB_REPO, config_name, split=split)
  rows = []
  for index, row in enumerate(hub):
    try:
      normalized = normalize_row(row, source=name, index=index)
      if check is not None:
        check(normalized)
      rows.append(normalized)
    except DataError as e:
      if on_error == "raise":
        raise DataError(f"{HUB_REPO}/{config_name}, row {index + 1}: {e}") from None
      logging.warning("skipping %s/%s row %d: %s", HUB_REPO, config_name, index + 1, e)
  return datasets.Dataset.from_list(rows)


def write_jsonl(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
  """Writes rows as JSON lines (creating parent directories)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(dict(row), ensure_ascii=False) + "\n")
  return path


def epoch_order(num_rows: int, seed: int, epoch: int):
  """The row order of one pass over the data: a permutation fixed by (seed, epoch)."""
  return np.random.default_rng([seed, epoch]).permutation(num_rows)


def batch_rows(num_rows: int, batch_size: int, seed: int, step: int):
  """Row indices of training step ``step`` (from 0): consecutive slices of the
  concatenated epoch orders, so the data position is a function of the step."""
  out = []
  position = step * batch_size
  while len(out) < batch_size:
    epoch, offset = divmod(position, num_rows)
    take = min(batch_size - len(out), num_rows - offset)
    out.extend(epoch_order(num_rows, seed, epoch)[offset:offset + take].tolist())
    position += take
  return np.asarray(out, np.int64)


__all__ = ["BENCHMARKS", "HUB_REPO", "load_benchmark", "COLUMNS", "DataError", "LoadReport",
           "normalize_row", "load_qa", "load_sft", "file_kind", "text_lines", "write_jsonl",
           "epoch_order", "batch_rows"]
