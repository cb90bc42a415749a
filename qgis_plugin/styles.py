"""Colours and renderers for result layers: one distinct, semi-transparent colour per step."""

from __future__ import annotations

from qgis.core import (
    QgsFillSymbol,
    QgsPalettedRasterRenderer,
    QgsRasterLayer,
    QgsSingleSymbolRenderer,
    QgsVectorLayer,
)
from qgis.PyQt.QtGui import QColor

# ColorBrewer "Set1" + "Dark2" (qualitative, colour-blind aware order, readable on imagery).
PALETTE = ["#e41a1c", "#377eb8", "#4daf4a", "#984ea3", "#ff7f00", "#ffff33", "#a65628", "#f781bf",
           "#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02"]
FILL_ALPHA = 110  # of 255: the image stays visible under the mask


def step_color(step: int) -> QColor:
    """Colour of a 0-based step, shared by the dock thumbnails, layers and masks."""
    return QColor(PALETTE[step % len(PALETTE)])


def style_step_layer(layer: QgsVectorLayer, step: int) -> None:
    color = step_color(step)
    fill = QColor(color)
    fill.setAlpha(FILL_ALPHA)
    symbol = QgsFillSymbol.createSimple({
        "color": f"{fill.red()},{fill.green()},{fill.blue()},{fill.alpha()}",
        "outline_color": f"{color.red()},{color.green()},{color.blue()},255",
        "outline_width": "0.5",
    })
    layer.setRenderer(QgsSingleSymbolRenderer(symbol))


def style_mask_layer(layer: QgsRasterLayer, step: int) -> None:
    """Value 1 in the step colour, value 0 transparent."""
    color = step_color(step)
    color.setAlpha(FILL_ALPHA)
    classes = [QgsPalettedRasterRenderer.Class(1, color, "mask")]
    renderer = QgsPalettedRasterRenderer(layer.dataProvider(), 1, classes)
    layer.setRenderer(renderer)
