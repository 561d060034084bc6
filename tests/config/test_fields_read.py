"""Every config field is read by the code: a field nobody reads is a setting that silently does nothing."""
import ast
import dataclasses
import re
from pathlib import Path

from megatron_r1 import config as C

PACKAGE = Path(C.__file__).parent


def _sections():
    for f in dataclasses.fields(C.Config):
        if isinstance(f.type, type) and dataclasses.is_dataclass(f.type):
            yield f.type
    # Section types given as strings (from __future__ annotations) resolve through the module.
    for f in dataclasses.fields(C.Config):
        t = getattr(C, str(f.type), None) if isinstance(f.type, str) else None
        if isinstance(t, type) and dataclasses.is_dataclass(t):
            yield t


def _field_tables(tree: ast.Module) -> set[str]:
    """The strings of module-level `NAME_FIELDS = ("field", ...)` tuples."""
    names = set()
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None
        if isinstance(target, ast.Name) and target.id.endswith("_FIELDS") and isinstance(node.value, ast.Tuple):
            names |= {e.value for e in node.value.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
    return names


def test_every_field_is_read_somewhere():
    # Attribute reads anywhere in the package, with the dataclass definitions' own lines removed (`name: type = ...`
    # is a definition, not a read). A name shared with an unrelated attribute can hide a dead field; it cannot
    # report a live field as dead. Names listed in a module-level `*_FIELDS` tuple count too: those tables are read
    # with getattr (models/builder.py's fields passed to Megatron's TransformerConfig unchanged, training/setup.py's
    # Adam fields, rl/trainer.py's CONVENTION_FIELDS).
    text, tabled = [], set()
    for path in PACKAGE.rglob("*.py"):
        lines = path.read_text().splitlines()
        text.extend(line for line in lines if not re.match(r"\s+\w+\s*:\s*[\w\[\], .|\"']+(=|$)", line))
        tabled |= _field_tables(ast.parse(path.read_text()))
    source = "\n".join(text)
    sections = {cls for cls in _sections()}
    assert len(sections) >= 8, sections
    unread = [f"{cls.__name__}.{f.name}" for cls in sorted(sections, key=lambda c: c.__name__)
              for f in dataclasses.fields(cls)
              if f.name not in tabled and not re.search(rf"\.{f.name}\b|getattr\([^)]*[\"']{f.name}[\"']", source)]
    assert unread == [], f"config fields no code reads (remove them or use them): {unread}"
