"""The dock's answer area: prominent answer, streaming reasoning with each [SEG] step's card inline.

The worker streams text and masks as separate events, and a mask may arrive before or after the text
that holds its [SEG] (the text is held back while a multi-byte character is incomplete). Cards therefore
go where the n-th [SEG] is: a placeholder marks a [SEG] whose mask has not arrived, and a mask whose
[SEG] has not been shown yet waits for it.
"""

from __future__ import annotations

import html

from qgis.PyQt.QtCore import Qt, QTimer, QUrl
from qgis.PyQt.QtGui import QFont, QImage, QTextCursor, QTextDocument, QTextOption
from qgis.PyQt.QtWidgets import QFrame, QLabel, QTextBrowser, QVBoxLayout, QWidget

from .record import AskRecord, StepRecord
from .styles import step_color

THUMB_PX = 88
SEG = "[SEG]"
_TAGS = {"<think>": "", "</think>": "\n", "<answer>": "\n", "</answer>": "", "<REGION>": ""}  # REGION: injected tokens
PLACEHOLDER = "▦ mask…"


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
    label = html.escape(" ".join(step.label.split())[-80:] or "mask")
    img = (f'<td width="{THUMB_PX + 6}"><img src="{image_url}" width="{THUMB_PX}" height="{THUMB_PX}"></td>'
           if image_url else "")
    rule = (f'<span style="color:#777">shaped by its phrase: {html.escape(step.region_rule)}</span><br>'
            if step.region_rule else "")
    return (
        f'<table cellspacing="0" cellpadding="3" width="100%" bgcolor="#f3f5f8" '
        f'style="border-left:4px solid {color}; margin-top:4px; margin-bottom:4px"><tr>{img}<td valign="middle">'
        f'<span style="color:{color}; font-weight:bold">■ Step {step.step + 1}</span><br>'
        f'<span style="font-size:large; font-weight:bold">{area_text(step.area_ha)}</span><br>'
        f'<span style="color:#555">{label}</span><br>{rule}'
        f'<span style="color:#777">score {step.score:.2f}</span></td></tr></table>'
    )


def _clean(text: str) -> str:
    for tag, repl in _TAGS.items():
        text = text.replace(tag, repl)
    return text


