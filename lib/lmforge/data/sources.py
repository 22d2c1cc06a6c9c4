"""Where pretraining text comes from: the builtin corpus, local files, or datasets by name.

A source is written in the config as a string or a mapping::

    data:
      sources:
        - builtin                                  # the embedded corpus
        - data/notes/                              # a directory of .txt files, one document each
        - data/web.jsonl                           # .txt, .jsonl, .json, .parquet, .csv
        - "HuggingFaceFW/fineweb-2 | fra_Latn | 0.5"   # name | subset | weight
        - {source: roneneldan/TinyStories, split: train, text_field: text, weight: 2, max_docs: 10000}

Every source becomes a ``datasets.IterableDataset`` with one string column,
``text``, holding non-empty documents; several sources are then interleaved
by weight. How the pieces are decided:

- **Kinds.** ``builtin[:pretrain]`` is the embedded corpus. A string is a
  local path when it exists, starts with ``/ ./ ../ ~``, ends in a data-file
  extension, or cannot be a Hub id (which is ``name`` or ``owner/name``).
  Anything else is handed to ``datasets.load_dataset(name, subset, split=…)``,
  which resolves Hub repositories and also local dataset directories. A local
  directory holding only ``.txt`` files is a corpus of one document per file;
  a directory with other data files is loaded as a dataset directory.
- **Streaming** defaults to on for everything read from disk or the Hub: the
  documents are consumed once, in order, so materialising an Arrow copy in the
  cache would cost disk and time for nothing. ``streaming: false`` opts out.
- **Mixing** uses ``interleave_datasets(stopping_strategy="first_exhausted")``:
  the mixture stops as soon as a source it draws from runs dry. So the weights
  are the real proportions of the result, no document is ever repeated
  (a repeat would be a silent extra epoch of the smaller source), and a
  small local file mixed with an endless Hub stream still terminates. The cost
  is that the larger source is not used up; weight sources by their sizes, or
  use ``max_docs``, to control how much of each is read.
- **Validation.** Local ``.jsonl``/``.json`` files are pre-scanned record by
  record before ``datasets`` sees them, so a bad line is reported with its
  file and line; ``.csv``/``.parquet`` column names are checked from the
  header/schema. Records from dataset directories and the Hub are checked as
  they stream and reported as "record N" of that source.
- **Empty documents** (empty or whitespace only) are dropped: they carry no
  tokens to learn from, and they would skew the mixture proportions.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge.data.records import RECORD_SUFFIXES, iter_jsonl, location, read_records, record_error
from lmforge.errors import LmforgeError

if TYPE_CHECKING:  # datasets takes ~1 s to import; only the loading functions need it
    from datasets import IterableDataset

BUILTIN_CORPORA = ("pretrain",)
# Suffix of a local data file → the `datasets` packaged builder that reads it.
FILE_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
STOPPING_STRATEGY = "first_exhausted"
MAPPING_KEYS = ("source", "subset", "split", "weight", "text_field", "streaming", "max_docs")

# A Hub id: "name" or "owner/name" from letters, digits, "-", "_" and ".".
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


@dataclass
class SourceSpec:
    """One pretraining text source, as parsed from the config."""

    source: str
    """``"builtin:pretrain"``, a local path, or a dataset name for ``load_dataset``."""
    subset: str | None = None
    """Dataset configuration (e.g. a language of fineweb-2); datasets by name only."""
    split: str = "train"
    """Split to read; datasets by name only (local files are one split)."""
    weight: float = 1.0
    """Relative share of this source in the mixture; > 0."""
    text_field: str = "text"
    """Column/key holding each document's text (not used for .txt files)."""
    streaming: bool | None = None
    """Read lazily; None means the default (on for files and datasets)."""
    max_docs: int | None = None
    """Read at most this many non-empty documents from this source."""
    key: str = field(default="data.sources", compare=False)
    """Config key the spec came from, used to prefix error messages."""

    @property
    def kind(self) -> str:
        """``"builtin"``, ``"files"`` (local .txt/.jsonl/… files) or ``"dataset"`` (load_dataset by name/dir)."""
        if self.source == "builtin" or self.source.startswith("builtin:"):
            return "builtin"
        path = _local_path(self.source)
        if path is not None and (path.is_file() or _is_text_directory(path)):
            return "files"
        return "dataset"


