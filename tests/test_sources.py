"""Pretraining text sources (lmforge.data.sources) and local record files (lmforge.data.records)."""

from __future__ import annotations

import json
import sys
import types
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from lmforge.data import records
from lmforge.data.records import read_records, record_error
from lmforge.data.sources import SourceSpec, describe, load_texts, parse_source, parse_sources
from lmforge.errors import LmforgeError

KEY = "data.sources[0]"


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def spec(source, **kw) -> SourceSpec:
    return parse_source({"source": str(source), **kw}, KEY)


@pytest.fixture
def fake_builtin(monkeypatch):
    """Stand-in for lmforge.data.builtin so these tests do not depend on the real corpus."""
    module = types.ModuleType("lmforge.data.builtin")
    module.pretrain_documents = lambda: ["builtin one", "", "builtin two", "   "]
    monkeypatch.setitem(sys.modules, "lmforge.data.builtin", module)
    import lmforge.data

    monkeypatch.setattr(lmforge.data, "builtin", module, raising=False)
    return module


# ----------------------------------------------------------------------------
# spec parsing


@pytest.mark.parametrize(
    "text, source, subset, weight",
    [
        ("HuggingFaceFW/fineweb-2 | fra_Latn | 1.0", "HuggingFaceFW/fineweb-2", "fra_Latn", 1.0),
        ("  HuggingFaceFW/fineweb-2|fra_Latn|0.25  ", "HuggingFaceFW/fineweb-2", "fra_Latn", 0.25),
        ("roneneldan/TinyStories", "roneneldan/TinyStories", None, 1.0),
        ("roneneldan/TinyStories | sub", "roneneldan/TinyStories", "sub", 1.0),
        ("roneneldan/TinyStories |  | 3", "roneneldan/TinyStories", None, 3.0),
        ("roneneldan/TinyStories || 2e-1", "roneneldan/TinyStories", None, 0.2),
        ("roneneldan/TinyStories | sub |", "roneneldan/TinyStories", "sub", 1.0),
        ("builtin", "builtin:pretrain", None, 1.0),
        ("builtin:pretrain | | 0.5", "builtin:pretrain", None, 0.5),
    ],
)
def test_parse_spec_string_forms(text, source, subset, weight):
    s = parse_source(text, KEY)
    assert (s.source, s.subset, s.weight, s.split, s.text_field) == (source, subset, weight, "train", "text")
    assert s.key == KEY


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a/b | x | 1 | extra", "expected 'name | subset | weight', got 4 parts"),
        ("  | fra | 1", "the source name is missing"),
        ("a/b | x | heavy", "weight 'heavy' is not a number"),
        ("a/b | x | 0", "weight must be a positive number, got 0"),
        ("a/b | x | -0.5", "weight must be a positive number, got -0.5"),
        ("a/b | x | nan", "weight must be a positive number"),
        ("builtin:poems", "unknown builtin corpus 'poems'"),
    ],
)
def test_parse_spec_string_errors(text, expected):
    with pytest.raises(LmforgeError, match="^data.sources\\[0\\]: .*") as err:
        parse_source(text, KEY)
    assert expected in str(err.value)


