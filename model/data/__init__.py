"""Terra-CoT data: real and procedural scenes, augmentation, L1/L2/RES/Cap-CoT synthesis, dataset export.

Every answer is computed from ground-truth masks and the scene's georeferencing with the worker's own
measurement library (``worker.measure``), so the numbers a model learns are the numbers a user gets.
Entry point: ``python -m model.data.build --src EO_SAMPLES --out DIR`` (see ``docs/BENCH.md``).
"""

from __future__ import annotations
