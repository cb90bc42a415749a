"""The worker's checks (answer figures no mask measures) and measured choice reach the user: answer box and Markdown."""

from __future__ import annotations

from qgis_plugin.output_view import OutputView
from qgis_plugin.record import AskRecord, to_markdown
from qgis_plugin.request import EventFolder

MESSAGE = ("the answer says 45.9%, but mask 1 measures 62.16%; the measured figure is computed from the mask "
           "and the CRS")


def test_checks_from_the_done_event_show_under_the_answer(qgis_iface):
    record = AskRecord(question="What share is water?")
    folder = EventFolder(record, windows=[])
    folder.on_event({"event": "done", "answer": "45.9%", "checks": [
        {"kind": "percent", "stated": 45.9, "measured": 62.16, "step": 0, "message": MESSAGE},
        {"kind": "percent"},  # no message: nothing to show
    ]}, {})
    assert record.checks == [MESSAGE]
    view = OutputView()
    try:
        view.set_answer(record)
        text = view.answer.toPlainText()
        assert text.startswith("45.9%") and "⚠ The answer says 45.9%, but mask 1 measures 62.16%" in text
    finally:
        view.deleteLater()
    assert f"> **Check:** {MESSAGE}" in to_markdown(record)


MEASURED = "mask 1 \"the water\" covers 62.2% of the valid image area, which supports option C (60.0%)"


def test_the_measured_choice_shows_under_the_answer_and_in_markdown(qgis_iface):
    record = AskRecord(question="What share is water?", options=["A. 10.0%", "B. 30.0%", "C. 60.0%"])
    folder = EventFolder(record, windows=[])
    folder.on_event({"event": "done", "answer": "A", "choice": "A", "checks": [
        {"kind": "choice", "stated": "A", "measured": "C", "message": f"the model chose A (10.0%), but {MEASURED}"}],
        "measured_choice": {"choice": "C", "value": 62.2, "value_text": "62.2%", "quantity": "coverage",
                            "steps": [0], "message": MEASURED}}, {})
    assert record.measured_choice == "C" and record.measured == MEASURED
    view = OutputView()
    try:
        view.set_answer(record)
        lines = view.answer.toPlainText().splitlines()
        assert lines[0] == "A" and lines[1] == "Measured: option C"
        assert lines[2].startswith("⚠ The model chose A (10.0%), but mask 1")
    finally:
        view.deleteLater()
    md = to_markdown(record)
    assert f"**Measured choice:** C ({MEASURED})" in md and md.index("**Measured choice:**") < md.index("> **Check:**")
    # a done event without one (free-form question, windowed run) shows nothing
    plain = AskRecord(question="Where?")
    EventFolder(plain, windows=[]).on_event({"event": "done", "answer": "north", "measured_choice": None}, {})
    assert plain.measured_choice is None and "Measured" not in to_markdown(plain)


def test_a_phrase_rule_on_a_mask_shows_on_its_step_card_and_in_markdown(qgis_iface):
    import numpy as np

    from qgis_plugin.output_view import step_card_html
    from qgis_plugin.rasters import RasterWindow

    utm = "EPSG:32633"
    window = RasterWindow(np.zeros((3, 8, 8), np.uint8), (500000.0, 10.0, 0.0, 4649000.0, 0.0, -10.0), utm, [None],
                          ["red", "green", "blue"])
    record = AskRecord(question="How far is the largest building from the others?")
    folder = EventFolder(record, windows=[window])
    mask = np.zeros((8, 8), np.uint8)
    mask[2:4, 2:5] = 1
    grid = {"geotransform": list(window.transform), "crs_wkt": utm, "shape": [8, 8]}
    for step, label, rule in ((0, "I segment the largest building", "largest object"),
                              (1, "and the water", None)):
        folder.on_event({"event": "mask", "step": step, "label": label, "image": 0, "score": 0.9, "grid": grid,
                         "measurements": {"area_px": 6, "area_ha": 0.06}, "region_rule": rule}, {"mask": mask})
    ruled, plain = record.steps
    assert ruled.region_rule == "largest object" and plain.region_rule is None
    assert "shaped by its phrase: largest object" in step_card_html(ruled, None)
    assert "shaped by its phrase" not in step_card_html(plain, None)
    md = to_markdown(record)
    assert "| 1 | I segment the largest building (largest object) |" in md and "| 2 | and the water |" in md
