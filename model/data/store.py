"""The built dataset on disk: self-contained, compact, readable without the EO samples.

Layout of ``DIR``::

    tiles.json         JSON list, one scene per line: split, block, georef, frames (image, role, class masks)
    images/*.tif       GeoTIFF per frame: optical = 8-bit RGB (JPEG-in-TIFF), SAR = float32 VV/VH dB
    masks/*.png        1-bit PNG masks on the image grid, shared by content hash
    train.jsonl, val.jsonl   records (see ``record_json``), paths relative to DIR
    build.json         the command, seed, counts and sizes

Images are stored as a user would hand them to the worker (GeoTIFF with its georeferencing), and are
read back with the worker's own ``read_raster`` + ``prepare_array`` (``load_image``): training, the
bench and the plugin see the very same pixels.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from model.data.answer_notes import spans_with_answers
from model.data.facts import Facts
from model.data.records import Record
from model.data.scene import Frame, Scene
from worker.measure import Georef

JPEG_QUALITY = 85


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def short_crs(wkt: str | None) -> str | None:
    """"EPSG:nnnn" when the WKT is exactly that EPSG code (keeps tiles.json small), else the WKT."""
    if wkt is None:
        return None
    from pyproj import CRS

    crs = CRS.from_wkt(wkt)
    code = crs.to_epsg(min_confidence=100)
    return f"EPSG:{code}" if code and CRS.from_epsg(code) == crs else wkt


def georef_json(g: Georef) -> dict:
    return {"geotransform": list(g.to_gdal()), "crs": short_crs(g.crs_wkt)}


def georef_from_json(d: dict) -> Georef:
    return Georef.from_gdal(d["geotransform"], d.get("crs"))


def write_image(path: Path, frame: Frame, georef: Georef) -> None:
    import rasterio

    path.parent.mkdir(parents=True, exist_ok=True)
    common = {"driver": "GTiff", "width": frame.pixels.shape[1], "height": frame.pixels.shape[0],
              "crs": georef.crs_wkt, "transform": georef.transform}
    if frame.raw is not None:
        raw = frame.raw.astype(np.float32)
        # LERC with a 0.05 dB error bound: far below speckle (1-2 dB), half the bytes of lossless deflate
        with rasterio.open(path, "w", count=raw.shape[0], dtype="float32", compress="lerc_deflate",
                           max_z_error=0.05, **common) as ds:
            ds.write(raw)
            for i, name in enumerate(frame.band_names or [], 1):
                ds.set_band_description(i, name)
        return
    with rasterio.open(path, "w", count=3, dtype="uint8", compress="jpeg", photometric="ycbcr",
                       jpeg_quality=JPEG_QUALITY, **common) as ds:
        ds.write(np.moveaxis(frame.pixels, -1, 0))
        for i, name in enumerate(("red", "green", "blue"), 1):
            ds.set_band_description(i, name)


def write_mask(path: Path, mask: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(mask, bool)).save(path, optimize=True)


def load_mask(path: str | Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.array(im.convert("1"), dtype=bool)


def load_image(path: str | Path, role: str = "optical") -> np.ndarray:
    """HxWx3 uint8 exactly as the worker prepares this file for the model (band choice, stretch, SAR)."""
    from worker.raster import prepare_array, read_raster

    data, georef, nodata, names = read_raster(str(path), max_side=1 << 16)
    return prepare_array(data, georef, nodata=nodata, band_names=names, role="sar" if role == "sar" else "optical",
                         max_side=1 << 16).pixels


def read_georef(path: str | Path) -> Georef:
    import rasterio

    with rasterio.open(path) as ds:
        return Georef.from_dataset(ds)


class MaskStore:
    """Writes each distinct mask once (content hash) and hands out its relative path."""

    def __init__(self, root: Path):
        self.root = root
        self.paths: dict[str, str] = {}

    def put(self, mask: np.ndarray) -> str:
        m = np.asarray(mask, bool)
        h = hashlib.sha1(np.packbits(m).tobytes() + str(m.shape).encode()).hexdigest()[:16]
        if h not in self.paths:
            rel = f"masks/{h}.png"
            write_mask(self.root / rel, m)
            self.paths[h] = rel
        return self.paths[h]


class DatasetWriter:
    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.masks = MaskStore(root)
        self.scene_paths: dict[str, list[str]] = {}
        self.tiles: list[dict] = []

    def scene(self, scene: Scene) -> list[str]:
        """Writes a scene's frames and label masks once; returns the frame image paths."""
        if scene.id in self.scene_paths:
            return self.scene_paths[scene.id]
        paths, frames = [], []
        for i, f in enumerate(scene.frames):
            rel = f"images/{safe_name(scene.id)}_{i}.tif"
            write_image(self.root / rel, f, scene.georef)
            paths.append(rel)
            frames.append({"path": rel, "role": f.role, "date": f.date,
                           "labels": {c: self.masks.put(m) for c, m in sorted(f.labels.items())}})
        self.tiles.append({
            "id": scene.id, "split": scene.split, "source": scene.source, "block": scene.block, "kind": scene.kind,
            "origin": scene.origin, "label_status": scene.label_status, "parent": scene.parent,
            "sensor": scene.sensor, "gsd_m": scene.gsd_m, "georef": georef_json(scene.georef),
            "shape": list(scene.shape), "valid": None if scene.valid.all() else self.masks.put(scene.valid),
            "vocabulary": list(scene.vocabulary), "countable": list(scene.countable), "frames": frames,
            "notes": scene.notes,
        })
        self.scene_paths[scene.id] = paths
        return paths

    def record_json(self, rec: Record) -> dict:
        facts = rec.facts or Facts(rec.scene)
        paths = self.scene(rec.scene)
        images = [{"path": paths[f], "role": role} for f, role in zip(rec.view.frames, rec.view.roles)]
        masks = [facts.mask(s.frame, s.name) for s in rec.segs]
        spans = spans_with_answers(rec.question, rec.choices, rec.answer, [s.grounding for s in rec.segs], masks,
                                   [s.label for s in rec.segs], [s.image for s in rec.segs], rec.view.roles,
                                   rec.scene.georef, rec.scene.valid)
        segs = [{"path": self.masks.put(m), "image": s.image, "label": s.label, "grounding": g}
                for s, m, g in zip(rec.segs, masks, spans)]
        out = {"id": rec.id, "kind": rec.kind, "task": rec.task, "images": images, "question": rec.question}
        if rec.choices is not None:
            out["choices"] = rec.choices
        out.update({"answer": rec.answer, "target": rec.target, "seg_masks": segs, "split": rec.scene.split,
                    "scene": rec.scene.id, "check": rec.check})
        return out

    def write_records(self, name: str, rows: Iterable[dict]) -> int:
        n = 0
        with (self.root / name).open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")
                n += 1
        return n

    def finish(self, meta: dict) -> dict:
        # a JSON list (not .jsonl): record readers glob *.jsonl and must not mistake scenes for records
        body = ",\n".join(json.dumps(t, separators=(",", ":")) for t in self.tiles)
        (self.root / "tiles.json").write_text(f"[\n{body}\n]\n", encoding="utf-8")
        meta = dict(meta)
        meta["bytes"] = dataset_bytes(self.root)
        (self.root / "build.json").write_text(json.dumps(meta, indent=1))
        return meta