def test_parse_mapping_and_list_keys(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    specs = parse_sources(["builtin", {"source": str(f), "weight": 2, "max_docs": 5}])
    assert [s.key for s in specs] == ["data.sources[0]", "data.sources[1]"]
    assert specs[1] == SourceSpec(source=str(f), weight=2.0, max_docs=5)
    assert [s.kind for s in specs] == ["builtin", "files"]
    assert parse_sources("builtin")[0].key == "data.sources"


@pytest.mark.parametrize(
    "mapping, expected",
    [
        ({"source": "a/b", "wieght": 1}, "unknown keys ['wieght']"),
        ({"subset": "x"}, "missing 'source'"),
        ({"source": "a/b", "weight": "1"}, "data.sources[0].weight: expected int or float, got str"),
        ({"source": "a/b", "weight": True}, "data.sources[0].weight: expected int or float, got bool"),
        ({"source": "a/b", "weight": 0}, "weight must be a positive number, got 0"),
        ({"source": "a/b", "max_docs": 0}, "data.sources[0].max_docs: must be at least 1"),
        ({"source": "a/b", "streaming": "yes"}, "data.sources[0].streaming: expected bool or null"),
    ],
)
def test_parse_mapping_errors(mapping, expected):
    with pytest.raises(LmforgeError) as err:
        parse_source(mapping, KEY)
    assert expected in str(err.value)


def test_parse_rejects_missing_and_unknown_files(tmp_path):
    missing = tmp_path / "x" / "y.jsonl"
    with pytest.raises(LmforgeError) as err:
        parse_source(str(missing), KEY)
    assert str(err.value) == f"data.sources[0]: file not found: {missing}"
    odd = tmp_path / "notes.xml"
    odd.write_text("<a/>")
    with pytest.raises(LmforgeError, match=r"data.sources\[0\]: unsupported file type '.xml' for .*notes.xml"):
        parse_source(str(odd), KEY)
    with pytest.raises(LmforgeError, match="expected a source string or a mapping, got int"):
        parse_source(3, KEY)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(LmforgeError, match=r"data.sources\[0\]: directory .*empty holds no data files"):
        parse_source(str(empty_dir), KEY)
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(LmforgeError, match="subset 'fr' applies only to datasets"):
        parse_source(f"{tmp_path / 'a.jsonl'} | fr", KEY)


# ----------------------------------------------------------------------------
# local formats


def test_jsonl_source_keeps_order_and_drops_empty_documents(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [{"text": "one", "id": 1}, {"text": "  "}, {"text": "two"}])
    assert load_texts([spec(f)], seed=0) == ["one", "two"]


def test_json_array_source_with_custom_field(tmp_path):
    f = tmp_path / "a.json"
    f.write_text(json.dumps([{"body": "alpha"}, {"body": "beta"}], indent=2))
    assert load_texts([spec(f, text_field="body")], seed=0) == ["alpha", "beta"]


def test_parquet_and_csv_sources(tmp_path):
    pd.DataFrame({"text": ["p1", "p2"], "n": [1, 2]}).to_parquet(tmp_path / "a.parquet")
    pd.DataFrame({"content": ["c1", "c2, with comma"]}).to_csv(tmp_path / "a.csv", index=False)
    assert load_texts([spec(tmp_path / "a.parquet")], seed=0) == ["p1", "p2"]
    assert load_texts([spec(tmp_path / "a.csv", text_field="content")], seed=0) == ["c1", "c2, with comma"]


def test_txt_file_and_directory_are_one_document_per_file(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "b.txt").write_text("second\nfile\n")
    (corpus / "a.txt").write_text("first file")
    (corpus / "sub" / "c.txt").write_text("nested")
    (corpus / "empty.txt").write_text("\n")
    assert load_texts([spec(corpus / "a.txt")], seed=0) == ["first file"]
    directory = spec(corpus)
    assert directory.kind == "files"
    # Sorted by path: a.txt, b.txt, empty.txt (dropped), sub/c.txt.
    assert load_texts([directory], seed=0) == ["first file", "second\nfile\n", "nested"]


def test_max_docs_per_source_and_in_total(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [{"text": f"d{i}"} for i in range(10)])
    assert load_texts([spec(f, max_docs=3)], seed=0) == ["d0", "d1", "d2"]
    assert load_texts([spec(f)], seed=0, max_docs=4) == ["d0", "d1", "d2", "d3"]


def test_builtin_goes_through_the_same_path(fake_builtin):
    assert load_texts(parse_sources("builtin"), seed=0) == ["builtin one", "builtin two"]


# ----------------------------------------------------------------------------
# dataset by name (a local dataset directory stands in for the Hub)


def test_dataset_directory_with_split_and_text_field(tmp_path):
    hub = tmp_path / "hub_dataset"
    hub.mkdir()
    write_jsonl(hub / "train.jsonl", [{"content": f"tr{i}"} for i in range(3)])
    write_jsonl(hub / "test.jsonl", [{"content": f"te{i}"} for i in range(2)])
    s = parse_source({"source": str(hub), "subset": None, "split": "test", "text_field": "content"}, KEY)
    assert s.kind == "dataset"
    assert load_texts([s], seed=0) == ["te0", "te1"]
    not_streamed = parse_source({"source": str(hub), "text_field": "content", "streaming": False}, KEY)
    assert load_texts([not_streamed], seed=0) == ["tr0", "tr1", "tr2"]


def test_dataset_errors_name_source_and_record(tmp_path):
    hub = tmp_path / "hub_dataset"
    hub.mkdir()
    write_jsonl(hub / "train.jsonl", [{"content": "a"}, {"content": "b"}])
    with pytest.raises(LmforgeError) as err:
        load_texts([parse_source(str(hub), KEY)], seed=0)
    msg = str(err.value)
    assert msg.startswith("data.sources[0]: ") and "record 1" in msg
    assert "missing text field 'text'" in msg and "keys seen: ['content']" in msg
    with pytest.raises(LmforgeError, match=r"data.sources\[0\]: could not load .*split 'validation'"):
        load_texts([parse_source({"source": str(hub), "split": "validation"}, KEY)], seed=0)


def test_hub_names_are_not_mistaken_for_paths():
    s = parse_source("HuggingFaceFW/fineweb-2 | fra_Latn | 1.0", KEY)
    assert s.kind == "dataset"
    assert describe([s])[0]["streaming"] is True


# ----------------------------------------------------------------------------
# mixing


def test_interleaving_follows_weights_and_is_deterministic(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(2000)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(2000)])
    specs = parse_sources([f"{a} | | 0.8", f"{b} | | 0.2"])
    first = load_texts(specs, seed=7, max_docs=500)
    assert first == load_texts(specs, seed=7, max_docs=500)
    assert first != load_texts(specs, seed=8, max_docs=500)
    share_a = Counter(doc[0] for doc in first)["a"] / len(first)
    # Binomial(500, 0.8): standard deviation ≈ 0.018, so ±0.06 is over 3 sigma.
    assert len(first) == 500 and abs(share_a - 0.8) < 0.06
    # Each source keeps its own order inside the mixture, with no repeats.
    from_a = [int(doc[1:]) for doc in first if doc[0] == "a"]
    assert from_a == list(range(len(from_a)))