# ----------------------------------------------------------------------------
# Parsing the config


def parse_sources(value: Any, key: str = "data.sources") -> list[SourceSpec]:
    """Parse ``data.sources``: one source (string or mapping) or a non-empty list of them."""
    if not isinstance(value, list):
        return [parse_source(value, key)]
    if not value:
        raise LmforgeError(f"{key}: the list of sources is empty")
    return [parse_source(item, f"{key}[{i}]") for i, item in enumerate(value)]


def parse_source(spec: str | dict, key: str) -> SourceSpec:
    """Turn one config entry into a checked :class:`SourceSpec`.

    Strings take the form ``"name"``, ``"name | subset"`` or
    ``"name | subset | weight"``; an empty subset or weight keeps the default.
    Local paths are checked for existence and a known extension here, so a
    typo fails before any work starts.
    """
    if isinstance(spec, str):
        parsed = _parse_spec_string(spec, key)
    elif isinstance(spec, dict):
        parsed = _parse_spec_mapping(spec, key)
    else:
        raise LmforgeError(f"{key}: expected a source string or a mapping, got {type(spec).__name__}")
    return _check_source(parsed)


def _parse_spec_string(text: str, key: str) -> SourceSpec:
    parts = [part.strip() for part in text.split("|")]
    if len(parts) > 3:
        raise LmforgeError(
            f"{key}: malformed source '{text}': expected 'name | subset | weight', got {len(parts)} parts"
        )
    parts += [""] * (3 - len(parts))
    name, subset, weight = parts
    if not name:
        raise LmforgeError(f"{key}: malformed source '{text}': the source name is missing")
    spec = SourceSpec(source=name, subset=subset or None, key=key)
    if weight:
        try:
            spec.weight = float(weight)
        except ValueError:
            raise LmforgeError(f"{key}: malformed source '{text}': weight '{weight}' is not a number") from None
    return spec


def _parse_spec_mapping(mapping: dict, key: str) -> SourceSpec:
    unknown = sorted(set(mapping) - set(MAPPING_KEYS), key=str)
    if unknown:
        raise LmforgeError(f"{key}: unknown keys {unknown}; allowed: {list(MAPPING_KEYS)}")
    if "source" not in mapping:
        raise LmforgeError(f"{key}: missing 'source'")
    _expect(mapping, "source", str, key)
    _expect(mapping, "subset", (str, type(None)), key)
    _expect(mapping, "split", str, key)
    _expect(mapping, "text_field", str, key)
    _expect(mapping, "streaming", (bool, type(None)), key)
    _expect(mapping, "weight", (int, float), key)
    _expect(mapping, "max_docs", (int, type(None)), key)
    spec = SourceSpec(**mapping, key=key)
    spec.source = spec.source.strip()
    spec.subset = (spec.subset or "").strip() or None
    spec.weight = float(spec.weight)
    if not spec.source:
        raise LmforgeError(f"{key}.source: must not be empty")
    if not spec.split.strip():
        raise LmforgeError(f"{key}.split: must not be empty")
    if not spec.text_field:
        raise LmforgeError(f"{key}.text_field: must not be empty")
    if spec.max_docs is not None and spec.max_docs < 1:
        raise LmforgeError(f"{key}.max_docs: must be at least 1, got {spec.max_docs}")
    return spec


def _expect(mapping: dict, name: str, types: type | tuple, key: str) -> None:
    """Reject a mapping value of the wrong type (bool is not accepted as a number)."""
    if name not in mapping:
        return
    value = mapping[name]
    wants_number = types in ((int, float), (int, type(None)))
    if not isinstance(value, types) or (wants_number and isinstance(value, bool)):
        raise LmforgeError(f"{key}.{name}: expected {_type_names(types)}, got {type(value).__name__} ({value!r})")


def _type_names(types: type | tuple) -> str:
    names = [t.__name__ if t is not type(None) else "null" for t in (types if isinstance(types, tuple) else (types,))]
    return " or ".join(names)


