"""`megatron-r1 train CONFIG ... --dry-run`: the flag may come before, among or after the overrides."""
import pytest

from megatron_r1.training.cli import main


@pytest.mark.parametrize("order", ["first", "middle", "last"])
def test_dry_run_anywhere(tmp_path, capsys, order):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("stage: pretrain\nmodel: {preset: llama_tiny}\n")
    overrides = ["training.seed=3", "model.num_layers=2"]
    argv = {"first": ["--dry-run", str(cfg), *overrides], "middle": [str(cfg), overrides[0], "--dry-run", overrides[1]],
            "last": [str(cfg), *overrides, "--dry-run"]}[order]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip()
