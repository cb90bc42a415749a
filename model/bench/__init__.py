"""TerraScope-Bench: generator (from a built dataset's held-back tiles), JSONL format, official parquet
reader, evaluator (through the worker's own ask path), report and plot. CLI: ``terrascope bench``.
"""

from __future__ import annotations
