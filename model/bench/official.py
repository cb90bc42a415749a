"""Read the official TerraScope-Bench parquet (``sy1998/TerraScope-Bench``, ``data/TerraScope_bench.parquet``).

Columns as the official ``infer_terrascope_bench.py`` reads them: ``image`` (a dict {"bytes", "path"} or raw
bytes), ``task_type``, ``question``, ``candidates`` (a dict letter -> text, or that dict as a JSON string) and
``answer`` (the letter). Images are written to PNG files in a folder so that they go through the worker path
like any raster (they carry no georeferencing: measurements are then in pixels, and the worker says so).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from model.bench.format import BenchFormatError, BenchImage, BenchItem

REQUIRED_COLUMNS = ("image", "task_type", "question", "candidates", "answer")
#: Official task_type strings seen in the release ("coverage_percentage", "boundary_detection", ...) are
#: mapped by keyword; an unknown task type is an error naming it.
_TASK_KEYWORDS = (("coverage", "CA"), ("percent", "CA"), ("boundary", "BRD"), ("border", "BRD"),
                  ("distance", "DM"), ("compar", "CR"), ("rank", "CR"), ("change", "BCE"), ("damage", "BCE"),
                  ("destroy", "BCE"), ("area", "AQ"), ("quantif", "AQ"), ("count", "COUNT"))


def task_code(task_type: str) -> str:
    t = str(task_type).strip()
    if t.upper() in ("CA", "AQ", "CR", "BRD", "DM", "BCE", "COUNT"):
        return t.upper()
    low = t.lower()
    for key, code in _TASK_KEYWORDS:
        if key in low:
            return code
    raise BenchFormatError(f"unknown official task_type {task_type!r}; known keywords: "
                           f"{sorted({k for k, _ in _TASK_KEYWORDS})}")


def _read_table(path: Path):
    try:
        import pandas as pd

        return pd.read_parquet(path)
    except ImportError as exc:
        raise BenchFormatError(f"reading {path.name} needs pyarrow (pip install pyarrow): {exc}") from None


def check_columns(columns: list[str], path: str | Path = "parquet") -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise BenchFormatError(
            f"{path}: not the official TerraScope-Bench layout: missing column(s) {missing}; expected "
            f"{list(REQUIRED_COLUMNS)} (as the official infer_terrascope_bench.py reads them), found {list(columns)}")


def _image_bytes(cell: object, where: str) -> bytes:
    if isinstance(cell, dict):
        data = cell.get("bytes")
    elif isinstance(cell, (bytes, bytearray)):
        data = cell
    else:
        data = None
    if not data:
        raise BenchFormatError(f"{where}: 'image' holds no image bytes")
    return bytes(data)


def _candidates(cell: object, where: str) -> dict[str, str]:
    if isinstance(cell, str):
        try:
            cell = json.loads(cell)
        except json.JSONDecodeError:
            raise BenchFormatError(f"{where}: 'candidates' is a string but not JSON") from None
    if not isinstance(cell, dict) or not cell:
        raise BenchFormatError(f"{where}: 'candidates' must be a dict letter -> option")
    out = {str(k).strip().upper(): str(v) for k, v in cell.items() if v is not None}
    if not out or any(k not in "ABCDEFGH" or len(k) != 1 for k in out):
        raise BenchFormatError(f"{where}: 'candidates' keys must be option letters, got {list(cell)}")
    return out


def read_official(path: str | Path, image_dir: str | Path) -> list[BenchItem]:
    """BenchItems from the official parquet; images are decoded and saved as PNG under ``image_dir``."""
    from PIL import Image

    path, image_dir = Path(path), Path(image_dir)
    if not path.is_file():
        raise BenchFormatError(f"parquet file {path} not found")
    df = _read_table(path)
    check_columns(list(df.columns), path)
    image_dir.mkdir(parents=True, exist_ok=True)
    items = []
    for idx in range(len(df)):
        row = df.iloc[idx]
        where = f"{path.name} row {idx}"
        cands = _candidates(row["candidates"], where)
        letters = sorted(cands)
        if letters != list("ABCDEFGH"[: len(letters)]) or len(letters) > 4:
            raise BenchFormatError(f"{where}: options must be A.. in order (at most 4), got {letters}")
        answer = str(row["answer"]).strip().upper()
        if answer not in cands:
            raise BenchFormatError(f"{where}: answer {answer!r} is not among the candidates {letters}")
        try:
            with Image.open(io.BytesIO(_image_bytes(row["image"], where))) as im:
                rgb = im.convert("RGB")
        except OSError as exc:
            raise BenchFormatError(f"{where}: image bytes cannot be decoded ({exc})") from None
        img_path = image_dir / f"{idx:05d}.png"
        rgb.save(img_path)
        items.append(BenchItem(f"{idx:05d}", task_code(row["task_type"]), [BenchImage(img_path, "optical")],
                               str(row["question"]), [f"{k}. {cands[k]}" for k in letters], answer, []))
    if not items:
        raise BenchFormatError(f"{path} has no rows")
    return items
