"""The DeepSeek-R1 recipe chained: cold-start SFT -> reasoning RL -> rejection sampling + SFT -> reward model ->
all-scenario RL -> distillation. `megatron-r1 pipeline|sample|distill`; see stages.py for the pipeline file."""
