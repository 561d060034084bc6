"""Atomic writes for the pipeline's outputs (data files, stage markers): written beside, then renamed into place,
so a killed run never leaves a half-written file that a re-run would take as finished."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import IO, Iterable, Iterator


@contextlib.contextmanager
def atomic_open(path: str | Path) -> Iterator[IO[str]]:
    """A text file open for writing at `.<name>.tmp-<pid>` beside `path` (parents made), renamed over `path`
    when the block ends without an error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        yield f
    os.replace(tmp, path)


def write_jsonl(rows: Iterable[dict], path: str | Path) -> None:
    """One JSON object a line (UTF-8 as is, not escaped), atomically."""
    with atomic_open(path) as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
