"""Adding real tiles to a built dataset's train split: validation untouched, blocks kept apart, answers exact."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from model.data import sources
from model.data.extra import add_tiles, neighbours
from model.data.verify import check_record

DATA = Path(__file__).resolve().parents[1] / "data"

EXTRA = [("OAM-319295-270960-19", (319295, 270960, 19)), ("OAM-319295-270961-19", (319295, 270961, 19)),
         ("OAM-319298-270960-19", (319298, 270960, 19))]


def _tiles(name: str, scene_id: str, xyz: tuple[int, int, int]):
    return sources.fair_tile(DATA / f"fair_zanzibar/{name}.tif", DATA / f"fair_zanzibar/{name}.mask.tif",
                             "zanzibar", xyz, 0.3, sample_id=scene_id)


def test_added_tiles_go_to_train_outside_validation_blocks(built: Path, tmp_path: Path) -> None:
    data = tmp_path / "ds"
    shutil.copytree(built, data)
    tiles = json.loads((data / "tiles.json").read_text())
    val_before = (data / "val.jsonl").read_text()
    n_train = len((data / "train.jsonl").read_text().splitlines())
    val_blocks = {t["block"] for t in tiles if t["split"] == "val"}
    # the same ground under new ids: a tile whose block is a validation block must be refused
    fresh = [_tiles(name, f"copy_{name}", xyz) for name, xyz in EXTRA]
    in_val = [s for s in fresh if s.block in val_blocks]
    assert in_val and len(in_val) < len(fresh)  # the fixture holds one of the two fAIr blocks back
    extra = add_tiles(data, fresh, l1_per_tile=1, seed=3, log=lambda *_: None)
    assert extra["tiles_added"] == len(fresh) - len(in_val)
    assert extra["tiles_skipped_val"] == len(in_val)
    assert (data / "val.jsonl").read_text() == val_before
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    added = rows[n_train:]
    assert len(added) == extra["records_added"] > 0
    assert {r["split"] for r in added} == {"train"}
    assert any(r["kind"] == "res" for r in added)
    new_tiles = {t["id"]: t for t in json.loads((data / "tiles.json").read_text())}
    for r in added:
        assert new_tiles[r["scene"]]["block"] not in val_blocks
        assert check_record(data, r, new_tiles[r["scene"]]) == []
    assert json.loads((data / "build.json").read_text())["extra"][-1]["records_added"] == len(added)


def test_margin_refuses_the_blocks_around_validation(built: Path, tmp_path: Path) -> None:
    data = tmp_path / "ds"
    shutil.copytree(built, data)
    val_blocks = {t["block"] for t in json.loads((data / "tiles.json").read_text()) if t["split"] == "val"}
    fresh = [_tiles(name, f"copy_{name}", xyz) for name, xyz in EXTRA]
    near = [s for s in fresh if any(s.block in neighbours(b) for b in val_blocks)]
    extra = add_tiles(data, fresh, margin=1, log=lambda *_: None)
    assert extra["tiles_skipped_val"] == len(near)
    assert neighbours("fair_zanzibar_z18_10_20") >= {"fair_zanzibar_z18_9_19", "fair_zanzibar_z18_11_21"}