class OutputView(QWidget):
    """Answer box on top, reasoning below; `clear`, `append_text`, `add_step`, `finish`, `set_answer`."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.answer_frame = QFrame(self)
        self.answer_frame.setObjectName("terrascopeAnswer")
        self.answer_frame.setStyleSheet("#terrascopeAnswer { background:#eef6ee; border:1px solid #9cc59c; "
                                        "border-radius:4px; }")
        inner = QVBoxLayout(self.answer_frame)
        inner.setContentsMargins(8, 4, 8, 4)
        inner.setSpacing(0)
        caption = QLabel("Answer", self.answer_frame)
        caption.setStyleSheet("color:#3d6b3d; font-weight:bold;")
        self.answer = QTextBrowser(self.answer_frame)  # wraps anywhere and scrolls when long
        self.answer.setFrameShape(QFrame.NoFrame)
        self.answer.setStyleSheet("background:transparent;")
        self.answer.setWordWrapMode(QTextOption.WrapAtWordBoundaryOrAnywhere)
        self.answer.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        font = QFont(self.answer.font())
        font.setPointSizeF(font.pointSizeF() * 1.2)
        font.setBold(True)
        self.answer.setFont(font)
        self.answer.setMaximumHeight(96)
        inner.addWidget(caption)
        inner.addWidget(self.answer)
        self.answer_frame.hide()
        self.browser = QTextBrowser(self)
        self.browser.setOpenLinks(False)
        self.browser.setWordWrapMode(QTextOption.WrapAtWordBoundaryOrAnywhere)
        self.browser.setPlaceholderText("The reasoning streams here, with each [SEG] step's mask and area.")
        layout.addWidget(self.answer_frame)
        layout.addWidget(self.browser, 1)
        self._images = 0
        self._pending: list[tuple[StepRecord, QImage | None]] = []  # masks waiting for their [SEG] text
        self._open: list[QTextCursor] = []  # [SEG] placeholders waiting for their mask
        self._carry = ""  # the end of a delta that may be the start of a "[SEG]" split across deltas

    def clear(self) -> None:
        self.browser.clear()
        self.answer.clear()
        self.answer_frame.hide()
        self._pending, self._open, self._carry = [], [], ""

    def _end(self) -> QTextCursor:
        cursor = QTextCursor(self.browser.document())
        cursor.movePosition(QTextCursor.End)
        return cursor

    def _follow(self) -> bool:
        bar = self.browser.verticalScrollBar()
        return bar.value() >= bar.maximum() - 4

    def _scroll_end(self) -> None:
        self.browser.verticalScrollBar().setValue(self.browser.verticalScrollBar().maximum())

    def append_text(self, text: str) -> None:
        follow = self._follow()
        text = self._carry + text
        keep = next((k for k in range(len(SEG) - 1, 0, -1) if text.endswith(SEG[:k])), 0)
        text, self._carry = (text[:-keep], text[-keep:]) if keep else (text, "")
        parts = text.split(SEG)
        self._end().insertText(_clean(parts[0]))
        for part in parts[1:]:
            self._marker()
            self._end().insertText(_clean(part))
        if follow:
            self._scroll_end()

    def _marker(self) -> None:
        if self._pending:
            step, thumb = self._pending.pop(0)
            self._insert_card(self._end(), step, thumb)
            return
        cursor = self._end()
        start = cursor.position()
        cursor.insertHtml(f'<span style="color:#999"><i>{PLACEHOLDER}</i></span>')
        cursor.setPosition(start, QTextCursor.KeepAnchor)
        self._open.append(cursor)

    def _insert_card(self, cursor: QTextCursor, step: StepRecord, thumb: QImage | None) -> None:
        url = None
        if thumb is not None and not thumb.isNull():
            self._images += 1
            url = f"terrascope://mask/{self._images}"
            self.browser.document().addResource(QTextDocument.ImageResource, QUrl(url), thumb)
        cursor.insertHtml(step_card_html(step, url))

    def add_step(self, step: StepRecord, thumb: QImage | None) -> None:
        if self._open:
            self._insert_card(self._open.pop(0), step, thumb)
        else:
            self._pending.append((step, thumb))

    def finish(self) -> None:
        """End of the stream: show masks whose [SEG] never appeared in the text."""
        if self._carry:
            self._end().insertText(self._carry)
            self._carry = ""
        while self._pending:
            step, thumb = self._pending.pop(0)
            self._end().insertBlock()
            self._insert_card(self._end(), step, thumb)
        self._scroll_end()
        QTimer.singleShot(0, self._scroll_end)  # again once the cards' images are laid out

    def set_answer(self, record: AskRecord) -> None:
        text = record.answer.strip() or "(no answer)"
        if record.choice and not text.startswith(record.choice):
            text = f"{record.choice}. {text}"
        if record.measured_choice:  # the option the masks themselves support, computed by the worker
            text += f"\nMeasured: option {record.measured_choice}"
        for message in record.checks:  # the measured figure is the one to trust: say so under the answer
            text += f"\n⚠ {message[0].upper()}{message[1:]}."
        self.answer.setPlainText(text)
        self.answer_frame.show()

    def set_error(self, message: str) -> None:
        self.answer.setPlainText(message)
        self.answer_frame.show()

    def show_record(self, record: AskRecord, thumbs: dict[int, QImage] | None = None) -> None:
        """Replay a finished record (history click): its stream with the step cards in place."""
        self.clear()
        self.append_text(record.stream or record.reasoning)
        for step in record.steps:
            self.add_step(step, (thumbs or {}).get(step.step))
        self.finish()
        if record.answer:
            self.set_answer(record)
        elif record.error:
            self.set_error(record.error)
