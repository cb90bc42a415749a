"""Load at CI size (issue 7, part 4): concurrent clients, exactly-once answers, no cross-talk, and a
bounded queue that says ``busy``. The full-size run (16 x 50, RSS over 1,000 requests) is bench/load.py."""

from __future__ import annotations

import threading
from collections import Counter

from relharness import RawClient, WorkerProc, ask, assert_error, assert_served, long_ask, needs_model, scene

from qgis_plugin import protocol as P

pytestmark = needs_model

CLIENTS, REQUESTS = 4, 5


QUESTIONS = ["Where is the water?", "Where is the bright square?", "How many buildings are there?",
             "Is there a road?", "What covers most of the image?", "Where are the fields?"]


def _inputs(k: int, j: int) -> tuple[dict, dict]:
    """Request j of client k: its own question, raster size and sampling seed, so that its answer is
    reproducible yet differs from every other request's: any mix-up shows in the text."""
    side = 16 + 8 * k
    header, arrays = ask(scene(side, side, seed=10 + k), question=QUESTIONS[k % len(QUESTIONS)])
    header["settings"] = {"max_new_tokens": 24, "temperature": 1.0, "seed": 1000 * k + j}
    return header, arrays


def _one(raw: RawClient, header: dict, arrays: dict, foreign: list[dict]) -> list[tuple[dict, dict]]:
    raw.send_msg(header, arrays)
    return raw.events(header["id"], timeout_s=60, foreign=foreign)


def test_concurrent_clients_get_every_answer_exactly_once_without_cross_talk(worker: WorkerProc) -> None:
    # reference answers, one request at a time (seeded sampling is reproducible)
    reference = {}
    with worker.raw() as raw:
        for k in range(CLIENTS):
            for j in range(REQUESTS):
                reference[k, j] = _one(raw, *_inputs(k, j), foreign=[])[-1][0]["text"]
    distinct = len(set(reference.values()))
    assert distinct >= 0.9 * len(reference), f"answers too alike to detect a mix-up: {reference}"

    results: dict[int, list[list[tuple[dict, dict]]]] = {k: [] for k in range(CLIENTS)}
    strays: dict[int, list[dict]] = {k: [] for k in range(CLIENTS)}
    errors: list[BaseException] = []
    start = threading.Barrier(CLIENTS)

    def client(k: int) -> None:
        try:
            with worker.raw() as raw:
                start.wait()
                for j in range(REQUESTS):
                    header, arrays = _inputs(k, j)
                    results[k].append(_one(raw, header, arrays, strays[k]))
                # anything still arriving for this socket would be a duplicate answer
                while raw.sock.poll(300):
                    msg = raw.recv(0.1)
                    if msg and msg[0].get("event") not in ("alive", "pong"):
                        strays[k].append(msg[0])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors, errors
    assert all(not s for s in strays.values()), f"events for other requests or duplicates: {strays}"
    ids = Counter()
    for k, runs in results.items():
        assert len(runs) == REQUESTS
        for j, events in enumerate(runs):
            names = [e["event"] for e, _ in events]
            rid = events[0][0]["id"]
            ids[rid] += 1
            assert names[0] == "accepted" and names[-1] == "done" and names.count("done") == 1, names
            assert all(e["id"] == rid for e, _ in events)
            done = events[-1][0]
            streamed = "".join(e["text"] for e, _ in events if e["event"] == "token")
            assert done["text"] == reference[k, j], f"client {k} request {j} got someone else's answer"
            # `text` keeps the <REGION> placeholders of injected visual tokens; the stream leaves them out
            assert streamed.strip() == done["text"].replace("<REGION>", "").strip(), "stream != answer"
            side = 16 + 8 * k
            for e, arrs in events:
                if e["event"] == "mask":
                    assert arrs["mask"].shape == (side, side)
    assert len(ids) == CLIENTS * REQUESTS and set(ids.values()) == {1}


def test_full_queue_answers_busy_and_every_request_exactly_once(worker: WorkerProc) -> None:
    """One job running, ``max_queue`` (8) waiting: the next requests get ``busy`` at once; cancelling
    the rest answers each of them exactly once with ``cancelled``."""
    max_queue = worker.client().ping()["max_queue"]
    first_h, first_a = long_ask(worker, 8000)
    with worker.raw() as raw:
        raw.send_msg(first_h, first_a)
        while raw.reply(first_h["id"], timeout_s=30)["event"] != "token":
            pass
        rest = [long_ask(worker, 8000) for _ in range(max_queue + 3)]
        for h, a in rest:
            raw.send_msg(h, a)
        ids = [first_h["id"]] + [h["id"] for h, _ in rest]
        terminal: Counter[str] = Counter()
        busy, accepted = [], []
        while len(busy) + len(accepted) < len(rest):
            ev = _next(raw, ids)
            if ev["event"] == "accepted":
                accepted.append(ev["id"])
            elif ev["event"] == "error":
                assert_error(ev, P.BUSY)
                assert "queue is full" in ev["message"]
                busy.append(ev["id"])
                terminal[ev["id"]] += 1
        assert len(busy) == 3 and len(accepted) == max_queue, (busy, accepted)
        assert busy == [h["id"] for h, _ in rest[-3:]], "the last three should be refused"
        for rid in [first_h["id"]] + accepted:
            raw.send_msg(P.request("cancel", f"c-{rid}", target=rid))
        while sum(terminal.values()) < len(ids):
            ev = _next(raw, ids)
            if ev["event"] in ("done", "error"):
                assert ev["event"] == "error" and ev["code"] == P.CANCELLED, ev
                terminal[ev["id"]] += 1
        assert set(terminal) == set(ids) and set(terminal.values()) == {1}, terminal
        while raw.sock.poll(300):  # no second answer to anyone
            msg = raw.recv(0.1)
            assert msg is None or msg[0]["event"] in ("alive", "ack"), msg[0]
        assert_served(raw)


def _next(raw: RawClient, ids: list[str]) -> dict:
    """Next event about one of ``ids`` (tokens, heartbeats and acks skipped)."""
    while True:
        msg = raw.recv(15.0)
        assert msg is not None, "the worker went quiet"
        ev = msg[0]
        if ev.get("event") in ("alive", "pong", "ack", "token"):
            continue
        assert ev.get("id") in ids, f"an event for a request nobody sent: {ev}"
        return ev
