"""`load_dataset`: one entry point for files, directories and `builtin:<task>` sources."""
from __future__ import annotations

from megatron_r1.data.readers import Dataset, LoadReport, load_path
from megatron_r1.data.tasks import generate
from megatron_r1.errors import ConfigError


def load_dataset(source: str, /, field_map: dict | None = None, split: str = "train", skip_bad_rows: bool = False,
                 **options) -> Dataset:
    """Samples (dicts with at least "prompt") from `source`: a .jsonl/.parquet file, a HF `datasets` directory, or
    `builtin:<task>` with generator `options` (num_samples, seed, difficulty, ...).

    Returns a list subclass whose `.report` (LoadReport) says how many rows were loaded and skipped. Bad rows
    raise DataError ("file:line: reason") unless `skip_bad_rows`.
    """
    if source.startswith("builtin:"):
        if field_map:
            raise ConfigError(f"{source}: field_map applies to files only")
        samples = generate(source[len("builtin:"):], split=split, **options)
        return Dataset(samples, LoadReport(source, loaded=len(samples)))
    if options:
        raise ConfigError(f"{source}: options {', '.join(sorted(options))} apply to builtin: tasks only")
    return load_path(source, field_map, split, skip_bad_rows)
