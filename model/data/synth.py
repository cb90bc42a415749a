"""All candidate records of one scene: which views exist, which families apply, and the sampling mix.

``candidates(scene, rng)`` yields every record the scene supports (RES, L1, L2, Cap-CoT, temporal);
``sample_mix`` draws a quota per (kind, task) so no single family floods the dataset.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable

import numpy as np

from model.data import l1, l2, temporal
from model.data.facts import Facts
from model.data.records import Ctx, Record, View
from model.data.scene import Scene

#: Share of records per kind (paper: RES pretraining data, then L1/L2 VQA and captions for SFT).
KIND_WEIGHTS = {"res": 0.25, "l1": 0.45, "l2": 0.20, "cap": 0.10}
MAX_COUNT = 60  # counting questions only up to this many objects (beyond it the mask merges roofs)
BUILTUP = ("building", "developed")


def views(scene: Scene) -> list[View]:
    if scene.kind == "pair":
        return [View((0,), 0, ("optical",)), View((1,), 0, ("sar",)), View((0, 1), 0, ("optical", "sar"))]
    if scene.kind in ("change", "series"):
        return [View(tuple(range(len(scene.frames))), 0, tuple(f"t{i}" for i in range(len(scene.frames))))]
    return [View((0,), 0, ("optical",))]


def _safe(fn: Callable[..., Record | None], *args: object) -> Record | None:
    try:
        return fn(*args)
    except ValueError:  # e.g. no distractors >= 15 % apart exist for this value: skip the question
        return None


def single_view(ctx: Ctx) -> list[Record]:
    s, f, lf = ctx.scene, ctx.facts, ctx.lf
    out: list[Record | None] = []
    labelled = [c for c in s.vocabulary if c in s.frames[lf].labels]
    present = [c for c in labelled if f.present(lf, c)]
    absent = [c for c in labelled if c not in present]
    mc = lambda: bool(ctx.rng.random() < 0.5)
    for c in present:
        m = f.measure(lf, c)
        out.append(_safe(l2.res, ctx, c))
        out += [_safe(l1.coverage, ctx, c, mc()), _safe(l1.area, ctx, c, mc()), _safe(l1.localization, ctx, c, mc()),
                _safe(l1.existence, ctx, c, mc())]
        if c in s.countable and 0 < m.count <= MAX_COUNT:
            out += [_safe(l1.counting, ctx, c, mc()), _safe(l2.count_in_half, ctx, c, mc())]
        if c in s.countable and 1 < m.count <= MAX_COUNT:
            out += [_safe(l2.largest_object, ctx, c, mc()), _safe(l2.largest_object, ctx, c, mc(), "area"),
                    _safe(l2.largest_adjacency, ctx, c, c, mc())]
        out.append(_safe(l2.half_comparison, ctx, c))
        if c in BUILTUP:
            out.append(_safe(l2.built_up, ctx, c))
    for c in list(ctx.rng.permutation(absent))[:2]:
        out.append(_safe(l1.existence, ctx, str(c), mc()))
    pairs = list(itertools.combinations(present, 2))
    ctx.rng.shuffle(pairs)
    for a, b in pairs[:4]:
        if ctx.rng.random() < 0.5:
            a, b = b, a
        out += [_safe(l1.adjacency, ctx, a, b, mc()), _safe(l2.largest_adjacency, ctx, a, b, mc()),
                _safe(l1.distance, ctx, a, b, mc()),
                _safe(l2.class_comparison, ctx, a, b), _safe(l2.compare_yesno, ctx, a, b, mc()),
                _safe(l2.share_within, ctx, a, b, mc()), _safe(l2.area_difference, ctx, a, b, mc())]
    if len(present) >= 3:
        trio = [str(c) for c in ctx.rng.choice(present, 3, replace=False)]
        out += [_safe(l2.ranking, ctx, trio, mc()), _safe(l2.dominant, ctx, present, mc())]
    out.append(_safe(l2.caption, ctx, present))
    return [r for r in out if r is not None]


def temporal_view(ctx: Ctx) -> list[Record]:
    s = ctx.scene
    out: list[Record | None] = []
    mc = lambda: bool(ctx.rng.random() < 0.5)
    for c in s.countable:
        if not any(c in fr.labels for fr in s.frames):
            continue
        built = "~build" in s.id  # construction pairs: "how many destroyed" is 0; ask it only sometimes
        if len(ctx.view.frames) == 2 and (not built or ctx.rng.random() < 0.2):
            out += [_safe(temporal.destroyed, ctx, c, mc()), _safe(temporal.destroyed, ctx, c, mc(), True)]
        out += [_safe(temporal.appeared, ctx, c, mc()), _safe(temporal.count_at, ctx, c, mc())]
        if len(ctx.view.frames) > 2:
            out.append(_safe(temporal.most_objects, ctx, c))
    last = View((len(s.frames) - 1,), len(s.frames) - 1, ("optical",))
    res_ctx = Ctx(s, ctx.facts, last, ctx.rng, ctx.counter)
    for c in s.countable:
        if c in s.frames[-1].labels and ctx.facts.present(last.label_frame, c):
            out.append(_safe(l2.res, res_ctx, c))
    return [r for r in out if r is not None]


def candidates(scene: Scene, rng: np.random.Generator) -> list[Record]:
    facts = Facts(scene)
    counter = [0]
    out: list[Record] = []
    for v in views(scene):
        ctx = Ctx(scene, facts, v, rng, counter)
        out += temporal_view(ctx) if v.multi_time else single_view(ctx)
    return out


def sample_mix(records: list[Record], n: int, rng: np.random.Generator,
               weights: dict[str, float] | None = None) -> list[Record]:
    """About ``n`` records: per kind by ``weights``, then evenly over tasks within a kind, scenes shuffled."""
    weights = weights or KIND_WEIGHTS
    groups: dict[str, dict[str, list[Record]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        groups[r.kind][r.task].append(r)
    chosen: list[Record] = []
    total_w = sum(w for k, w in weights.items() if k in groups)
    spare = 0
    for kind in sorted(groups, key=lambda k: sum(len(v) for v in groups[k].values())):
        quota = round(n * weights.get(kind, 0.0) / total_w) + spare if total_w else 0
        tasks = groups[kind]
        per_task = _fair_share(quota, {t: len(v) for t, v in tasks.items()})
        got = 0
        for t, k in per_task.items():
            pool = tasks[t]
            idx = rng.choice(len(pool), size=k, replace=False)
            chosen += [pool[i] for i in sorted(idx)]
            got += k
        spare = quota - got
    order = rng.permutation(len(chosen))
    return [chosen[i] for i in order]


def _fair_share(quota: int, sizes: dict[str, int]) -> dict[str, int]:
    """Split ``quota`` evenly over groups, giving what a small group cannot use to the others."""
    out = {t: 0 for t in sizes}
    left = dict(sizes)
    remaining = quota
    while remaining > 0 and any(left.values()):
        open_groups = [t for t in sorted(left) if left[t] > 0]
        share = max(1, remaining // len(open_groups))
        for t in open_groups:
            k = min(share, left[t], remaining)
            out[t] += k
            left[t] -= k
            remaining -= k
            if remaining == 0:
                break
    return out
