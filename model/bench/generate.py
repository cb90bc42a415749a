"""Generate a TerraScope-Bench file from a built dataset's held-back tiles.

    python -m model.bench.generate --data DATASET_DIR --split val --out bench/val/bench.jsonl [--seed S]

Only real tiles and the before/after pairs edited from them are used (never procedural or augmented
scenes). Questions come from the same generators as Terra-CoT, in multiple-choice form (4 options,
2 for CR and BRD), with stricter filters so that every item is unambiguous: classes of at least 0.5 %
cover, no boundary question where the gap is 2-3 pixels, distances of at least 3 pixels, counts up to
30. Paths are relative to the bench file: images are copied next to it, unless the bench file lies inside
the dataset folder, where it points at the dataset's own images ("../../images/...").
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from model.bench.format import BenchImage, BenchItem, GtMask, write_bench
from model.data import l1, l2, temporal
from model.data.facts import Facts
from model.data.numbers import option_text
from model.data.records import Ctx, Record
from model.data.store import MaskStore, load_tiles, safe_name, scene_from_tile
from model.data.synth import views

MIN_COVER_PCT = 0.5
MAX_COUNT = 30
MIN_DIST_PX = 3.0
#: Questions per task and scene view: few multi-class tiles exist, so BRD/CR/DM may take several pairs.
PER_SCENE = {"BRD": 4, "CR": 2, "DM": 2}


def _records_for(ctx: Ctx) -> list[tuple[str, Record | None]]:
    """(bench task, record) candidates of one scene view."""
    s, f, lf = ctx.scene, ctx.facts, ctx.lf
    out: list[tuple[str, Record | None]] = []
    if ctx.view.multi_time:
        if len(ctx.view.frames) == 2 and "~destroy" in s.id:
            for c in s.countable:
                if f.measure(ctx.view.frames[0], c).count >= 4:
                    out.append(("BCE", _try(temporal.destroyed, ctx, c, True, bool(ctx.rng.random() < 0.4))))
        return out
    present = [c for c in s.vocabulary if c in s.frames[lf].labels and f.measure(lf, c).coverage_pct >= MIN_COVER_PCT]
    for c in present:
        out.append(("CA", _try(l1.coverage, ctx, c, True)))
        out.append(("AQ", _try(l1.area, ctx, c, True)))
        n = f.measure(lf, c).count
        if c in s.countable and 1 <= n <= MAX_COUNT:
            out.append(("COUNT", _try(l1.counting, ctx, c, True)))
            if n >= 2:
                out.append(("DM", _largest_distance(ctx, c)))
        out.append(("CR", _try(l2.half_comparison, ctx, c)))
        if c in s.countable and 2 <= n <= MAX_COUNT:
            out.append(("BRD", _unambiguous(ctx, _try(l2.largest_adjacency, ctx, c, c, True))))
    pairs = list(itertools.combinations(present, 2))
    ctx.rng.shuffle(pairs)
    for a, b in pairs:
        gap = f.gap_px(lf, a, b)
        if gap is not None and not 1.0 < gap < 4.0:
            out.append(("BRD", _try(l1.adjacency, ctx, a, b, True)))
        out.append(("BRD", _unambiguous(ctx, _try(l2.largest_adjacency, ctx, a, b, True))))
        if gap is not None and gap >= MIN_DIST_PX:
            out.append(("DM", _try(l1.distance, ctx, a, b, True)))
        out.append(("CR", _try(l2.class_comparison, ctx, a, b)))
    return out


def _try(fn, *args):
    try:
        return fn(*args)
    except ValueError:
        return None


def _unambiguous(ctx: Ctx, rec: Record | None) -> Record | None:
    """Keep a boundary question only when its two masks touch or are at least 4 pixels apart."""
    if rec is None:
        return None
    a, b = (s.name for s in rec.segs)
    gap = ctx.facts.gap_px(ctx.lf, a, b)
    return rec if gap is not None and not 1.0 < gap < 4.0 else None


def _largest_distance(ctx: Ctx, cls: str) -> Record | None:
    rec = _try(l2.largest_object, ctx, cls, True)
    if rec is None:
        return None
    gap = ctx.facts.gap_px(ctx.lf, f"{cls}@largest", f"{cls}@others")
    return rec if gap is not None and gap >= MIN_DIST_PX else None


def generate(data: Path, split: str, out: Path, seed: int = 0, per_task_per_scene: int = 1,
             roles_pre_post: bool = False) -> list[BenchItem]:
    """Bench items for ``split`` of dataset ``data``, written to ``out`` (with images/ and masks/ beside it)."""
    rng = np.random.default_rng(seed)
    tiles = [t for t in load_tiles(data, split) if t["origin"] in ("real", "edited")]
    if not tiles:
        raise ValueError(f"{data} has no real {split} tiles to build a bench from")
    base = out.parent
    base.mkdir(parents=True, exist_ok=True)
    in_place = base.resolve().is_relative_to(Path(data).resolve())  # inside the dataset: reuse its images
    masks = MaskStore(base)
    items: list[BenchItem] = []
    counter = [0]
    for tile in sorted(tiles, key=lambda t: t["id"]):
        scene = scene_from_tile(data, tile)
        facts = Facts(scene)
        copied: dict[int, Path] = {}
        for v in views(scene):
            ctx = Ctx(scene, facts, v, rng, counter)
            by_task: dict[str, list[Record]] = {}
            for task, rec in _records_for(ctx):
                if rec is not None and rec.choices:
                    by_task.setdefault(task, []).append(rec)
            for task, recs in sorted(by_task.items()):
                if task == "BRD":  # as many "Yes" as "No" where the scene allows
                    yes = [r for r in recs if r.check["value_text"] == "Yes"]
                    no = [r for r in recs if r.check["value_text"] == "No"]
                    k = max(1, PER_SCENE["BRD"] // 2)
                    recs = [yes[i] for i in rng.permutation(len(yes))[:k]] + [no[i] for i in rng.permutation(len(no))[:k]]
                cap = per_task_per_scene * PER_SCENE.get(task, 1)
                for i in rng.permutation(len(recs))[:cap]:
                    rec = recs[int(i)]
                    images = []
                    for k, fr in enumerate(v.frames):
                        if fr not in copied and in_place:
                            copied[fr] = data / tile["frames"][fr]["path"]
                        if fr not in copied:
                            src = data / tile["frames"][fr]["path"]
                            dst = base / "images" / f"{safe_name(scene.id)}_{fr}{src.suffix}"
                            dst.parent.mkdir(parents=True, exist_ok=True)
                            shutil.copyfile(src, dst)
                            copied[fr] = dst
                        role = v.roles[k]
                        if roles_pre_post and v.multi_time and len(v.frames) == 2:
                            role = ("pre", "post")[k]
                        images.append(BenchImage(copied[fr], role))
                    gts = [GtMask(base / masks.put(facts.mask(sg.frame, sg.name)), sg.label) for sg in rec.segs]
                    items.append(BenchItem(f"{task}/{rec.id}", task, images, rec.question, list(rec.choices or []),
                                           rec.answer, gts, tile.get("sensor") or None))
    items = balance_yes_no(items, rng)
    write_bench(out, items)
    return items


def balance_yes_no(items: list[BenchItem], rng: np.random.Generator, ratio: float = 1.5) -> list[BenchItem]:
    """Per source, keep at most ``ratio`` x as many BRD questions of the majority answer as of the minority,
    so that "buildings -> No, land cover -> Yes" is no shortcut."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i, it in enumerate(items):
        if it.task == "BRD":
            value = option_text(it.choices[it.letters.index(it.answer)])
            groups.setdefault((it.id.split("/")[1].split("_")[0], value), []).append(i)
    drop: set[int] = set()
    for src in {s for s, _ in groups}:
        yes, no = groups.get((src, "Yes"), []), groups.get((src, "No"), [])
        cap = max(1, int(ratio * min(len(yes), len(no))))
        for idx in (yes, no):
            if len(idx) > cap:
                drop.update(int(i) for i in rng.choice(idx, len(idx) - cap, replace=False))
    return [it for i, it in enumerate(items) if i not in drop]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.bench.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, type=Path, help="dataset folder built by model.data.build")
    p.add_argument("--split", default="val")
    p.add_argument("--out", required=True, type=Path, help="bench JSONL to write (images/ and masks/ go beside it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-task-per-scene", type=int, default=1)
    args = p.parse_args(argv)
    try:
        items = generate(args.data, args.split, args.out, args.seed, args.per_task_per_scene)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(items)} questions -> {args.out}: {dict(sorted(Counter(i.task for i in items).items()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
