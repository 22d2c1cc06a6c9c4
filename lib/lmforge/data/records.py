"""Local record files (.jsonl, .json, .parquet, .csv) read into numbered dicts.

Every later stage (SFT, preference pairs, RL prompts) reads its data through
:func:`read_records`, and every complaint about one record goes through
:func:`record_error`, so a user always sees the same shape of message::

    data/sft.jsonl line 7: unknown record shape, keys seen: ['foo', 'bar']

The number paired with each record is where a user finds it in the file:

- ``.jsonl``: the physical line (blank lines are skipped but still counted);
- ``.json``: the line on which the record starts (array of objects), or the
  physical line when the file turns out to be JSON lines under a ``.json`` name;
- ``.csv``: the line on which the row starts (the header is line 1);
- ``.parquet``: the 1-based row number, reported as "record N" because a
  Parquet file has no lines.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from pathlib import Path

from lmforge.errors import LmforgeError

RECORD_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")

# JSON's own whitespace set; used to walk an array element by element.
_JSON_WS = re.compile(r"[ \t\n\r]*")


def location(path: str | Path, number: int) -> str:
    """``"data/sft.jsonl line 7"``, or ``"x.parquet record 7"`` for files without lines."""
    unit = "record" if Path(path).suffix.lower() == ".parquet" else "line"
    return f"{path} {unit} {number}"


def record_error(path: str | Path, line: int, msg: str) -> LmforgeError:
    """The project-wide error for one bad record: ``"<file> line <N>: <msg>"``."""
    return LmforgeError(f"{location(path, line)}: {msg}")


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield ``(line number, object)`` for each non-blank line of a JSON-lines file.

    Lines are decoded one at a time so that bad UTF-8, bad JSON and non-object
    values are all reported with the exact line, and memory stays flat.
    """
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise record_error(path, number, f"not valid UTF-8 ({err.reason})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise record_error(path, number, f"invalid JSON: {err.msg} (column {err.colno})") from None
            if not isinstance(obj, dict):
                raise record_error(path, number, f"expected a JSON object, got {_json_type(obj)}")
            yield number, obj


def read_records(path: str | Path, *, key: str) -> list[tuple[int, dict]]:
    """Read every record of a local file as ``(line or record number, dict)``.

    ``key`` is the config key that named the file; it prefixes the messages
    about the file as a whole (missing, unsupported type). An empty file gives
    an empty list: whether that is an error is the caller's decision.
    CSV values are strings exactly as written (empty cells are ``""``), since
    CSV carries no types and guessing would turn an answer "42" into an int.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise LmforgeError(f"{key}: file not found: {path}")
    suffix = file.suffix.lower()
    if suffix == ".jsonl":
        return list(iter_jsonl(path))
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    raise LmforgeError(
        f"{key}: unsupported file type '{file.suffix}' for {path} (expected one of {', '.join(RECORD_SUFFIXES)})"
    )


def _read_json(path: str | Path) -> list[tuple[int, dict]]:
    """A JSON array of objects (numbered by the line each starts on), one object, or JSON lines."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise LmforgeError(f"{path}: not valid UTF-8 ({err.reason})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        # "Extra data" after a complete first value is the signature of JSON lines.
        if err.msg == "Extra data":
            return list(iter_jsonl(path))
        raise record_error(path, err.lineno, f"invalid JSON: {err.msg} (column {err.colno})") from None
    if isinstance(value, dict):
        return [(text.count("\n", 0, _JSON_WS.match(text).end()) + 1, value)]
    if not isinstance(value, list):
        raise record_error(path, 1, f"expected a JSON array of objects, got {_json_type(value)}")
    records = []
    for number, item in _array_items_with_lines(text):
        if not isinstance(item, dict):
            raise record_error(path, number, f"expected a JSON object, got {_json_type(item)}")
        records.append((number, item))
    return records


def _array_items_with_lines(text: str) -> Iterator[tuple[int, object]]:
    """Walk a (known valid) JSON array and yield each element with its starting line.

    ``json.loads`` forgets positions, so the elements are decoded one by one
    with ``raw_decode``; newlines are counted incrementally, keeping it linear.
    """
    decoder = json.JSONDecoder()
    pos = _JSON_WS.match(text).end() + 1  # just past '['
    line, counted_to = 1, 0
    while True:
        pos = _JSON_WS.match(text, pos).end()
        if text[pos] == "]":
            return
        line += text.count("\n", counted_to, pos)
        counted_to = pos
        item, pos = decoder.raw_decode(text, pos)
        yield line, item
        pos = _JSON_WS.match(text, pos).end()
        if text[pos] == ",":
            pos += 1


def _read_csv(path: str | Path) -> list[tuple[int, dict]]:
    """Rows as dicts of strings, numbered by the line each row starts on."""
    records = []
    with open(Path(path).expanduser(), newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader, None)
            if header is None:
                return []
            end_of_previous = reader.line_num
            for row in reader:
                start = end_of_previous + 1  # a quoted cell may span several lines
                end_of_previous = reader.line_num
                if not row:
                    continue
                if len(row) != len(header):
                    raise record_error(
                        path, start, f"expected {len(header)} fields as in the header, got {len(row)}"
                    )
                records.append((start, dict(zip(header, row))))
        except csv.Error as err:
            raise record_error(path, reader.line_num, f"malformed CSV: {err}") from None
        except UnicodeDecodeError as err:
            raise LmforgeError(f"{path}: not valid UTF-8 ({err.reason})") from None
    return records


def _read_parquet(path: str | Path) -> list[tuple[int, dict]]:
    """Rows as dicts of Python values, numbered from 1."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(Path(path).expanduser())
    except Exception as err:  # pyarrow raises several unrelated types for a bad file
        raise LmforgeError(f"{path}: not a readable Parquet file ({err})") from None
    return list(enumerate(table.to_pylist(), start=1))


def _json_type(value: object) -> str:
    """JSON's name for a decoded value's type, as a user would write it."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
