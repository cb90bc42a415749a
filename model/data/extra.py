"""Add more real fAIr building tiles to a built dataset's train split, spatially apart from validation.

Why: segmentation is what the small model lacks most (building mask IoU 0.35-0.39 on held-back tiles, and a
train/val gap that says it has seen too few buildings). ``model.data.build`` keeps 100 fAIr tiles per city to
hold the folder near 26 MB; the EO samples have about 750. This adds unused tiles to the *train* split of an
existing dataset without touching its validation split, so its bench (built from validation tiles) stays
the same and a model trained on the old dataset is not contaminated by the new one:

* a tile is taken only if its zoom-18 block holds no validation tile (the build's own rule: whole blocks
  go to one split); ``--margin 1`` also refuses the 8 blocks around each validation block (about 150 m);
* each taken tile gets its RES record ("Please segment the buildings.") and ``--l1-per-tile`` records
  drawn from the same candidate generators the build uses, with answers computed from the masks.

    python -m model.data.extra --src EO_SAMPLES --data DATASET [--max-tiles N] [--l1-per-tile 1] [--margin 0] [--seed 0]
    python -m model.data.extra --ramp RAMP_DIR --data DATASET [...]

``--ramp`` reads the fAIr / ramp training data the EO samples' fAIr tiles came from (hotosm/fAIr-utilities,
``ramp-data/TRAIN/HOTOSM/2`` at commit d83e21c; OpenAerialMap imagery CC BY 4.0, OpenStreetMap buildings
ODbL): about 1,100 tiles the EO samples do not hold, in Zanzibar and two more places (Nairobi, Catanduanes).

Records are appended to ``train.jsonl``; scenes to ``tiles.json``; ``build.json`` gets an ``extra`` entry.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from model.data import sources, synth
from model.data.scene import Scene
from model.data.store import DatasetWriter, dataset_bytes

_BLOCK = re.compile(r"^(fair_\w+?)_z18_(\d+)_(\d+)$")


def neighbours(block: str) -> set[str]:
    """The block and the 8 zoom-18 blocks around it (fAIr block names only; others map to themselves)."""
    m = _BLOCK.match(block)
    if not m:
        return {block}
    name, x, y = m.group(1), int(m.group(2)), int(m.group(3))
    return {f"{name}_z18_{x + dx}_{y + dy}" for dx in (-1, 0, 1) for dy in (-1, 0, 1)}


def excluded_blocks(tiles: list[dict], margin: int = 0) -> set[str]:
    """Blocks no added tile may come from: every validation block (and its neighbours with ``margin`` 1)."""
    if margin not in (0, 1):
        raise ValueError(f"margin must be 0 or 1 blocks, got {margin}")
    out: set[str] = set()
    for t in tiles:
        if t["split"] == "val":
            out |= neighbours(t["block"]) if margin else {t["block"]}
    return out


def add_fair(src: Path, data: Path, max_tiles: int | None = None, l1_per_tile: int = 1, seed: int = 0,
             margin: int = 0, log=print) -> dict:
    """Every fAIr tile of the EO samples that ``data`` does not use and may take (see ``add_tiles``)."""
    return add_tiles(data, sources.fair_tiles(src, max_per_aoi=None, seed=seed), max_tiles, l1_per_tile, seed,
                     margin, log)


def add_tiles(data: Path, scenes: Iterable[Scene], max_tiles: int | None = None, l1_per_tile: int = 1,
              seed: int = 0, margin: int = 0, log=print) -> dict:
    """Append real ``scenes`` outside the validation blocks of ``data`` to its train split."""
    t0 = time.time()
    tiles_path = data / "tiles.json"
    if not tiles_path.is_file():
        raise FileNotFoundError(f"{tiles_path} not found: is {data} a dataset built by model.data.build?")
    tiles = json.loads(tiles_path.read_text(encoding="utf-8"))
    used = {t["id"] for t in tiles} | {t.get("parent") for t in tiles if t.get("parent")}
    banned = excluded_blocks(tiles, margin)
    rng = np.random.default_rng(seed)
    taken, skipped_val = [], 0
    for scene in scenes:
        if scene.id in used:
            continue
        if scene.block in banned:
            skipped_val += 1
            continue
        scene.split = "train"
        taken.append(scene)
    rng.shuffle(taken)
    if max_tiles is not None:
        taken = taken[:max_tiles]
    writer = DatasetWriter(data)
    records = []
    for scene in taken:
        scene.check()
        cands = synth.candidates(scene, rng)
        res = [r for r in cands if r.kind == "res"]
        l1 = [r for r in cands if r.kind == "l1"]
        records += res
        if l1 and l1_per_tile:
            records += [l1[i] for i in rng.choice(len(l1), size=min(l1_per_tile, len(l1)), replace=False)]
    rows = [writer.record_json(r) for r in records]
    with (data / "train.jsonl").open("a", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")
    body = ",\n".join(json.dumps(t, separators=(",", ":")) for t in tiles + writer.tiles)
    tiles_path.write_text(f"[\n{body}\n]\n", encoding="utf-8")
    extra = {
        "command": " ".join(["python -m model.data.extra", *sys.argv[1:]]), "seed": seed,
        "margin_blocks": margin, "tiles_added": len(taken), "tiles_skipped_val": skipped_val, "records_added": len(rows),
        "tasks": dict(sorted(Counter(f"{r['kind']}/{r['task']}" for r in rows).items())),
        "sources": dict(sorted(Counter(s.source for s in taken).items())),
        "seconds": round(time.time() - t0, 1),
    }
    meta_path = data / "build.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    meta.setdefault("extra", []).append(extra)
    meta["bytes"] = dataset_bytes(data)
    meta_path.write_text(json.dumps(meta, indent=1))
    log(f"added {len(taken)} tiles ({skipped_val} skipped in validation blocks), {len(rows)} records, "
        f"{extra['seconds']} s; dataset now {meta['bytes'] / 1e6:.1f} MB")
    return extra


RAMP_CREDIT = """
## Tiles added by `python -m model.data.extra --ramp`

