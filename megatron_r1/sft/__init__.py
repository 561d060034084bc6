"""Supervised fine-tuning (cold start, rejection-sampled SFT, distillation): loss on response tokens only."""