def dataset_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def read_jsonl(path: str | Path) -> list[dict]:
    out = []
    with Path(path).open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{n}: invalid JSON ({exc.msg})") from None
    return out


def load_records(root: str | Path, split: str) -> list[dict]:
    path = Path(root) / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {root} a dataset built by model.data.build?")
    return read_jsonl(path)


def load_tiles(root: str | Path, split: str | None = None) -> list[dict]:
    path = Path(root) / "tiles.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {root} a dataset built by model.data.build?")
    return [t for t in json.loads(path.read_text(encoding="utf-8")) if split is None or t["split"] == split]


def scene_from_tile(root: str | Path, tile: dict) -> Scene:
    """Rebuild a Scene from its stored files (pixels through the worker's preparation)."""
    root = Path(root)
    georef = georef_from_json(tile["georef"])
    h, w = tile["shape"]
    frames = []
    for f in tile["frames"]:
        pixels = load_image(root / f["path"], f["role"])
        raw = band_names = None
        if f["role"] == "sar":
            import rasterio

            with rasterio.open(root / f["path"]) as ds:
                raw, band_names = ds.read().astype(np.float32), list(ds.descriptions)
        labels = {c: load_mask(root / p) for c, p in f["labels"].items()}
        frames.append(Frame(pixels, f["role"], labels, raw, band_names, f.get("date")))
    valid = np.ones((h, w), bool) if tile["valid"] is None else load_mask(root / tile["valid"])
    return Scene(id=tile["id"], source=tile["source"], block=tile["block"], georef=georef, frames=frames,
                 valid=valid, vocabulary=tuple(tile["vocabulary"]), countable=tuple(tile["countable"]),
                 kind=tile["kind"], origin=tile["origin"], label_status=tile["label_status"], sensor=tile["sensor"],
                 gsd_m=tile["gsd_m"], parent=tile["parent"], split=tile["split"], notes=list(tile.get("notes", [])))
