"""Result files: one GeoPackage per answer (a polygon layer per [SEG] step + an answers table) and one
mask GeoTIFF per step.

Every file is written to a hidden ``.partial`` file in the destination folder and then hard-linked to its
final name, which fails instead of overwriting: a crash mid-write never leaves a half-written result under
a real name, and an existing user file is never replaced (a free name such as ``answer-2.gpkg`` is used).
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from worker.measure import (
    Georef,
    MaskMeasurements,
    RasterError,
    measure_objects,
)

__all__ = ["ANSWERS_TABLE", "free_name", "write_mask_geotiff", "write_results"]

ANSWERS_TABLE = "terrascope_answers"
_PARTIAL = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]+\.partial(\.[a-z]+)?(-journal|-wal|-shm)?$")

#: (mask on the request grid, georef, label, score, image index, measurements or None)
Step = tuple[np.ndarray, Georef, str, float, int, "MaskMeasurements | dict | None"]


# ------------------------------------------------------------------------------------ atomic files
def free_name(folder: Path, stem: str, suffix: str, taken: set[str] | None = None) -> Path:
    """``stem+suffix``, or ``stem-2+suffix``, ``stem-3``... : the first name no file uses."""
    taken = taken or set()
    n = 1
    while True:
        name = f"{stem}{suffix}" if n == 1 else f"{stem}-{n}{suffix}"
        if name not in taken and not (folder / name).exists():
            return folder / name
        n += 1


def _partial_path(final: Path) -> Path:
    # keeps the real suffix last so GDAL picks the right driver and does not warn about the extension
    return final.with_name(f".{final.name}.{os.getpid()}.{os.urandom(4).hex()}.partial{final.suffix}")


def _publish(tmp: Path, final: Path) -> Path:
    """Give ``tmp`` its final name without ever replacing a file; on a name clash take the next free one."""
    target = final
    stem, suffix = _split_name(final.name)
    while True:
        try:
            os.link(tmp, target)  # atomic, and fails with EEXIST instead of overwriting
            break
        except FileExistsError:
            target = free_name(final.parent, stem, suffix, {target.name})
        except OSError as exc:  # filesystems without hard links (some FUSE/SMB mounts)
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
                raise
            if target.exists():
                target = free_name(final.parent, stem, suffix, {target.name})
                continue
            os.replace(tmp, target)
            return target
    tmp.unlink()
    return target


def _split_name(name: str) -> tuple[str, str]:
    for suffix in (".gpkg", ".tif"):
        if name.endswith(suffix):
            return name[: -len(suffix)], suffix
    p = Path(name)
    return p.stem, p.suffix


def _atomic_write(final: Path, write: Callable[[Path], None]) -> Path:
    tmp = _partial_path(final)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        return _publish(tmp, final)
    finally:
        for leftover in (tmp, Path(f"{tmp}-journal"), Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
            if leftover.exists():
                leftover.unlink()


def _remove_stale_partials(folder: Path) -> None:
    """Partial files of writers that died (SIGKILL, power loss) are removed on the next write."""
    for p in folder.glob(".*.partial*"):
        m = _PARTIAL.match(p.name)
        if not m:
            continue
        pid = int(m.group("pid"))
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            p.unlink(missing_ok=True)
        except PermissionError:
            pass  # alive, owned by someone else


# -------------------------------------------------------------------------------------- GeoTIFF
def write_mask_geotiff(path: Path, mask: np.ndarray, georef: Georef, tags: dict[str, Any] | None = None) -> Path:
    """uint8 mask GeoTIFF (1 = mask, 0 = background) on ``georef``'s grid, written atomically."""
    import rasterio

    m = np.asarray(mask)
    if m.ndim != 2 or m.size == 0:
        raise RasterError("bad_mask", f"mask must be a non-empty 2-D array, got shape {m.shape}")
    data = (m != 0).astype(np.uint8)
    h, w = data.shape
    profile: dict[str, Any] = {
        "driver": "GTiff", "width": w, "height": h, "count": 1, "dtype": "uint8",
        "transform": georef.transform, "compress": "deflate",
    }
    if georef.crs_wkt is not None:
        profile["crs"] = rasterio.crs.CRS.from_wkt(georef.crs_wkt)
    if h >= 256 and w >= 256:
        profile.update(tiled=True, blockxsize=256, blockysize=256)

    def write(tmp: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)  # no-CRS masks are fine
            dst = rasterio.open(tmp, "w", **profile)
        with dst:
            dst.write(data, 1)
            dst.set_band_description(1, "TerraScope mask (1 = selected)")
            if tags:
                dst.update_tags(**{k: _tag(v) for k, v in tags.items()})

    return _atomic_write(Path(path), write)


