"""megatron-r1: the DeepSeek-R1 training recipe on NVIDIA Megatron-Core."""

__version__ = "0.1.0"
