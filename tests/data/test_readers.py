"""Dataset files: jsonl, parquet, HF datasets directories; field maps; bad rows named by file:line and field."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_r1.data import load_dataset
from megatron_r1.errors import ConfigError, DataError, UserError


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    return str(path)


def test_jsonl_with_field_map_and_extras(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [
        {"question": "1+1?", "solution_value": 2, "lang": "en", "difficulty": 3},
        "",  # blank lines are ignored
        {"question": "2+2?", "solution_value": "4", "lang": "en"},
    ])
    data = load_dataset(src, field_map={"prompt": "question", "answer": "solution_value", "language": "lang"})
    assert [s["prompt"] for s in data] == ["1+1?", "2+2?"]
    assert [s["answer"] for s in data] == ["2", "4"]  # numbers become strings
    assert data[0]["language"] == "en" and data[0]["difficulty"] == 3 and "question" not in data[0]
    assert data.report.loaded == 2 and data.report.skipped == 0


@pytest.mark.parametrize("bad_row,message", [
    ('{"prompt": "x", ', "d.jsonl:2: invalid JSON"),
    ('{"answer": "1"}', "d.jsonl:2: missing field 'prompt'"),
    ('{"prompt": 5}', "d.jsonl:2: field 'prompt' must be str, got int"),
    ('{"prompt": "   "}', "d.jsonl:2: field 'prompt' is empty"),
    ('{"prompt": "x", "answer": [1]}', "d.jsonl:2: field 'answer' must be str or int or float, got list"),
    ('{"prompt": "x", "answer": true}', "d.jsonl:2: field 'answer' must be"),
    ('{"prompt": "x", "tests": "print(1)"}', "d.jsonl:2: field 'tests' must be list or dict"),
    ('["prompt"]', "d.jsonl:2: expected a JSON object, got list"),
])
def test_bad_rows_stop_with_file_line_and_field(tmp_path, bad_row, message):
    src = write_jsonl(tmp_path / "d.jsonl", ['{"prompt": "ok", "answer": "1"}', bad_row, '{"prompt": "ok2"}'])
    with pytest.raises(DataError) as e:
        load_dataset(src)
    assert message in str(e.value) and isinstance(e.value, UserError)


def test_mapped_field_names_the_file_column(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"q": "x"}, {"question": "y"}])
    with pytest.raises(DataError, match=r"d.jsonl:1: missing field 'question' \(mapped to 'prompt'\)"):
        load_dataset(src, field_map={"prompt": "question"})


def test_skip_bad_rows_counts_them(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", ['{"prompt": "a"}', "not json", '{"prompt": ""}', '{"prompt": "b"}'])
    data = load_dataset(src, skip_bad_rows=True)
    assert [s["prompt"] for s in data] == ["a", "b"]
    assert data.report.skipped == 2 and data.report.loaded == 2
    assert data.report.reasons[0].endswith("d.jsonl:2: invalid JSON (Expecting value at column 1)")


def test_all_rows_bad_is_an_error_even_when_skipping(tmp_path):
    with pytest.raises(DataError, match="no usable rows"):
        load_dataset(write_jsonl(tmp_path / "d.jsonl", ["{}"]), skip_bad_rows=True)


def test_parquet_rows_are_numbered(tmp_path):
    table = pa.table({"problem": ["a", "b", None], "answer": ["1", "2", "3"]})
    pq.write_table(table, tmp_path / "d.parquet")
    data = load_dataset(str(tmp_path / "d.parquet"), field_map={"prompt": "problem"}, skip_bad_rows=True)
    assert [s["prompt"] for s in data] == ["a", "b"]
    assert data.report.reasons == [f"{tmp_path / 'd.parquet'}:3: missing field 'problem' (mapped to 'prompt')"]


def _save_hf_like(directory, table):
    """The layout `datasets.Dataset.save_to_disk` writes: arrow stream shards plus state.json."""
    directory.mkdir(parents=True)
    with pa.OSFile(str(directory / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    (directory / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (directory / "dataset_info.json").write_text("{}")


def test_hf_datasets_directory_and_dataset_dict(tmp_path):
    _save_hf_like(tmp_path / "ds", pa.table({"prompt": ["p1", "p2"], "answer": ["1", "2"]}))
    assert [s["prompt"] for s in load_dataset(str(tmp_path / "ds"))] == ["p1", "p2"]
    root = tmp_path / "dd"
    _save_hf_like(root / "train", pa.table({"prompt": ["tr"]}))
    _save_hf_like(root / "test", pa.table({"prompt": ["te"]}))
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    assert load_dataset(str(root), split="test")[0]["prompt"] == "te"
    with pytest.raises(DataError, match="no split 'validation'"):
        load_dataset(str(root), split="validation")


def test_source_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_dataset(str(tmp_path / "missing.jsonl"))
    (tmp_path / "d.csv").write_text("prompt\nx\n")
    with pytest.raises(DataError, match="unsupported dataset file type '.csv'"):
        load_dataset(str(tmp_path / "d.csv"))
    with pytest.raises(ConfigError, match="unknown sample field"):
        load_dataset(str(tmp_path / "d.csv"), field_map={"question": "q"})
    with pytest.raises(ConfigError, match="unknown option"):
        load_dataset("builtin:arithmetic", num_sample=3)
    with pytest.raises(ConfigError, match="unknown built-in task"):
        load_dataset("builtin:nope")
