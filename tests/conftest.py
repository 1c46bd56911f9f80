"""Shared test setup: the repo root and tests/ on sys.path, quiet third-party loggers."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (str(ROOT), str(ROOT / "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)

for name in ("LyCORIS", "lycoris", "diffusers", "transformers"):
    logging.getLogger(name).setLevel(logging.ERROR)
