"""R1-Zero GRPO: rollout -> reward -> group advantage -> old/ref log-probs -> clipped policy updates -> refit."""
