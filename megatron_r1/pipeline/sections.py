"""A command's own YAML section next to the stage config: `sampling:` for `sample`, `distill:` for `distill`.

`Config` rejects unknown top-level keys (a typo must fail), so a command that needs options of its own reads its
section out of the YAML first, parses it into its own typed dataclass, and hands the rest to `config_from_dict`.
One file then describes the whole job, and `section.key=value` overrides reach either part.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, TypeVar

from megatron_r1.config import Config, _from_dict, config_from_dict, parse_override, read_yaml
from megatron_r1.errors import ConfigError

T = TypeVar("T")


def parse_section(cls: type[T], data: Any, where: str) -> T:
    """Build the dataclass `cls` from a mapping; unknown keys and wrong types name `where.field`."""
    if data is None:
        return cls()
    # The config module's checker: same coercions (ints for floats, "3e-3" strings) and the same messages.
    return _from_dict(cls, data, where)


def split_overrides(overrides: list[str], section: str) -> tuple[list[str], list[str]]:
    """(`section.key=value` overrides, the others) — the first go to the command's section, the rest to Config."""
    own = [o for o in overrides if o.split("=", 1)[0].split(".", 1)[0] == section]
    return own, [o for o in overrides if o not in own]


def load_with_section(path: str | Path, overrides: list[str], section: str, cls: type[T]) -> tuple[Config, T]:
    """Read YAML `path`, parse its `section` into `cls` and the rest into a validated Config."""
    data = read_yaml(path)
    raw = data.pop(section, None) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: {section}: expected a mapping, got {raw!r}")
    own, rest = split_overrides(list(overrides), section)
    for text in own:
        keys, value = parse_override(text)
        node = raw
        for k in keys[1:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {k} is not a section")
        if len(keys) < 2:
            raise ConfigError(f"override {text!r}: expected {section}.key=value")
        node[keys[-1]] = value
    try:
        options = parse_section(cls, raw, section)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return config_from_dict(data, rest, source=str(path)), options


def parse_command_line(argv: list[str], prog: str, doc: str | None, section: str, cls: type[T], config_help: str,
                       overrides_help: str) -> tuple[Config, T]:
    """`prog CONFIG [section.key=value ...]`: the command line of every command with a section of its own, parsed
    into (Config, the section's options)."""
    ap = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help=config_help)
    ap.add_argument("overrides", nargs="*", help=overrides_help)
    args = ap.parse_args(argv)
    return load_with_section(args.config, args.overrides, section, cls)
