"""The training step shared by every stage: Megatron DDP + optimizer + pipeline schedule + LR schedule."""
from megatron_r1.training.setup import TrainState, build_train_state
from megatron_r1.training.step import StepResult, train_step

__all__ = ["TrainState", "build_train_state", "StepResult", "train_step"]