From `hotosm/fAIr-utilities` @ d83e21c, `ramp-data/TRAIN/HOTOSM/2/data/<n>` and `labels/<n>` (the fAIr / ramp
training data of the Humanitarian OpenStreetMap Team): Zanzibar (1), Catanduanes, Philippines (4), Nairobi (5).
Only data files were used.

- "Imagery © OpenAerialMap contributors (Open Imagery Network), CC BY 4.0."
- "Building footprints © OpenStreetMap contributors, ODbL 1.0 (openstreetmap.org/copyright)."
"""


def credit_ramp(data: Path) -> None:
    """The dataset's ATTRIBUTION.md names where the ramp tiles came from (once)."""
    path = data / "ATTRIBUTION.md"
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    if "model.data.extra --ramp" not in text:
        path.write_text(text.rstrip("\n") + "\n" + RAMP_CREDIT, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.data.extra", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--src", type=Path, help="EO samples folder (with MANIFEST.json)")
    src.add_argument("--ramp", type=Path, help="fAIr / ramp training folder: ramp-data/TRAIN/HOTOSM/2 of "
                     "hotosm/fAIr-utilities at commit d83e21c (data/<n>/*.png, labels/<n>/*.tif)")
    p.add_argument("--data", required=True, type=Path, help="a dataset folder built by model.data.build")
    p.add_argument("--max-tiles", type=int, default=None)
    p.add_argument("--l1-per-tile", type=int, default=1)
    p.add_argument("--margin", type=int, default=0, help="also refuse blocks next to validation blocks (1)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        if a.ramp is not None:
            add_tiles(a.data, sources.ramp_tiles(a.ramp), a.max_tiles, a.l1_per_tile, a.seed, a.margin)
            credit_ramp(a.data)
        else:
            add_fair(a.src, a.data, a.max_tiles, a.l1_per_tile, a.seed, a.margin)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