def _check_source(spec: SourceSpec) -> SourceSpec:
    """Normalise builtin names, check the weight and that local paths are usable."""
    key = spec.key
    if not math.isfinite(spec.weight) or spec.weight <= 0:
        raise LmforgeError(f"{key}: weight must be a positive number, got {spec.weight:g}")
    if spec.source == "builtin" or spec.source.startswith("builtin:"):
        name = spec.source.partition(":")[2] or "pretrain"
        if name not in BUILTIN_CORPORA:
            raise LmforgeError(f"{key}: unknown builtin corpus '{name}' (known: {', '.join(BUILTIN_CORPORA)})")
        if spec.subset is not None or spec.text_field != "text":
            raise LmforgeError(f"{key}: the builtin corpus takes no subset or text_field")
        spec.source = f"builtin:{name}"
        return spec
    path = _local_path(spec.source)
    if path is None:
        return spec  # a name for load_dataset; only loading can tell whether it exists
    if not path.exists():
        raise LmforgeError(f"{key}: file not found: {spec.source}")
    if path.is_file() and path.suffix.lower() not in FILE_BUILDERS:
        raise LmforgeError(
            f"{key}: unsupported file type '{path.suffix}' for {spec.source} "
            f"(expected one of {', '.join(FILE_BUILDERS)})"
        )
    if path.is_dir() and not _data_files(path):
        raise LmforgeError(f"{key}: directory {spec.source} holds no data files ({', '.join(FILE_BUILDERS)})")
    if spec.kind == "files" and spec.subset is not None:
        raise LmforgeError(
            f"{key}: subset '{spec.subset}' applies only to datasets, not to the local file(s) {spec.source}"
        )
    return spec


def _local_path(source: str) -> Path | None:
    """The local path a source string means, or None when it names a dataset for load_dataset."""
    path = Path(source).expanduser()
    looks_like_path = (
        source.startswith(("/", "./", "../", "~"))
        or path.suffix.lower() in FILE_BUILDERS
        or not _HUB_ID.fullmatch(source)
    )
    return path if looks_like_path or path.exists() else None


def _data_files(directory: Path) -> list[Path]:
    """Data files under a directory, sorted so the document order is reproducible."""
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in FILE_BUILDERS)


def _is_text_directory(path: Path) -> bool:
    files = _data_files(path) if path.is_dir() else []
    return bool(files) and all(p.suffix.lower() == ".txt" for p in files)


def describe(specs: Sequence[SourceSpec]) -> list[dict]:
    """Plain dicts of the sources as they will be read, for meta.json and MLflow params."""
    total = sum(spec.weight for spec in specs)
    return [
        {
            "source": spec.source,
            "kind": spec.kind,
            "subset": spec.subset,
            "split": spec.split if spec.kind == "dataset" else None,
            "weight": spec.weight,
            "fraction": spec.weight / total if len(specs) > 1 else 1.0,
            "text_field": spec.text_field,
            "streaming": _streaming(spec),
            "max_docs": spec.max_docs,
        }
        for spec in specs
    ]


# ----------------------------------------------------------------------------
# Reading


def iter_texts(specs: Sequence[SourceSpec], *, seed: int, max_docs: int | None = None) -> Iterator[str]:
    """Yield the non-empty documents of the sources, mixed by weight.

    A single source is read straight through in its own order; several are
    interleaved by normalised weight with ``seed`` (see the module notes on
    the stopping rule). ``max_docs`` caps the total. The same specs and seed
    give the same documents in the same order. Raises :class:`LmforgeError`
    for unreadable or malformed data, and when no document comes out at all.
    """
    if not specs:
        raise LmforgeError("data.sources: no sources given")
    docs = _mixture(specs, seed)
    count = 0
    try:
        for row in itertools.islice(docs, max_docs):
            count += 1
            yield row["text"]
    except LmforgeError:
        raise
    except Exception as err:  # errors raised by datasets while streaming a file or the Hub
        raise LmforgeError(f"{_keys(specs)}: reading {_names(specs)} failed: {type(err).__name__}: {err}") from None
    if count == 0:
        raise LmforgeError(f"{_keys(specs)}: the corpus is empty: no non-empty documents in {_names(specs)}")