def test_mixture_stops_when_a_source_runs_out(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(1000)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(10)])
    docs = load_texts(parse_sources([str(a), str(b)]), seed=0)
    counts = Counter(doc[0] for doc in docs)
    assert counts["b"] == 10 and counts["a"] < 100
    assert len(set(docs)) == len(docs)


def test_describe_reports_fractions(tmp_path, fake_builtin):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    rows = describe(parse_sources(["builtin | | 3", f"{a} | | 1", "org/name | sub"]))
    assert [r["kind"] for r in rows] == ["builtin", "files", "dataset"]
    assert [r["fraction"] for r in rows] == [0.6, 0.2, 0.2]
    assert rows[0]["streaming"] is False and rows[2]["split"] == "train" and rows[1]["split"] is None
    assert json.dumps(rows)  # plain values, ready for meta.json


# ----------------------------------------------------------------------------
# data errors name the file and line


def test_malformed_jsonl_line_is_named(tmp_path):
    f = tmp_path / "web.jsonl"
    f.write_text('{"text": "ok"}\n\n{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(LmforgeError) as err:
        load_texts([spec(f)], seed=0)
    assert str(err.value).startswith(f"{f} line 4: invalid JSON")


def test_missing_text_field_names_file_line_field_and_keys(tmp_path):
    f = write_jsonl(tmp_path / "web.jsonl", [{"text": "a"}, {"text": "b"}, {"body": "c", "id": 3}])
    with pytest.raises(LmforgeError) as err:
        load_texts([spec(f)], seed=0)
    assert str(err.value) == (
        f"{f} line 3: missing text field 'text' (data.sources[0]); keys seen: ['body', 'id']"
    )


def test_missing_text_field_in_json_array_names_its_line(tmp_path):
    f = tmp_path / "web.json"
    f.write_text('[\n  {"text": "a"},\n  {"txt": "b"}\n]\n')
    with pytest.raises(LmforgeError, match=rf"^{f} line 3: missing text field 'text'.*keys seen: \['txt'\]"):
        load_texts([spec(f)], seed=0)


def test_non_string_text_is_named(tmp_path):
    f = write_jsonl(tmp_path / "web.jsonl", [{"text": "a"}, {"text": 42}])
    with pytest.raises(LmforgeError, match=rf"^{f} line 2: text field 'text' must be a string, got int \(42\)"):
        load_texts([spec(f)], seed=0)
    nulls = write_jsonl(tmp_path / "nulls.jsonl", [{"text": None}])
    with pytest.raises(LmforgeError, match="line 1: .* got null"):
        load_texts([spec(nulls)], seed=0)


def test_csv_and_parquet_missing_column(tmp_path):
    pd.DataFrame({"body": ["x"]}).to_csv(tmp_path / "a.csv", index=False)
    pd.DataFrame({"body": ["x"], "n": [1]}).to_parquet(tmp_path / "a.parquet")
    pd.DataFrame({"text": [1, 2]}).to_parquet(tmp_path / "ints.parquet")
    with pytest.raises(LmforgeError, match=r"a.csv: missing text column 'text' .*columns seen: \['body'\]"):
        load_texts([spec(tmp_path / "a.csv")], seed=0)
    with pytest.raises(LmforgeError, match=r"a.parquet: missing text column 'text' .*columns seen: \['body', 'n'\]"):
        load_texts([spec(tmp_path / "a.parquet")], seed=0)
    with pytest.raises(LmforgeError, match="ints.parquet: text column 'text' must hold strings, got Parquet type int64"):
        load_texts([spec(tmp_path / "ints.parquet")], seed=0)


def test_empty_corpus_names_the_sources(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": ""}, {"text": " \n"}])
    b = tmp_path / "b.jsonl"
    b.write_text("\n")
    with pytest.raises(LmforgeError) as err:
        load_texts(parse_sources([str(a), str(b)]), seed=0)
    assert str(err.value) == (
        f"data.sources[0], data.sources[1]: the corpus is empty: no non-empty documents in {a}, {b}"
    )


# ----------------------------------------------------------------------------
# records.py


def test_read_records_all_formats_with_locations(tmp_path):
    rows = [{"prompt": "p1", "completion": "c1"}, {"prompt": "p2", "completion": "c2"}]
    write_jsonl(tmp_path / "r.jsonl", [rows[0]])
    with open(tmp_path / "r.jsonl", "a") as fh:
        fh.write("\n" + json.dumps(rows[1]) + "\n")
    (tmp_path / "r.json").write_text(json.dumps(rows, indent=1))
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in rows))
    pd.DataFrame(rows).to_parquet(tmp_path / "r.parquet")
    (tmp_path / "r.csv").write_text('prompt,completion\np1,c1\n"p2",c2\n')
    (tmp_path / "multi.csv").write_text('prompt,completion\n"two\nlines",c1\np2,c2\n')
    assert read_records(tmp_path / "r.jsonl", key="k") == [(1, rows[0]), (3, rows[1])]
    assert read_records(tmp_path / "r.json", key="k") == [(2, rows[0]), (6, rows[1])]
    assert read_records(tmp_path / "lines.json", key="k") == [(1, rows[0]), (2, rows[1])]
    assert read_records(tmp_path / "r.parquet", key="k") == [(1, rows[0]), (2, rows[1])]
    assert read_records(tmp_path / "r.csv", key="k") == [(2, rows[0]), (3, rows[1])]
    assert read_records(tmp_path / "multi.csv", key="k")[1] == (4, rows[1])


