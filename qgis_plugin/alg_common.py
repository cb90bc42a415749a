"""What both Processing algorithms share: worker parameters, raster reading, mask features."""

from __future__ import annotations

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsFeature,
    QgsFeatureSink,
    QgsField,
    QgsFields,
    QgsGeometry,
    QgsProcessingAlgorithm,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterNumber,
    QgsProcessingParameterString,
    QgsRasterLayer,
    QgsRectangle,
)
from qgis.PyQt.QtCore import QVariant

from .client import WorkerError, WorkerUnavailable
from .errors import describe
from .geometry import effective_ellipsoid
from .headless import Connection, ask_windows, connect
from .rasters import RasterReadError, RasterWindow, read_window
from .record import AskRecord
from .settings import PluginSettings, SettingsError, load_settings

ENDPOINT, AUTO_START, MAX_SIDE = "ENDPOINT", "AUTO_START", "MAX_SIDE"


def parse_options(text: str) -> list[str]:
    """Options from one string: one per line, or separated by '|'."""
    parts = text.splitlines() if "\n" in text else text.split("|")
    return [p.strip() for p in parts if p.strip()]


def mask_fields(with_source: bool) -> QgsFields:
    fields = QgsFields()
    if with_source:
        fields.append(QgsField("raster", QVariant.String))
        fields.append(QgsField("question", QVariant.String))
    fields.append(QgsField("label", QVariant.String))
    fields.append(QgsField("step", QVariant.Int))
    fields.append(QgsField("area_ha", QVariant.Double))
    fields.append(QgsField("perimeter_m", QVariant.Double))
    fields.append(QgsField("score", QVariant.Double))
    return fields


class TerraScopeAlgorithm(QgsProcessingAlgorithm):
    """Base: identity from class attributes, question and worker parameters, the ask call."""

    #: Each subclass names its id, title and help here; the base answers Processing's identity calls.
    ALG_ID = ""
    ALG_TITLE = ""
    ALG_HELP = ""
    QUESTION, OPTIONS = "QUESTION", "OPTIONS"

    def name(self) -> str:
        return self.ALG_ID

    def displayName(self) -> str:
        return self.ALG_TITLE

    def shortHelpString(self) -> str:
        return self.ALG_HELP

    def createInstance(self) -> TerraScopeAlgorithm:
        return type(self)()

    def group(self) -> str:
        return ""

    def groupId(self) -> str:
        return ""

    def add_question_parameters(self, optional: bool) -> None:
        """The question and its options, worded the same in every algorithm."""
        self.addParameter(QgsProcessingParameterString(self.QUESTION, "Question", multiLine=True,
                                                       optional=optional))
        self.addParameter(QgsProcessingParameterString(self.OPTIONS, "Options (one per line or separated by |)",
                                                       multiLine=True, optional=True))

    def add_worker_parameters(self) -> None:
        settings = load_settings()
        params = [
            QgsProcessingParameterString(ENDPOINT, "Worker endpoint", settings.endpoint, optional=True),
            QgsProcessingParameterBoolean(AUTO_START, "Start a local worker if none answers", settings.auto_start),
            QgsProcessingParameterNumber(MAX_SIDE, "Largest image side sent (pixels)",
                                         QgsProcessingParameterNumber.Integer, settings.max_side, False, 64, 8192),
        ]
        for p in params:
            p.setFlags(p.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
            self.addParameter(p)

    def settings(self, parameters: dict, context: QgsProcessingContext) -> PluginSettings:
        settings = load_settings()
        endpoint = self.parameterAsString(parameters, ENDPOINT, context)
        if endpoint:
            settings.endpoint = endpoint
        settings.auto_start = self.parameterAsBool(parameters, AUTO_START, context)
        settings.max_side = self.parameterAsInt(parameters, MAX_SIDE, context)
        try:
            settings.validate()
        except SettingsError as exc:
            raise QgsProcessingException(str(exc)) from None
        return settings

    def connect(self, settings: PluginSettings, feedback: QgsProcessingFeedback) -> Connection:
        feedback.pushInfo(f"Connecting to the TerraScope worker at {settings.endpoint}")
        try:
            conn = connect(settings, is_cancelled=feedback.isCanceled, log=feedback.pushInfo)
        except (WorkerError, WorkerUnavailable, ValueError) as exc:
            raise QgsProcessingException(describe(exc)) from None
        model = (conn.info.get("model") or {}).get("name") or "?"
        feedback.pushInfo(f"Worker ready: model {model} on {conn.info.get('device') or '?'}")
        return conn

    def ask(self, conn: Connection, question: str, windows: list[RasterWindow], options: list[str],
            settings: PluginSettings, context: QgsProcessingContext,
            feedback: QgsProcessingFeedback) -> AskRecord:
        """One question on read windows with the run's generation settings, ellipsoid and cancel check."""
        return ask_windows(conn.client, question, windows, options, settings.generation(),
                           context.transformContext(), ellipsoid_of(context), feedback.isCanceled,
                           measure_grounding=settings.measure_grounding)


def read_layer(layer: QgsRasterLayer, region: QgsRectangle | None, max_side: int, role: str) -> RasterWindow:
    """Read a layer in the algorithm's thread (Processing gives each thread its own layers)."""
    if layer is None or not layer.isValid():
        raise RasterReadError("the raster layer is not valid")
    try:
        return read_window(layer.dataProvider(), region, max_side, role=role, name=layer.name())
    except RasterReadError as exc:
        raise RasterReadError(f"layer '{layer.name()}': {exc}") from None


def ellipsoid_of(context: QgsProcessingContext) -> str:
    return effective_ellipsoid(context.ellipsoid() if hasattr(context, "ellipsoid") else "")


def add_mask_features(sink: QgsFeatureSink, record: AskRecord, fields: QgsFields, target_crs: QgsCoordinateReferenceSystem,
                      context: QgsProcessingContext, source: tuple[str, str] | None = None) -> int:
    """Every mask polygon of `record` into `sink` (areas measured in the raster's own CRS first)."""
    count = 0
    for step in record.steps:
        src_crs = QgsCoordinateReferenceSystem.fromWkt(step.crs_wkt) if step.crs_wkt else QgsCoordinateReferenceSystem()
        xform = None
        if src_crs.isValid() and target_crs.isValid() and src_crs != target_crs:
            xform = QgsCoordinateTransform(src_crs, target_crs, context.transformContext())
        for poly in step.polygons:
            geom = QgsGeometry(poly.geometry)
            if xform is not None:
                geom.transform(xform)
            f = QgsFeature(fields)
            f.setGeometry(geom)
            values = [step.label, step.step + 1, poly.area_ha, poly.perimeter_m, float(step.score)]
            f.setAttributes(list(source) + values if source else values)
            sink.addFeature(f, QgsFeatureSink.FastInsert)
            count += 1
    return count