def load_texts(specs: Sequence[SourceSpec], *, seed: int, max_docs: int | None = None) -> list[str]:
    """:func:`iter_texts` materialised; never empty (an empty corpus raises)."""
    return list(iter_texts(specs, seed=seed, max_docs=max_docs))


def _mixture(specs: Sequence[SourceSpec], seed: int) -> IterableDataset:
    """One dataset of ``{"text": str}`` rows: the only source, or the weighted interleaving."""
    parts = [_documents(spec) for spec in specs]
    if len(parts) == 1:
        return parts[0]
    from datasets import interleave_datasets

    total = sum(spec.weight for spec in specs)
    return interleave_datasets(
        parts,
        probabilities=[spec.weight / total for spec in specs],
        seed=seed,
        stopping_strategy=STOPPING_STRATEGY,
    )


def _documents(spec: SourceSpec) -> IterableDataset:
    """A source's rows reduced to checked, non-empty ``{"text": str}`` rows."""
    raw = _open(spec)
    field_name = spec.text_field
    where = spec.source

    def to_text(row: dict, index: int) -> dict:
        # Local files were pre-scanned with line numbers; this catches what
        # streams from dataset directories and the Hub, and nulls in csv/parquet.
        if field_name not in row:
            raise LmforgeError(
                f"{spec.key}: {where} record {index + 1}: missing text field '{field_name}'; "
                f"keys seen: {sorted(row)}"
            )
        text = row[field_name]
        if not isinstance(text, str):
            raise LmforgeError(
                f"{spec.key}: {where} record {index + 1}: text field '{field_name}' must be a string, "
                f"got {_type_of(text)}"
            )
        return {"text": text}

    from datasets import Features, Value

    # Declared features let interleave_datasets align the sources without
    # peeking at a first row, which an empty source does not have.
    docs = raw.map(to_text, with_indices=True).select_columns(["text"]).cast(Features({"text": Value("string")}))
    docs = docs.filter(lambda row: bool(row["text"].strip()))
    return docs.take(spec.max_docs) if spec.max_docs is not None else docs


def _open(spec: SourceSpec) -> IterableDataset:
    """The source's raw rows as an IterableDataset, whatever its kind."""
    import datasets

    kind = spec.kind
    if kind == "builtin":
        # The embedded corpus goes through the same dataset path as every other source.
        documents = list(_builtin_documents(spec.source.partition(":")[2] or "pretrain"))
        # The fingerprint is the text's digest: Dataset.from_dict would hash the table by pickling it
        # with dill, which fails on some Python 3.12 installs (pyarrow's MonthDayNano type).
        digest = hashlib.sha256("\0".join(documents).encode()).hexdigest()[:16]
        table = datasets.table.InMemoryTable.from_pydict({"text": documents})
        return datasets.Dataset(table, fingerprint=digest).to_iterable_dataset()
    try:
        if kind == "files":
            files = _prescan_files(spec)
            builder = FILE_BUILDERS[files[0].suffix.lower()]
            options = {"sample_by": "document"} if builder == "text" else {}
            loaded = datasets.load_dataset(
                builder,
                data_files=[str(f) for f in files],
                split="train",
                streaming=_streaming(spec),
                **options,
            )
        else:
            loaded = datasets.load_dataset(spec.source, spec.subset, split=spec.split, streaming=_streaming(spec))
    except LmforgeError:
        raise
    except Exception as err:  # not found, no network, bad subset or split, unreadable file …
        subset = f", subset {spec.subset!r}" if spec.subset else ""
        raise LmforgeError(
            f"{spec.key}: could not load {spec.source!r}{subset}, split {spec.split!r}: {type(err).__name__}: {err}"
        ) from None
    return loaded if isinstance(loaded, datasets.IterableDataset) else loaded.to_iterable_dataset()


def _builtin_documents(name: str) -> list[str]:
    """The embedded corpus ``name``; imported lazily so parsing a config stays cheap."""
    from lmforge.data import builtin

    # Each embedded corpus NAME is served by builtin.NAME_documents().
    return list(getattr(builtin, f"{name}_documents")())