def _tag(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, default=str)


# ------------------------------------------------------------------------------------ GeoPackage
def _slug(text: str, n: int = 40) -> str:
    s = re.sub(r"[^a-z0-9]+", "_", (text or "").lower()).strip("_")
    return s[:n].rstrip("_") or "mask"


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, np.generic):
        return _json_safe(v.item())
    if hasattr(v, "to_dict"):
        return _json_safe(v.to_dict())
    return v


def _step_layer(step: int, mask: np.ndarray, georef: Georef, label: str, score: float, image: int,
                geotiff: str | None) -> tuple[Any, MaskMeasurements]:
    import geopandas as gpd

    meas, objects, per = measure_objects(mask, georef)
    metric = meas.units == "m"
    px_area = abs(georef.transform.determinant)
    rows = {
        "step": [step] * len(objects),
        "label": [label] * len(objects),
        "object": list(range(1, len(objects) + 1)),
        "area_ha": [a / 1e4 if metric else None for a, _ in per],
        "area_m2": [a if metric else None for a, _ in per],
        "perimeter_m": [p if metric else None for _, p in per],
        "area_px": [round(g.area / px_area) for g in objects],
        "score": [float(score)] * len(objects),
        "image": [int(image)] * len(objects),
        "mask_geotiff": [geotiff] * len(objects),
    }
    return gpd.GeoDataFrame(rows, geometry=objects, crs=georef.crs_wkt), meas


def write_results(
    out_dir: str | os.PathLike[str],
    question: str,
    result_dict: dict[str, Any],
    steps: Sequence[Step],
    stem: str = "answer",
) -> dict[str, Any]:
    """Write ``<stem>.gpkg`` (a polygon layer per step + the ``terrascope_answers`` table) and one
    ``<stem>-step<N>.tif`` per step into ``out_dir``; never overwrites; returns the paths.

    ``result_dict`` carries answer, choice, reasoning, text, model, timings_ms, ... (stored as-is in the table).
    """
    import pyogrio

    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(folder)
    gpkg_final = free_name(folder, stem, ".gpkg")
    file_stem = gpkg_final.name[: -len(".gpkg")]
    geotiffs: list[str] = []
    layers: list[str] = []
    frames = []
    step_meta: list[dict[str, Any]] = []
    for n, item in enumerate(steps):
        if len(item) != 6:
            raise RasterError("bad_argument", f"step {n} must be (mask, georef, label, score, image, measurements)")
        mask, georef, label, score, image, meas = item
        m = np.asarray(mask) != 0
        tif = write_mask_geotiff(
            free_name(folder, f"{file_stem}-step{n + 1}", ".tif"), m, georef,
            {"question": question, "step": n, "label": label, "score": float(score), "image": int(image)},
        )
        geotiffs.append(str(tif))
        layer = f"step{n + 1}_{_slug(label)}"
        while layer in layers:
            layer += "_"
        layers.append(layer)
        gdf, own = _step_layer(n, m, georef, label, score, image, tif.name)
        frames.append((layer, label, gdf))
        if meas is None:  # the caller's measurements (with valid pixels) win; else those of the mask alone
            meas = own
        step_meta.append({"step": n, "label": label, "layer": layer, "geotiff": tif.name, "score": float(score),
                          "image": int(image), "measurements": _json_safe(meas)})

    answer_row = {
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "question": question,
        "answer": str(result_dict.get("answer", "")),
        "choice": result_dict.get("choice"),
        "reasoning": str(result_dict.get("reasoning", "")),
        "text": str(result_dict.get("text", "")),
        "model": json.dumps(_json_safe(result_dict.get("model")), default=str),
        "steps_json": json.dumps(step_meta, default=str),
        "result_json": json.dumps(_json_safe(result_dict), default=str),
    }

    def write(tmp: Path) -> None:
        import pandas as pd

        meta = {"terrascope_question": question[:4000], "terrascope_answer": answer_row["answer"][:4000]}
        warnings.filterwarnings("ignore", message="'crs' was not provided", category=UserWarning)
        for layer, label, gdf in frames:
            pyogrio.write_dataframe(gdf, tmp, layer=layer, driver="GPKG", geometry_type="MultiPolygon",
                                    layer_metadata={**meta, "terrascope_label": label[:4000]},
                                    promote_to_multi=True)
        pyogrio.write_dataframe(pd.DataFrame([answer_row]), tmp, layer=ANSWERS_TABLE, driver="GPKG",
                                layer_metadata=meta)

    with warnings.catch_warnings():
        gpkg = _atomic_write(gpkg_final, write)
    return {"gpkg": str(gpkg), "geotiffs": geotiffs, "layers": layers, "table": ANSWERS_TABLE}
