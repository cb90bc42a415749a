"""A small Terra-CoT dataset built once per session from the copied test rasters + procedural scenes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model.data import augment, procedural, sources
from model.data.build import expand, synthesize
from model.data.splits import assign_splits

DATA = Path(__file__).resolve().parents[1] / "data"
FAIR = [("OAM-319295-270960-19", (319295, 270960, 19)), ("OAM-319295-270961-19", (319295, 270961, 19)),
        ("OAM-319298-270960-19", (319298, 270960, 19))]


def real_scenes() -> list:
    scenes = [sources.fair_tile(DATA / f"fair_zanzibar/{name}.tif", DATA / f"fair_zanzibar/{name}.mask.tif",
                                "zanzibar", xyz, 0.3) for name, xyz in FAIR]
    scenes += list(sources.spacenet_atlanta(DATA, quadrants=(0, 3)))
    scenes += list(sources.sen1floods11(DATA, quadrants=(0, 3)))
    scenes += list(sources.cloud_chips(DATA, chips=("adwp",)))
    return scenes


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("terra-cot") / "ds"
    rng = np.random.default_rng(0)
    real = real_scenes()
    assign_splits(real, val_fraction=0.3, seed=1)
    scenes = expand(real, rng, n_landcover=2, n_settlement=2, proc_val_fraction=0.0)
    scenes += [procedural.landcover(rng, 100), procedural.settlement(rng, 100)]
    scenes[-1].split = scenes[-2].split = "val"
    busiest = max((s for s in real if s.source == "fair_zanzibar"), key=lambda s: s.frames[0].labels["building"].sum())
    scenes.append(augment.series(busiest, "building", rng, n_frames=3))  # at least one series longer than two
    synthesize(scenes, out, n_train=260, n_val=140, rng=rng, meta={"test": True}, log=lambda *_: None)
    return out
