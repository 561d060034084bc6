"""The package's console logger (stderr, `MEGATRON_R1_LOG_LEVEL`); imports nothing of the package."""
from __future__ import annotations

import logging
import os
import sys


def get_logger(name: str = "megatron_r1") -> logging.Logger:
    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(os.environ.get("MEGATRON_R1_LOG_LEVEL", "INFO"))
        logger.propagate = False
    return logger
