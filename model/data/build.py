"""Build the compact Terra-CoT dataset folder from the EO samples (read once, here; never on the GPU box).

    python -m model.data.build --src EO_SAMPLES_DIR --out DIR [--n-train N] [--n-val N] [--seed S]

Steps: real tiles -> spatial split by block -> honest augmentation of train tiles -> before/after
pairs and series by object removal (train and val tiles) -> procedural scenes (train, a few val) ->
candidate records per scene -> a balanced sample per split -> images, masks and JSONL written. Only
scenes that some record uses are written (plus every real validation tile, for the bench), which is
what keeps the folder small (see ``--max-mb``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from model.data import augment as A
from model.data import procedural, sources, synth
from model.data.scene import Scene
from model.data.splits import assign_splits
from model.data.store import DatasetWriter, dataset_bytes


def augmented(scene: Scene, rng: np.random.Generator) -> list[Scene]:
    """Train-only variants of a real tile: a rotation or flip with jitter, and crops/downsampling of big tiles."""
    out: list[Scene] = []
    if scene.source.startswith("fair_") and rng.random() < 0.5:
        return out  # fAIr tiles are many: half of them get no stored variant (bytes go to other sources)
    k = int(rng.integers(4))
    geo = A.rot90(scene, k) if k else A.flip(scene, "h" if rng.random() < 0.5 else "v")
    out.append(A.jitter(geo, rng))
    h, w = scene.shape
    if min(h, w) >= 400:
        out.append(A.downsample2(scene))
        ch, cw = h // 2, w // 2
        r0, c0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        out.append(A.crop(scene, r0, c0, ch, cw))
    elif scene.kind == "pair":
        out.append(A.flip(A.rot90(scene, 1), "h"))
    return out


def edited(scene: Scene, rng: np.random.Generator, pair_prob: float, series_prob: float,
           destroy_prob: float = 0.6) -> list[Scene]:
    out = []
    for cls in scene.countable:
        if cls != "building" or cls not in scene.frames[0].labels:
            continue
        if rng.random() < pair_prob:
            pair = A.change_pair(scene, cls, rng, destroyed=bool(rng.random() < destroy_prob))
            if pair is not None:
                out.append(pair)
        if rng.random() < series_prob:
            ser = A.series(scene, cls, rng, n_frames=int(rng.integers(3, 5)))
            if ser is not None:
                out.append(ser)
    return out


def expand(real: list[Scene], rng: np.random.Generator, n_landcover: int = 60, n_settlement: int = 60,
           proc_val_fraction: float = 0.1) -> list[Scene]:
    """Real scenes (split already assigned) + train augmentation + edited pairs/series + procedural scenes."""
    scenes: list[Scene] = list(real)
    for s in real:
        if not s.split:
            raise ValueError(f"scene {s.id} has no split: call assign_splits first")
        train = s.split == "train"
        if train:
            scenes += augmented(s, rng)
        scenes += edited(s, rng, pair_prob=0.6 if train else 0.8, series_prob=0.25 if train else 0.1,
                         destroy_prob=0.6 if train else 0.85)
    procs: list[Scene] = [procedural.landcover(rng, i) for i in range(n_landcover)]
    procs += [procedural.settlement(rng, i) for i in range(n_settlement)]
    for s in procs:  # each procedural scene is its own block; "val" ones only feed the validation loss
        s.split = "val" if rng.random() < proc_val_fraction else "train"
    scenes += procs
    for s in scenes:
        s.check()
    return scenes


def synthesize(scenes: list[Scene], out: Path, n_train: int, n_val: int, rng: np.random.Generator,
               meta: dict | None = None, log=print) -> dict:
    """Candidate records per scene, a balanced sample per split, everything written under ``out``."""
    t0 = time.time()
    pool: dict[str, list] = {"train": [], "val": []}
    for s in scenes:
        pool[s.split] += synth.candidates(s, rng)
    log(f"candidates: train {len(pool['train'])}, val {len(pool['val'])} ({time.time() - t0:.0f} s)")
    chosen = {"train": synth.sample_mix(pool["train"], n_train, rng),
              "val": synth.sample_mix(pool["val"], n_val, rng)}
    writer = DatasetWriter(out)
    for s in scenes:  # every held-back real or edited tile is kept for the bench, used by a record or not
        if s.split == "val" and s.origin in ("real", "edited"):
            writer.scene(s)
    counts = {}
    for split, recs in chosen.items():
        counts[split] = writer.write_records(f"{split}.jsonl", (writer.record_json(r) for r in recs))
    meta = dict(meta or {})
    meta.update({
        "n_train": counts["train"], "n_val": counts["val"], "scenes_written": len(writer.tiles),
        "tasks": {sp: dict(sorted(Counter(f"{r.kind}/{r.task}" for r in rs).items())) for sp, rs in chosen.items()},
        "sources": dict(sorted(Counter(f"{t['split']}/{t['source']}/{t['origin']}" for t in writer.tiles).items())),
        "seconds": round(time.time() - t0, 1),
    })
    return writer.finish(meta)


def build(src: Path, out: Path, n_train: int = 7000, n_val: int = 700, seed: int = 0,
          fair_max_per_aoi: int | None = 100, n_landcover: int = 60, n_settlement: int = 60,
          val_fraction: float = 0.2, log=print) -> dict:
    t0 = time.time()
    rng = np.random.default_rng(seed)
    real = sources.all_real(src, fair_max_per_aoi=fair_max_per_aoi, seed=seed)
    assign_splits(real, val_fraction=val_fraction, seed=seed)
    log(f"real tiles: {len(real)} ({dict(Counter(s.split for s in real))})")
    scenes = expand(real, rng, n_landcover, n_settlement)
    log(f"scenes: {len(scenes)} ({dict(Counter((s.split, s.origin) for s in scenes))})")
    meta = {"command": " ".join(["python -m model.data.build", *sys.argv[1:]]), "seed": seed,
            "fair_per_city": fair_max_per_aoi, "n_procedural": [n_landcover, n_settlement],
            "val_fraction": val_fraction}
    meta = synthesize(scenes, out, n_train, n_val, rng, meta, log)
    write_readme(src, out, meta)
    meta["bytes"] = dataset_bytes(out)
    meta["seconds"] = round(time.time() - t0, 1)
    (out / "build.json").write_text(json.dumps(meta, indent=1))
    log(f"wrote {meta['n_train']} + {meta['n_val']} records, {meta['scenes_written']} scenes, "
        f"{dataset_bytes(out) / 1e6:.1f} MB in {meta['seconds']} s")
    return meta


def write_readme(src: Path, out: Path, meta: dict) -> None:
    """README (recipe, counts) and the EO samples' ATTRIBUTION.md, whose licences the derived files keep."""
    attribution = src / "ATTRIBUTION.md"
    if attribution.is_file():
        shutil.copyfile(attribution, out / "ATTRIBUTION.md")
    lines = [
        "# Terra-CoT mini (built dataset)", "",
        "Built from the project's EO samples by `model/data/build.py`; format and recipe: `docs/BENCH.md`.",
        "Images, masks and records are derived from the samples listed in `ATTRIBUTION.md` and keep their",
        "licences (share-alike parts: SpaceNet and NC data CC BY-SA, OpenStreetMap-derived labels ODbL).", "",
        f"- command: `{meta.get('command')}`", f"- seed: {meta.get('seed')}",
        f"- records: {meta.get('n_train')} train, {meta.get('n_val')} val; scenes written: {meta.get('scenes_written')}",
        "- bench: `python -m model.bench.generate --data DIR --split val --out DIR/bench/val/bench.jsonl`", "",
    ]
    (out / "README.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.data.build", description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, type=Path, help="EO samples folder (with MANIFEST.json)")
    p.add_argument("--out", required=True, type=Path, help="output dataset folder")
    p.add_argument("--n-train", type=int, default=7000)
    p.add_argument("--n-val", type=int, default=700)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fair-per-city", type=int, default=100, help="at most this many fAIr tiles per city")
    p.add_argument("--n-procedural", type=int, default=60, help="procedural scenes of each generator")
    p.add_argument("--max-mb", type=float, default=30.0, help="fail if the folder ends up larger")
    args = p.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        print(f"error: {args.out} exists and is not empty", file=sys.stderr)
        return 2
    meta = build(args.src, args.out, args.n_train, args.n_val, args.seed, args.fair_per_city,
                 args.n_procedural, args.n_procedural)
    if meta["bytes"] > args.max_mb * 1e6:
        print(f"error: dataset is {meta['bytes'] / 1e6:.1f} MB > --max-mb {args.max_mb}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
