"""`megatron-r1 data preview`: formatted samples and counts, field mapping, clear errors."""
import json

import pytest

from megatron_r1.data import preview
from megatron_r1.data.cli import data_cli
from megatron_r1.errors import ConfigError, DataError


def test_preview_jsonl_with_field_map(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"question": f"What is {i}+1", "target": i + 1}) for i in range(5)) + "\n")
    assert data_cli(["preview", str(path), "--field", "prompt=question", "--field", "answer=target", "--n", "2"]) == 0
    out = capsys.readouterr().out
    assert "samples: 5" in out and out.count("--- sample") == 2
    assert "User: What is 0+1. Assistant:" in out and "[answer] 1" in out


def test_preview_builtin_with_options_and_tokens(capsys):
    data_cli(["preview", "builtin:demo_arithmetic", "--option", "num_samples=10", "--option", "difficulty=2",
              "--template", "plain", "--tokenizer", "builtin:demo", "--n", "1"])
    out = capsys.readouterr().out
    assert "samples: 10" in out and "formatted prompt tokens (builtin:demo)" in out


def test_preview_reports_skipped_rows(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": ""}\n')
    text = preview(str(path), skip_bad_rows=True)
    assert "skipped bad rows: 1" in text and "d.jsonl:2: field 'prompt' is empty" in text
    with pytest.raises(DataError, match="d.jsonl:2"):
        data_cli(["preview", str(path)])


def test_cli_usage_errors(tmp_path):
    with pytest.raises(SystemExit):
        data_cli(["preview", "x.jsonl", "--field", "prompt"])  # not KEY=VALUE: argparse exits with usage
    with pytest.raises(ConfigError, match="builtin: sources only"):
        data_cli(["preview", str(tmp_path / "x.jsonl"), "--option", "seed=1"])
