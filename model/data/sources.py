"""Real scenes from the EO samples folder (read once, at build time; never at test or run time).

Each loader returns base scenes (tiles) with a spatial ``block`` key. Tiles of one block never end up
in different splits; blocks are coarse enough that no two blocks share ground:
* fAIr buildings: the zoom-18 slippy tile that contains the tile (the z19/z20/z21 pyramid of one place
  falls in one block);
* single large scenes (SpaceNet Atlanta, Sen1Floods11, cloud chips): quadrants; NC: west/east halves;
* Open Cities: one block per drone tile.
Pixels go through the worker's own preparation (band choice, stretch, SAR dB -> 3 channels), so the
model is trained on exactly the view it gets at run time.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from model.data.scene import Frame, Scene
from worker.measure import Georef
from worker.raster import prepare_array

#: NC landclass96 codes -> our class names (1996 map; agriculture is cropland).
NC_CLASSES = {1: "developed", 2: "cropland", 3: "grassland", 4: "shrubland", 5: "forest", 6: "water", 7: "sediment"}
NC_VOCAB = tuple(NC_CLASSES.values())


class SourceError(ValueError):
    """The EO samples folder is missing a file or has an unexpected layout."""


def _open(path: Path):
    import rasterio

    if not path.is_file():
        raise SourceError(f"missing sample file {path}")
    return rasterio.open(path)


def _read(path: Path) -> tuple[np.ndarray, Georef, list[str]]:
    with _open(path) as ds:
        data = ds.read()
        georef = Georef.from_dataset(ds)
        names = [d or ci.name for d, ci in zip(ds.descriptions, ds.colorinterp)]
    return data, georef, names


def _view(data: np.ndarray, georef: Georef, names: list[str] | None, role: str = "optical",
          sensor: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    prep = prepare_array(data, georef, band_names=names, role=role, sensor=sensor, max_side=1 << 16)
    return prep.pixels, prep.valid


def load_manifest(src: Path) -> list[dict]:
    path = src / "MANIFEST.json"
    if not path.is_file():
        raise SourceError(f"{src} is not an EO samples folder (no MANIFEST.json)")
    return json.loads(path.read_text())["samples"]


# ---------------------------------------------------------------------------------------------- fAIr
def fair_tile(image: Path, mask: Path, aoi: str, xyz: tuple[int, int, int], resolution_m: float = 0.0,
              sample_id: str | None = None) -> Scene:
    """One fAIr building tile (256 x 256 aerial RGB + building mask); block = its zoom-18 parent tile."""
    data, georef, names = _read(image)
    with _open(mask) as ds:
        m = ds.read(1) > 0
    return _fair_scene(data, georef, names, m, aoi, xyz, resolution_m, sample_id)


def _fair_scene(data: np.ndarray, georef: Georef, names: list[str] | None, mask: np.ndarray, aoi: str,
                xyz: tuple[int, int, int], resolution_m: float, sample_id: str | None) -> Scene:
    x, y, z = xyz
    pixels, valid = _view(data, georef, names, sensor="rgb")
    return Scene(
        id=sample_id or f"fair_{aoi}_OAM-{x}-{y}-{z}", source=f"fair_{aoi}",
        block=f"fair_{aoi}_z18_{x >> (z - 18)}_{y >> (z - 18)}", georef=georef,
        frames=[Frame(pixels, "optical", {"building": mask})], valid=valid, vocabulary=("building",),
        countable=("building",), sensor="aerial RGB", gsd_m=float(resolution_m or 0.0), notes=[f"z{z}"],
    )


def fair_tiles(src: Path, zooms: tuple[int, ...] = (19, 20, 21), max_per_aoi: int | None = None,
               seed: int = 0) -> Iterator[Scene]:
    """fAIr building tiles of every city in the manifest (``max_per_aoi`` keeps z19/z20 first)."""
    samples = [s for s in load_manifest(src) if s["source"] == "fair_buildings" and "tile_xyz" in s]
    rng = np.random.default_rng(seed)
    by_aoi: dict[str, list[dict]] = {}
    for s in samples:
        if s["tile_xyz"][2] in zooms:
            by_aoi.setdefault(s["aoi"], []).append(s)
    for aoi in sorted(by_aoi):
        items = sorted(by_aoi[aoi], key=lambda s: s["id"])
        if max_per_aoi is not None and len(items) > max_per_aoi:
            # keep every z19/z20 tile first (more buildings per tile), then a random z21 subset
            items.sort(key=lambda s: (s["tile_xyz"][2], rng.random()))
            items = sorted(items[:max_per_aoi], key=lambda s: s["id"])
        for s in items:
            yield fair_tile(src / s["images"][0]["file"], src / s["labels"][0]["file"], aoi,
                            tuple(s["tile_xyz"]), float(s.get("resolution_m") or 0.0), s["id"])


#: Folders of the fAIr / ramp training data (hotosm/fAIr-utilities, ramp-data/TRAIN/HOTOSM/2 at commit d83e21c)
#: -> the place they show. The EO samples hold folders 1 (part), 2 and 3 under these same names, so a tile of
#: theirs keeps its id and zoom-18 block (and stays out of validation blocks); 4 and 5 are new places.
RAMP_AOIS = {"1": "zanzibar", "2": "kampala", "3": "kathmandu", "4": "catanduanes", "5": "nairobi"}
_RAMP_NAME = re.compile(r"^OAM-(\d+)-(\d+)-(\d+)$")


def ramp_tiles(ramp: Path, zooms: tuple[int, ...] = (19, 20, 21)) -> Iterator[Scene]:
    """Every tile of a fAIr / ramp training folder: ``data/<n>/OAM-x-y-z.png`` (RGB) with
    ``labels/<n>/OAM-x-y-z.tif`` (the building mask, whose georeferencing the PNG lacks)."""
    if not (ramp / "data").is_dir() or not (ramp / "labels").is_dir():
        raise SourceError(f"{ramp} is not a fAIr / ramp training folder (no data/ and labels/)")
    from PIL import Image

    for folder, aoi in RAMP_AOIS.items():
        for png in sorted((ramp / "data" / folder).glob("OAM-*.png")):
            m = _RAMP_NAME.match(png.stem)
            label = ramp / "labels" / folder / f"{png.stem}.tif"
            if not m or not label.is_file() or int(m.group(3)) not in zooms:
                continue
            x, y, z = (int(v) for v in m.groups())
            with _open(label) as ds:
                mask = ds.read(1) > 0
                georef = Georef.from_dataset(ds)
            rgb = np.asarray(Image.open(png).convert("RGB"))
            if rgb.shape[:2] != mask.shape:
                raise SourceError(f"{png} is {rgb.shape[1]} x {rgb.shape[0]} but its label is "
                                  f"{mask.shape[1]} x {mask.shape[0]}")
            lat = math.degrees(math.atan(math.sinh(math.pi * (1 - 2 * (y + 0.5) / 2 ** z))))
            gsd = 40075016.686 * math.cos(math.radians(lat)) / (256 * 2 ** z)
            yield _fair_scene(rgb.transpose(2, 0, 1), georef, ["red", "green", "blue"], mask, aoi, (x, y, z), gsd,
                              None)


# ------------------------------------------------------------------------------------ SpaceNet Atlanta
def _quadrants(h: int, w: int) -> list[tuple[int, int, int, int]]:
    hh, hw = h // 2, w // 2
    return [(0, 0, hh, hw), (0, hw, hh, w - hw), (hh, 0, h - hh, hw), (hh, hw, h - hh, w - hw)]


def spacenet_atlanta(src: Path, quadrants: tuple[int, ...] = (0, 1, 2, 3)) -> Iterator[Scene]:
    """WorldView-2 pan 0.5 m, 900 x 900, split into four 450 x 450 quadrant blocks."""
    data, georef, names = _read(src / "spacenet_atlanta/sample_geotiff.tif")
    with _open(src / "spacenet_atlanta/building_mask.tif") as ds:
        mask = ds.read(1) > 0
    for q, (r0, c0, h, w) in enumerate(_quadrants(*mask.shape)):
        if q not in quadrants:
            continue
        sub = data[:, r0:r0 + h, c0:c0 + w]
        g = georef.shifted(c0, r0)
        pixels, valid = _view(sub, g, names)
        yield Scene(
            id=f"spacenet_atlanta_q{q}", source="spacenet_atlanta", block=f"atlanta_q{q}", georef=g,
            frames=[Frame(pixels, "optical", {"building": mask[r0:r0 + h, c0:c0 + w].copy()})], valid=valid,
            vocabulary=("building",), countable=("building",), sensor="WorldView-2 pan", gsd_m=0.5,
        )


# ---------------------------------------------------------------------------------------- Open Cities
def _pool2(arr: np.ndarray) -> np.ndarray:
    """2 x 2 mean pooling of an HxWxC image (drone 2 cm -> 4 cm keeps roofs legible at a 512 tile)."""
    h, w = arr.shape[0] // 2 * 2, arr.shape[1] // 2 * 2
    a = arr[:h, :w].astype(np.float32)
    return ((a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2]) / 4.0 + 0.5).astype(np.uint8)


def _majority2(mask: np.ndarray) -> np.ndarray:
    h, w = mask.shape[0] // 2 * 2, mask.shape[1] // 2 * 2
    m = mask[:h, :w].astype(np.uint8)
    s = m[0::2, 0::2] + m[1::2, 0::2] + m[0::2, 1::2] + m[1::2, 1::2]
    checker = (np.arange(h // 2)[:, None] + np.arange(w // 2)[None]) % 2 == 0  # 2-of-4 ties alternate: unbiased
    return (s >= 3) | ((s == 2) & checker)


def open_cities(src: Path) -> Iterator[Scene]:
    """Accra drone tiles, 1024 x 1024 at 2 cm, pooled to 4 cm; one block per tile.

    The two upstream tiles overlap by a few pixel rows (921 lies just south of 920): those rows are cut
    from 921 so that the two blocks share no ground.
    """
    prev_bottom = None
    for tile in ("665946_tile_920", "665946_tile_921"):
        data, georef, names = _read(src / f"opencities/{tile}.tif")
        with _open(src / f"opencities/{tile}_mask.tif") as ds:
            mask = ds.read(1) > 0
        cut = 0
        if prev_bottom is not None:
            t = georef.transform
            overlap_rows = (t.f - prev_bottom) / -t.e
            cut = int(np.ceil(max(overlap_rows, 0.0) / 2.0 + 1e-9)) * 2 if overlap_rows > 0 else 0
        prev_bottom = georef.transform.f + georef.transform.e * data.shape[1]
        if cut:
            data, mask, georef = data[:, cut:], mask[cut:], georef.shifted(0, cut)
        pixels, valid = _view(data, georef, names, sensor="rgb")
        if not valid.all():
            raise SourceError(f"{tile}: transparent pixels; the tile loader expects a full tile")
        pooled = _pool2(pixels)
        yield Scene(
            id=f"opencities_{tile}", source="opencities", block=f"opencities_{tile}", georef=georef.scaled(2, 2),
            frames=[Frame(pooled, "optical", {"building": _majority2(mask)})],
            valid=np.ones(pooled.shape[:2], bool), vocabulary=("building",), countable=("building",),
            sensor="drone RGB", gsd_m=0.04, notes=[f"top {cut} rows cut (overlap with the tile to the north)"] if cut
            else [],
        )


# ---------------------------------------------------------------------------------------- Sen1Floods11
def sen1floods11(src: Path, quadrants: tuple[int, ...] = (0, 1, 2, 3)) -> Iterator[Scene]:
    """Spain flood chip: S2 optical + S1 SAR (dB) pair with the hand water label; four 256 quadrants."""
    base = src / "sen1floods11"
    s2, georef, s2_names = _read(base / "Spain_7370579_S2Hand.tif")
    s1, g1, s1_names = _read(base / "Spain_7370579_S1Hand.tif")
    if g1.transform != georef.transform or s1.shape[1:] != s2.shape[1:]:
        raise SourceError("Sen1Floods11 S1 and S2 chips are not on one grid")
    with _open(base / "Spain_7370579_LabelHand.tif") as ds:
        label = ds.read(1)
    water = label == 1  # -1 (99 px of nodata) counts as not water: the image itself is valid there
    for q, (r0, c0, h, w) in enumerate(_quadrants(*water.shape)):
        if q not in quadrants:
            continue
        g = georef.shifted(c0, r0)
        opt_px, valid = _view(s2[:, r0:r0 + h, c0:c0 + w], g, s2_names)
        raw = s1[:, r0:r0 + h, c0:c0 + w].astype(np.float32)
        sar_px, sar_valid = _view(raw, g, list(s1_names), role="sar")
        yield Scene(
            id=f"sen1floods11_q{q}", source="sen1floods11", block=f"sen1floods11_q{q}", georef=g,
            frames=[Frame(opt_px, "optical", {"water": water[r0:r0 + h, c0:c0 + w].copy()}, date="2019-09-18"),
                    Frame(sar_px, "sar", {}, raw=raw, band_names=["VV", "VH"], date="2019-09-17")],
            valid=valid & sar_valid, vocabulary=("water",), countable=("water",), kind="pair",
            sensor="Sentinel-2 L1C + Sentinel-1 GRD", gsd_m=10.0,
        )


# -------------------------------------------------------------------------------------------- clouds
def cloud_chips(src: Path, chips: tuple[str, ...] = ("adwp", "aeey")) -> Iterator[Scene]:
    """Sentinel-2 L2A cloud chips (Tanzania), 512 -> four 256 quadrants each."""
    for chip in chips:
        data, georef, names = _read(src / f"cloud_s2/{chip}_B02_B03_B04_B08.tif")
        with _open(src / f"cloud_s2/{chip}_cloud_mask.tif") as ds:
            cloud = ds.read(1) == 1
        for q, (r0, c0, h, w) in enumerate(_quadrants(*cloud.shape)):
            g = georef.shifted(c0, r0)
            pixels, valid = _view(data[:, r0:r0 + h, c0:c0 + w], g, names)
            yield Scene(
                id=f"cloud_{chip}_q{q}", source="cloud_s2", block=f"cloud_{chip}_q{q}", georef=g,
                frames=[Frame(pixels, "optical", {"cloud": cloud[r0:r0 + h, c0:c0 + w].copy()})], valid=valid,
                vocabulary=("cloud",), countable=(), sensor="Sentinel-2 L2A", gsd_m=10.0,
            )


# -------------------------------------------------------------------------------------- NC land cover
def nc_landcover(src: Path, tiles: tuple[int, ...] = (256, 160), stride: int = 51) -> Iterator[Scene]:
    """Landsat-7 2000 RGB at 28.5 m with landclass96 (1996) resampled (nearest) onto the Landsat grid.

    Blocks: west / east halves. Crops of each size in ``tiles`` lie wholly inside one half (``stride``
    apart), so one block yields several overlapping views at two scales.
    """
    base = src / "nc_landcover"
    data, georef, names = _read(base / "nc_north_lsat7_2000_b1_b2_b3_b4_b5_b7.tif")
    with _open(base / "nc_north_landclass96.tif") as ds:
        lab = ds.read(1)
        lt = ds.transform
    h, w = data.shape[1:]
    # label pixel under each Landsat pixel centre (the grids are offset by half a pixel)
    t = georef.transform
    cols = np.floor(((t.c + (np.arange(w) + 0.5) * t.a) - lt.c) / lt.a).astype(int)
    rows = np.floor(((t.f + (np.arange(h) + 0.5) * t.e) - lt.f) / lt.e).astype(int)
    inside = (rows[:, None] >= 0) & (rows[:, None] < lab.shape[0]) & (cols[None] >= 0) & (cols[None] < lab.shape[1])
    codes = lab[np.clip(rows, 0, lab.shape[0] - 1)][:, np.clip(cols, 0, lab.shape[1] - 1)]
    holes = inside & (codes == 0)  # one unlabelled pixel in the map: take its nearest labelled neighbour
    if holes.any():
        from scipy import ndimage

        idx = ndimage.distance_transform_edt(holes, return_distances=False, return_indices=True)
        codes = codes[idx[0], idx[1]]
    pixels, valid = _view(data, georef, names)
    valid = valid & inside
    half = w // 2
    for tile, (name, (c_lo, c_hi)) in ((t, b) for t in tiles for b in (("west", (0, half)), ("east", (half, w)))):
        c0s = list(range(c_lo, c_hi - tile + 1, stride)) or [c_lo]
        r0s = list(range(0, h - tile + 1, stride)) or [0]
        for r0 in r0s:
            for c0 in c0s:
                v = valid[r0:r0 + tile, c0:c0 + tile]
                if v.shape != (tile, tile) or not v.all():
                    continue
                sub = codes[r0:r0 + tile, c0:c0 + tile]
                labels = {cls: sub == code for code, cls in NC_CLASSES.items()}
                yield Scene(
                    id=f"nc_{name}_r{r0}_c{c0}_{tile}", source="nc_landcover", block=f"nc_{name}",
                    georef=georef.shifted(c0, r0), frames=[Frame(pixels[r0:r0 + tile, c0:c0 + tile].copy(),
                                                                  "optical", labels, date="2000")],
                    valid=v.copy(), vocabulary=NC_VOCAB, countable=("water",), sensor="Landsat-7 ETM+",
                    gsd_m=28.5, notes=["land cover 1996, imagery 2000"],
                )


def all_real(src: Path, fair_max_per_aoi: int | None = None, seed: int = 0) -> list[Scene]:
    """Every real base scene, in a stable order."""
    scenes: list[Scene] = []
    scenes += list(fair_tiles(src, max_per_aoi=fair_max_per_aoi, seed=seed))
    scenes += list(spacenet_atlanta(src))
    scenes += list(open_cities(src))
    scenes += list(sen1floods11(src))
    scenes += list(cloud_chips(src))
    scenes += list(nc_landcover(src))
    for s in scenes:
        s.check()
    return scenes
