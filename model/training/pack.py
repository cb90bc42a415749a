"""Pack a built dataset for training where rasterio/pyproj are absent (the lent GPU box).

The dataset stores GeoTIFFs that only the worker's ``read_raster`` + ``prepare_array`` turn into the
pixels the model sees (band choice, 2-98% stretch, SAR dB -> 3 channels). This runs that preparation
once, here, and writes the prepared 8-bit views as ordinary images next to the masks and records, so the
training machine needs nothing but numpy and Pillow. Grounding spans are already in the records.

    python -m model.training.pack --data DATASET --out PACK [--format png|jpg] [--quality 95]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

KEEP = ("id", "kind", "task", "images", "question", "choices", "answer", "target", "seg_masks", "split", "scene",
        "check")  # check: the restated value of a trace (training.data.find_restatement)


def _prepared(src: Path, role: str) -> np.ndarray:
    from model.data.store import load_image

    return load_image(src, role)


def pack(data: Path, out: Path, fmt: str = "png", quality: int = 95, splits: tuple[str, ...] = ("train", "val"),
         val_limit: int | None = None, workers: int = 2, gzip_records: bool = False, log=print) -> dict:
    if fmt not in ("png", "jpg"):
        raise ValueError(f"format must be png or jpg, got {fmt!r}")
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)
    images: dict[tuple[str, str], str] = {}
    counts = {}
    all_recs: dict[str, list[dict]] = {}
    for split in splits:
        path = data / f"{split}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: is {data} a dataset built by model.data.build?")
        recs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if split == "val" and val_limit is not None:
            recs = recs[:val_limit]
        all_recs[split] = recs
        for r in recs:
            for im in r["images"]:
                key = (im["path"], im.get("role", "optical"))
                if key not in images:
                    stem = Path(im["path"]).stem + ("_sar" if key[1] == "sar" else "")
                    images[key] = f"images/{stem}.{fmt}"

    def convert(item: tuple[tuple[str, str], str]) -> None:
        (rel, role), dst = item
        if (out / dst).is_file():
            return
        src = data / rel
        if src.suffix.lower() in (".tif", ".tiff"):
            pixels = _prepared(src, role)
        else:
            with Image.open(src) as im:
                pixels = np.asarray(im.convert("RGB"))
        img = Image.fromarray(pixels)
        if fmt == "jpg":
            img.save(out / dst, quality=quality)  # 4:2:0 like the JPEG-in-TIFF source
        else:
            img.save(out / dst, optimize=True)

    with ThreadPoolExecutor(max(1, workers)) as pool:
        list(pool.map(convert, images.items()))
    masks: set[str] = set()
    for split, recs in all_recs.items():
        rows = []
        for r in recs:
            row = {k: r[k] for k in KEEP if k in r}
            row["images"] = [{"path": images[(im["path"], im.get("role", "optical"))],
                              "role": im.get("role", "optical")} for im in r["images"]]
            for s in row.get("seg_masks", []):
                masks.add(s["path"])
            rows.append(row)
        text = "".join(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n" for row in rows)
        if gzip_records:
            import gzip

            (out / f"{split}.jsonl.gz").write_bytes(gzip.compress(text.encode("utf-8"), 9, mtime=0))
        else:
            (out / f"{split}.jsonl").write_text(text, encoding="utf-8")
        counts[split] = len(rows)
    for m in sorted(masks):
        (out / m).parent.mkdir(parents=True, exist_ok=True)
        if not (out / m).is_file():
            shutil.copyfile(data / m, out / m)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    meta = {"source": str(data), "format": fmt, "quality": quality if fmt == "jpg" else None, "records": counts,
            "images": len(images), "masks": len(masks), "bytes": size, "seconds": round(time.time() - t0, 1)}
    if (data / "build.json").is_file():
        meta["build"] = json.loads((data / "build.json").read_text())
    (out / "pack.json").write_text(json.dumps(meta, indent=1) + "\n")
    log(f"packed {counts} records, {len(images)} images, {len(masks)} masks: {size / 2**20:.1f} MiB "
        f"in {meta['seconds']} s -> {out}")
    return meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m model.training.pack", description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, type=Path, help="dataset folder built by model.data.build")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--format", default="png", choices=("png", "jpg"))
    ap.add_argument("--quality", type=int, default=95, help="JPEG quality (--format jpg)")
    ap.add_argument("--val-limit", type=int, help="keep only the first N validation records")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--gzip", action="store_true", help="write the records as .jsonl.gz (smaller to carry)")
    a = ap.parse_args(argv)
    try:
        pack(a.data, a.out, a.format, a.quality, val_limit=a.val_limit, workers=a.workers, gzip_records=a.gzip)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
