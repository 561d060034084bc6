"""`python -m megatron_r1` is the same as the `megatron-r1` console script."""
from megatron_r1.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
