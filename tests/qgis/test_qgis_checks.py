"""The worker's checks (answer figures no mask measures) reach the user: answer box and Markdown."""

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
