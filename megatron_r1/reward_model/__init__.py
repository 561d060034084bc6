"""R1's neural reward model: the scalar-head model (`model.py`), its preference data (`preferences.py`) and the
Bradley–Terry trainer (`trainer.py`, `stage: reward_model`). The reward that scores with it is
`rewards/reward_model.py`."""