def test_read_records_errors(tmp_path):
    with pytest.raises(LmforgeError, match=r"^sft.data: file not found: .*nope.jsonl$"):
        read_records(tmp_path / "nope.jsonl", key="sft.data")
    (tmp_path / "r.yaml").write_text("a: 1")
    with pytest.raises(LmforgeError, match=r"^sft.data: unsupported file type '.yaml'"):
        read_records(tmp_path / "r.yaml", key="sft.data")
    bad = tmp_path / "sft.jsonl"
    bad.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(LmforgeError, match=rf"^{bad} line 2: expected a JSON object, got array$"):
        read_records(bad, key="sft.data")
    broken = tmp_path / "broken.json"
    broken.write_text('[\n {"a": 1},\n {"a": }\n]')
    with pytest.raises(LmforgeError, match=rf"^{broken} line 3: invalid JSON"):
        read_records(broken, key="sft.data")
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("a,b\n1,2\n3\n")
    with pytest.raises(LmforgeError, match=rf"^{ragged} line 3: expected 2 fields as in the header, got 1$"):
        read_records(ragged, key="sft.data")


def test_record_error_format():
    assert str(record_error("data/sft.jsonl", 7, "unknown record shape, keys seen: ['a']")) == (
        "data/sft.jsonl line 7: unknown record shape, keys seen: ['a']"
    )
    assert records.location("x.parquet", 3) == "x.parquet record 3"
