"""Dataset files (jsonl, parquet, local HF `datasets` directories) -> validated sample dicts, with a field map."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from megatron_r1.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# Sample fields, what each must be, and whether a row may omit it. "answer" may be a number in the file
# (common in jsonl); it is normalized to str because rewards compare strings.
_STR = (str,)
FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "prompt": (_STR, True),
    "answer": ((str, int, float), False),
    "language": (_STR, False),
    "tests": ((list, dict), False),
    "chosen": (_STR, False),
    "rejected": (_STR, False),
    "solution": (_STR, False),
    "completion": (_STR, False),
    "id": ((str, int), False),
}


@dataclass
class LoadReport:
    """What loading a source did: rows kept and skipped, with the first few reasons (for logs and `preview`)."""

    source: str
    loaded: int = 0
    skipped: int = 0
    reasons: list[str] = field(default_factory=list)

    def skip(self, reason: str) -> None:
        self.skipped += 1
        if len(self.reasons) < 10:
            self.reasons.append(reason)


class Dataset(list):
    """A list of sample dicts that also carries the `LoadReport` of how it was read."""

    def __init__(self, samples=(), report: LoadReport | None = None):
        super().__init__(samples)
        self.report = report or LoadReport("<memory>", loaded=len(self))


def _check_field_map(field_map: dict | None) -> dict[str, str]:
    field_map = dict(field_map or {})
    unknown = sorted(set(field_map) - set(FIELDS))
    if unknown:
        raise ConfigError(f"field_map: unknown sample field(s) {', '.join(unknown)}; known: {', '.join(FIELDS)}")
    return field_map


def to_sample(row, field_map: dict[str, str], where: str) -> dict:
    """Validate one raw row and rename its columns; raises DataError naming `where` (file:line) and the field."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    sample = {}
    for name, (types, required) in FIELDS.items():
        column = field_map.get(name, name)
        value = row.get(column)
        if value is None:
            if required:
                mapped_note = f" (mapped to {name!r})" if column != name else ""
                raise DataError(f"{where}: missing field {column!r}{mapped_note}")
            continue
        if not isinstance(value, types) or isinstance(value, bool):
            want = " or ".join(t.__name__ for t in types)
            raise DataError(f"{where}: field {column!r} must be {want}, got {type(value).__name__}")
        if name == "prompt" and not value.strip():
            raise DataError(f"{where}: field {column!r} is empty")
        sample[name] = str(value) if name in ("answer", "id") else value
    mapped = {field_map.get(n, n) for n in FIELDS}
    # Extra columns ride along (e.g. "numbers"/"target" for countdown), so custom rewards can use them.
    sample.update({k: v for k, v in row.items() if k not in mapped and k not in sample})
    return sample


def _jsonl_rows(path: Path) -> Iterator[tuple[str, object]]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})")


def _table_rows(table, label: str) -> Iterator[tuple[str, object]]:
    # Parquet/arrow have no lines; the 1-based row number plays that role in messages.
    for i, row in enumerate(table.to_pylist(), 1):
        yield f"{label}:{i}", row


def _hf_dir_rows(path: Path, split: str) -> Iterator[tuple[str, object]]:
    """Rows of a `datasets` save_to_disk directory, read with pyarrow (the `datasets` package is not required)."""
    import pyarrow as pa

    if (path / "dataset_dict.json").exists():
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        if split not in splits:
            raise DataError(f"{path}: no split {split!r}; available: {', '.join(splits)}")
        path = path / split
    state_file = path / "state.json"
    if not state_file.exists():
        raise DataError(f"{path}: not a HF datasets directory (no state.json or dataset_dict.json)")
    files = [path / f["filename"] for f in json.loads(state_file.read_text())["_data_files"]]
    for file in files:
        with pa.memory_map(str(file)) as source:
            try:
                table = pa.ipc.open_stream(source).read_all()
            except pa.ArrowInvalid:
                table = pa.ipc.open_file(source).read_all()
        yield from _table_rows(table, str(file))


def read_rows(path: Path, split: str) -> Iterator[tuple[str, object]]:
    """(location, row-or-DataError) pairs of a file or directory, by its kind."""
    if path.is_dir():
        return _hf_dir_rows(path, split)
    if path.suffix == ".jsonl":
        return _jsonl_rows(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return _table_rows(pq.read_table(path), str(path))
    raise DataError(f"{path}: unsupported dataset file type {path.suffix!r} "
                    "(use .jsonl, .parquet or a HF datasets dir)")


def load_path(path: str | Path, field_map: dict | None = None, split: str = "train",
              skip_bad_rows: bool = False) -> Dataset:
    """Read and validate every row of `path`; bad rows raise DataError, or are skipped and counted."""
    field_map = _check_field_map(field_map)
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    report = LoadReport(str(path))
    samples = []
    for where, row in read_rows(path, split):
        try:
            if isinstance(row, DataError):
                raise row
            samples.append(to_sample(row, field_map, where))
        except DataError as e:
            if not skip_bad_rows:
                raise
            report.skip(str(e))
    report.loaded = len(samples)
    if report.skipped:
        log.warning("%s: skipped %d bad row(s); first: %s", path, report.skipped, report.reasons[0])
    if not samples:
        raise DataError(f"{path}: no usable rows" + (f" ({report.skipped} skipped)" if report.skipped else ""))
    return Dataset(samples, report)