def _prescan_files(spec: SourceSpec) -> list[Path]:
    """Check local files before `datasets` reads them, so errors name the file and line.

    JSON files are parsed record by record (one linear pass); CSV and Parquet
    files only have their header/schema checked, which is enough to catch a
    wrong ``text_field`` without reading the data twice.
    """
    path = Path(spec.source).expanduser()
    files = [path] if path.is_file() else _data_files(path)
    for file in files:
        suffix = file.suffix.lower()
        if suffix == ".jsonl":
            for line, record in iter_jsonl(file):
                _check_record(spec, file, line, record)
        elif suffix == ".json":
            for line, record in read_records(file, key=spec.key):
                _check_record(spec, file, line, record)
        elif suffix == ".csv":
            _check_columns(spec, file, _csv_header(file))
        elif suffix == ".parquet":
            _check_parquet_schema(spec, file)
    return files


def _check_record(spec: SourceSpec, file: Path, line: int, record: dict) -> None:
    if spec.text_field not in record:
        raise record_error(
            file, line, f"missing text field '{spec.text_field}' ({spec.key}); keys seen: {sorted(record)}"
        )
    text = record[spec.text_field]
    if not isinstance(text, str):
        raise record_error(file, line, f"text field '{spec.text_field}' must be a string, got {_type_of(text)}")


def _check_columns(spec: SourceSpec, file: Path, columns: list[str]) -> None:
    if spec.text_field not in columns:
        raise LmforgeError(
            f"{file}: missing text column '{spec.text_field}' ({spec.key}); columns seen: {sorted(columns)}"
        )


def _csv_header(file: Path) -> list[str]:
    import csv

    with open(file, newline="", encoding="utf-8-sig") as fh:
        return next(csv.reader(fh), [])


