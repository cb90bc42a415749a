"""The dock's answer area: prominent answer, streaming reasoning with inline step cards."""

from __future__ import annotations

import html

from qgis.PyQt.QtCore import Qt, QUrl
from qgis.PyQt.QtGui import QFont, QImage, QTextCursor, QTextDocument
from qgis.PyQt.QtWidgets import QFrame, QLabel, QTextBrowser, QVBoxLayout, QWidget

from .record import AskRecord, StepRecord
from .styles import step_color

THUMB_PX = 96


def area_text(value: float | None) -> str:
    if value is None:
        return "no CRS: area in pixels only"
    if value >= 100:
        return f"{value:,.0f} ha"
    if value >= 0.01:
        return f"{value:,.2f} ha"
    return f"{value * 1e4:,.0f} m²"


def step_card_html(step: StepRecord, image_url: str | None) -> str:
    color = step_color(step.step).name()
    label = html.escape(" ".join(step.label.split())[:120] or "mask")
    img = (f'<td width="{THUMB_PX + 8}"><img src="{image_url}" width="{THUMB_PX}" height="{THUMB_PX}"></td>'
           if image_url else "")
    return (
        f'<table cellspacing="0" cellpadding="4" width="100%" style="margin:6px 0; '
        f'border-left:4px solid {color}; background:#f6f7f9"><tr>{img}<td valign="middle">'
        f'<span style="color:{color}; font-weight:bold">Step {step.step + 1}</span> '
        f"<b>{label}</b><br>"
        f'<span style="font-size:large">{area_text(step.area_ha)}</span><br>'
        f'<span style="color:#666">score {step.score:.2f}</span></td></tr></table>'
    )


class OutputView(QWidget):
    """Answer label on top, reasoning below; `clear`, `append_text`, `add_step`, `set_answer`."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.answer_frame = QFrame(self)
        self.answer_frame.setObjectName("terrascopeAnswer")
        self.answer_frame.setStyleSheet("#terrascopeAnswer { background:#eef6ee; border:1px solid #9cc59c; "
                                        "border-radius:4px; }")
        inner = QVBoxLayout(self.answer_frame)
        inner.setContentsMargins(8, 6, 8, 6)
        caption = QLabel("Answer", self.answer_frame)
        caption.setStyleSheet("color:#3d6b3d; font-weight:bold;")
        self.answer = QLabel(self.answer_frame)
        self.answer.setWordWrap(True)
        self.answer.setTextInteractionFlags(Qt.TextSelectableByMouse)
        font = QFont(self.answer.font())
        font.setPointSizeF(font.pointSizeF() * 1.35)
        font.setBold(True)
        self.answer.setFont(font)
        inner.addWidget(caption)
        inner.addWidget(self.answer)
        self.answer_frame.hide()
        self.browser = QTextBrowser(self)
        self.browser.setOpenLinks(False)
        self.browser.setPlaceholderText("The reasoning streams here, with each [SEG] step's mask and area.")
        layout.addWidget(self.answer_frame)
        layout.addWidget(self.browser, 1)
        self._images = 0

    def clear(self) -> None:
        self.browser.clear()
        self.answer.clear()
        self.answer_frame.hide()

    def _cursor_at_end(self) -> QTextCursor:
        cursor = self.browser.textCursor()
        cursor.movePosition(QTextCursor.End)
        return cursor

    def append_text(self, text: str) -> None:
        bar = self.browser.verticalScrollBar()
        follow = bar.value() >= bar.maximum() - 4
        cursor = self._cursor_at_end()
        cursor.insertText(text)
        if follow:
            bar.setValue(bar.maximum())

    def add_step(self, step: StepRecord, thumb: QImage | None) -> None:
        url = None
        if thumb is not None and not thumb.isNull():
            self._images += 1
            url = f"terrascope://mask/{self._images}"
            self.browser.document().addResource(QTextDocument.ImageResource, QUrl(url), thumb)
        cursor = self._cursor_at_end()
        cursor.insertHtml(step_card_html(step, url))
        cursor.insertBlock()
        self.browser.verticalScrollBar().setValue(self.browser.verticalScrollBar().maximum())

    def set_answer(self, record: AskRecord) -> None:
        text = record.answer.strip() or "(no answer)"
        if record.choice and record.choice not in text[:3]:
            text = f"{record.choice}. {text}"
        self.answer.setText(text)
        self.answer_frame.show()

    def set_error(self, message: str) -> None:
        self.answer.setText(message)
        self.answer_frame.show()

    def show_record(self, record: AskRecord, thumbs: dict[int, QImage] | None = None) -> None:
        """Redraw a finished record (history click): reasoning text, then its steps, then the answer."""
        self.clear()
        self.append_text(record.reasoning)
        for step in record.steps:
            self.add_step(step, (thumbs or {}).get(step.step))
        if record.answer:
            self.set_answer(record)
        elif record.error:
            self.set_error(record.error)
