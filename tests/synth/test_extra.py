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


def _ramp_folder(root: Path) -> Path:
    """A fAIr / ramp training folder as hotosm/fAIr-utilities lays it out: PNG tiles without georeferencing and
    label GeoTIFFs, made from the fixture's real Zanzibar tiles (folder 1) plus one put under folder 5."""
    import numpy as np
    import rasterio
    from PIL import Image

    for folder, name, src in (("1", "OAM-319295-270960-19", "OAM-319295-270960-19"),
                              ("1", "OAM-319295-270961-19", "OAM-319295-270961-19"),
                              ("5", "OAM-1263512-1056200-21", "OAM-319298-270960-19")):
        (root / "data" / folder).mkdir(parents=True, exist_ok=True)
        (root / "labels" / folder).mkdir(parents=True, exist_ok=True)
        with rasterio.open(DATA / f"fair_zanzibar/{src}.tif") as ds:
            Image.fromarray(np.moveaxis(ds.read(), 0, -1)).save(root / "data" / folder / f"{name}.png")
        shutil.copy(DATA / f"fair_zanzibar/{src}.mask.tif", root / "labels" / folder / f"{name}.tif")
    Image.new("RGB", (256, 256)).save(root / "data" / "5" / "OAM-1263512-1056201-21.png")  # no label: skipped
    return root


def test_ramp_tiles_read_like_the_eo_samples_fair_tiles(tmp_path: Path) -> None:
    import numpy as np
    import pytest

    ramp = _ramp_folder(tmp_path / "ramp")
    scenes = {s.id: s for s in sources.ramp_tiles(ramp)}
    assert sorted(scenes) == ["fair_nairobi_OAM-1263512-1056200-21", "fair_zanzibar_OAM-319295-270960-19",
                              "fair_zanzibar_OAM-319295-270961-19"]
    # the same ground as the EO samples' tile: same id and block, pixels through the same preparation, same mask
    ours = scenes["fair_zanzibar_OAM-319295-270960-19"]
    theirs = _tiles("OAM-319295-270960-19", "fair_zanzibar_OAM-319295-270960-19", (319295, 270960, 19))
    assert ours.block == theirs.block == f"fair_zanzibar_z18_{319295 // 2}_{270960 // 2}"  # the zoom-18 parent
    assert np.array_equal(ours.frames[0].pixels, theirs.frames[0].pixels)
    assert np.array_equal(ours.frames[0].labels["building"], theirs.frames[0].labels["building"])
    assert ours.gsd_m == pytest.approx(156543.034 * np.cos(np.radians(6.2)) / 2**19, rel=0.01)  # z19 at ~6 deg S
    assert scenes["fair_nairobi_OAM-1263512-1056200-21"].block == f"fair_nairobi_z18_{1263512 // 8}_{1056200 // 8}"
    with pytest.raises(sources.SourceError, match="not a fAIr / ramp training folder"):
        list(sources.ramp_tiles(tmp_path))


def test_ramp_tiles_join_train_outside_validation_blocks_and_are_credited(built: Path, tmp_path: Path) -> None:
    from model.data.extra import main

    data = tmp_path / "ds"
    shutil.copytree(built, data)
    tiles = json.loads((data / "tiles.json").read_text())
    val_blocks = {t["block"] for t in tiles if t["split"] == "val"}
    ramp = _ramp_folder(tmp_path / "ramp")
    in_val = [s.id for s in sources.ramp_tiles(ramp) if s.block in val_blocks]
    known = {t["id"] for t in tiles}
    assert main(["--ramp", str(ramp), "--data", str(data), "--l1-per-tile", "1"]) == 0
    extra = json.loads((data / "build.json").read_text())["extra"][-1]
    added = {t["id"] for t in json.loads((data / "tiles.json").read_text())} - known
    assert not added & set(in_val) and "fair_nairobi_OAM-1263512-1056200-21" in added
    assert extra["tiles_skipped_val"] == len(in_val) and extra["tiles_added"] == len(added)
    credit = (data / "ATTRIBUTION.md").read_text()
    assert credit.count("model.data.extra --ramp") == 1 and "OpenAerialMap" in credit
    assert main(["--ramp", str(tmp_path), "--data", str(data)]) == 2  # not a ramp folder: a clear error