def _check_parquet_schema(spec: SourceSpec, file: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(file)
    except Exception as err:  # pyarrow raises several unrelated types for a bad file
        raise LmforgeError(f"{file}: not a readable Parquet file ({err})") from None
    _check_columns(spec, file, list(schema.names))
    column_type = schema.field(spec.text_field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise LmforgeError(
            f"{file}: text column '{spec.text_field}' must hold strings, got Parquet type {column_type}"
        )


def _streaming(spec: SourceSpec) -> bool:
    """Effective streaming flag: the builtin corpus is in memory already; everything else streams by default."""
    if spec.kind == "builtin":
        return False
    return True if spec.streaming is None else spec.streaming


def _type_of(value: object) -> str:
    return "null" if value is None else f"{type(value).__name__} ({value!r:.40})"


def _keys(specs: Sequence[SourceSpec]) -> str:
    keys = list(dict.fromkeys(spec.key for spec in specs))
    return keys[0] if len(keys) == 1 else ", ".join(keys)


def _names(specs: Sequence[SourceSpec]) -> str:
    return ", ".join(spec.source for spec in specs)



def load_corpus(data: dict, *, seed: int) -> tuple[list[str], list[SourceSpec]]:
    """The pretraining documents the ``data`` config section names, and the parsed specs."""
    specs = parse_sources(data["sources"])
    return load_texts(specs, seed=seed, max_docs=data.get("max_docs")), specs


# ----------------------------------------------------------------------------
# Stage record data: sft.data, reward.data, dpo.data, score.data, ppo.data, grpo.data
#
# A stage's records come from a local record file or a Hub dataset, written
# as a path, a Hub id, or a mapping with the split, subset and record format:
#
#     sft:
#       data: data/chat.jsonl
#     dpo:
#       data: {source: HuggingFaceH4/ultrafeedback_binarized, split: train_prefs}
#     grpo:
#       data: {source: openai/gsm8k, subset: main, split: train, format: gsm8k}
#
# Hub datasets are downloaded once into the `datasets` cache and memory-mapped;
# with ``max_records`` only that many rows are streamed instead. Records are
# numbered from 1 in messages: "openai/gsm8k (main, train) record 12".

DATA_SPEC_KEYS = ("source", "subset", "split", "revision", "format", "max_records")


@dataclass(frozen=True)
class DataSpec:
    """Where one stage's records come from, as parsed from ``<stage>.data``."""

    source: str
    """A local record file (.jsonl, .json, .parquet, .csv) or a Hub dataset id."""
    subset: str | None = None
    """Hub dataset configuration (``main`` for openai/gsm8k); Hub datasets only."""
    split: str = "train"
    """Hub split (``train_prefs`` for ultrafeedback_binarized); Hub datasets only."""
    revision: str | None = None
    """Hub git revision (branch, tag or commit) that pins the data; Hub datasets only."""
    format: str = "auto"
    """Record format name (lmforge.data.formats); ``auto`` detects it per record from the keys."""
    max_records: int | None = None
    """Read only the first this many records."""
    key: str = field(default="sft.data", compare=False)
    """Config key the spec came from, used to prefix error messages."""

    @property
    def is_file(self) -> bool:
        return _local_path(self.source) is not None

    @property
    def label(self) -> str:
        """How messages name the data: the path, or ``"name (subset, split)"``."""
        if self.is_file:
            return self.source
        return f"{self.source} ({', '.join(p for p in (self.subset, self.split) if p)})"


def parse_data_spec(value: Any, key: str) -> DataSpec:
    """``<stage>.data`` (a path, a Hub id, or a mapping of DATA_SPEC_KEYS) as a checked :class:`DataSpec`."""
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str):
        spec = DataSpec(source=value.strip(), key=key)
    elif isinstance(value, dict):
        unknown = sorted(set(value) - set(DATA_SPEC_KEYS), key=str)
        if unknown:
            raise LmforgeError(f"{key}: unknown keys {unknown}; allowed: {list(DATA_SPEC_KEYS)}")
        if "source" not in value:
            raise LmforgeError(f"{key}: missing 'source' (a local record file or a Hub dataset id)")
        for name, types in (("source", str), ("subset", (str, type(None))), ("split", str),
                            ("revision", (str, type(None))), ("format", str), ("max_records", (int, type(None)))):
            _expect(value, name, types, key)
        spec = DataSpec(**{**value, "source": value["source"].strip()}, key=key)
    else:
        raise LmforgeError(f"{key}: expected a file path, a Hub dataset id or a mapping, got {type(value).__name__}")
    if not spec.source:
        raise LmforgeError(f"{key}.source: must not be empty")
    if spec.max_records is not None and spec.max_records < 1:
        raise LmforgeError(f"{key}.max_records: must be at least 1, got {spec.max_records}")
    if spec.is_file and (spec.subset is not None or spec.revision is not None):
        raise LmforgeError(f"{key}: subset and revision apply only to Hub datasets, "
                           f"not to the local file {spec.source}")
    return spec


def read_data(spec: DataSpec) -> list[tuple[str, dict]]:
    """Every record of a stage's data as ``(where, record)``; ``where`` locates it in messages.

    Local files give ``"data/x.jsonl line 7"`` (``"x.parquet record 7"``), Hub
    datasets ``"openai/gsm8k (main, train) record 7"``, both numbered from 1.
    """
    if spec.is_file:
        records = read_records(spec.source, key=spec.key)[: spec.max_records]
        return [(location(spec.source, number), record) for number, record in records]
    import datasets

    streaming = spec.max_records is not None  # read only what is asked for; else download once into the cache
    try:
        rows = datasets.load_dataset(spec.source, spec.subset, split=spec.split, revision=spec.revision,
                                     streaming=streaming)
        if streaming:
            rows = rows.take(spec.max_records)
        return [(f"{spec.label} record {i}", dict(row)) for i, row in enumerate(rows, start=1)]
    except Exception as err:  # not found, no network, bad subset or split …
        raise LmforgeError(
            f"{spec.key}: could not load {spec.label} from the Hugging Face Hub: {type(err).__name__}: {err} "
            f"(a local file needs one of the suffixes {', '.join(RECORD_SUFFIXES)})") from None


def data_file(value: Any, key: str = "data") -> str | None:
    """The local file a stage's ``data`` value names (a Snakemake input), or None for a Hub dataset or null."""
    if value is None:
        return None
    spec = parse_data_spec(value, key)
    return spec.source if spec.is_file else None

