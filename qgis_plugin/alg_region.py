"""Processing: "Ask about a region" - one raster (+ optional SAR or second date) and a question -> masks."""

from __future__ import annotations

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsProcessing,
    QgsProcessingException,
    QgsProcessingOutputNumber,
    QgsProcessingOutputString,
    QgsProcessingParameterExtent,
    QgsProcessingParameterFeatureSink,
    QgsProcessingParameterRasterLayer,
    QgsWkbTypes,
)

from .alg_common import (
    TerraScopeAlgorithm,
    add_mask_features,
    mask_fields,
    parse_options,
    read_layer,
)
from .client import WorkerError, WorkerUnavailable
from .errors import describe
from .rasters import RasterReadError


class AskRegionAlgorithm(TerraScopeAlgorithm):
    INPUT, EXTENT, SAR, PAIR, OUTPUT = "INPUT", "EXTENT", "SAR", "PAIR", "OUTPUT"
    ALG_ID, ALG_TITLE = "ask_region", "Ask about a region"
    ALG_HELP = ("Asks TerraScope one question about a raster (optionally limited to an extent, with a SAR layer "
                "or a second date) and writes each [SEG] step's mask as polygons with label, step, area_ha "
                "(ellipsoidal, QgsDistanceArea), perimeter_m and score. The answer, choice and reasoning are "
                "outputs of the algorithm.")

    def initAlgorithm(self, config=None) -> None:
        self.addParameter(QgsProcessingParameterRasterLayer(self.INPUT, "Raster"))
        self.add_question_parameters(optional=False)
        self.addParameter(QgsProcessingParameterExtent(self.EXTENT, "Region (default: whole raster)", optional=True))
        self.addParameter(QgsProcessingParameterRasterLayer(self.SAR, "SAR layer (optional)", optional=True))
        self.addParameter(QgsProcessingParameterRasterLayer(self.PAIR, "Second date (optional: before/after pair)",
                                                            optional=True))
        self.add_worker_parameters()
        self.addParameter(QgsProcessingParameterFeatureSink(self.OUTPUT, "Masks", QgsProcessing.TypeVectorPolygon))
        self.addOutput(QgsProcessingOutputString("ANSWER", "Answer"))
        self.addOutput(QgsProcessingOutputString("CHOICE", "Choice"))
        self.addOutput(QgsProcessingOutputString("MEASURED_CHOICE", "Option the masks support (measured)"))
        self.addOutput(QgsProcessingOutputString("CHECKS", "Worker checks (answer vs measurements)"))
        self.addOutput(QgsProcessingOutputString("REASONING", "Reasoning"))
        self.addOutput(QgsProcessingOutputNumber("AREA_HA", "Total area of all steps (ha)"))

    def processAlgorithm(self, parameters, context, feedback):
        layer = self.parameterAsRasterLayer(parameters, self.INPUT, context)
        if layer is None:
            raise QgsProcessingException("The raster layer could not be opened.")
        question = self.parameterAsString(parameters, self.QUESTION, context).strip()
        if not question:
            raise QgsProcessingException("The question is empty.")
        options = parse_options(self.parameterAsString(parameters, self.OPTIONS, context))
        sar = self.parameterAsRasterLayer(parameters, self.SAR, context)
        pair = self.parameterAsRasterLayer(parameters, self.PAIR, context)
        if sar is not None and pair is not None:
            raise QgsProcessingException("Give either a SAR layer or a second date, not both.")
        settings = self.settings(parameters, context)
        conn = self.connect(settings, feedback)
        try:
            max_side = min(settings.max_side, conn.max_side or settings.max_side)
            region = None
            if parameters.get(self.EXTENT):
                region = self.parameterAsExtent(parameters, self.EXTENT, context, layer.crs())
            layers = [(layer, "t0" if pair is not None else "optical")]
            if sar is not None:
                layers.append((sar, "sar"))
            if pair is not None:
                layers.append((pair, "t1"))
            windows = []
            for lay, role in layers:
                lay_region = None
                if region is not None:
                    lay_region = self.parameterAsExtent(parameters, self.EXTENT, context, lay.crs())
                windows.append(read_layer(lay, lay_region, max_side, role))
            feedback.setProgress(10)
            record = self.ask(conn, question, windows, options, settings, context, feedback)
        except (WorkerError, WorkerUnavailable, RasterReadError, ValueError) as exc:
            raise QgsProcessingException(describe(exc)) from None
        finally:
            conn.close()
        crs = QgsCoordinateReferenceSystem.fromWkt(windows[0].crs_wkt) if windows[0].crs_wkt else layer.crs()
        fields = mask_fields(with_source=False)
        sink, dest = self.parameterAsSink(parameters, self.OUTPUT, context, fields, QgsWkbTypes.MultiPolygon, crs)
        if sink is None:
            raise QgsProcessingException("The masks output could not be created.")
        add_mask_features(sink, record, fields, crs, context)
        feedback.pushInfo(f"Answer: {record.answer}")
        total = sum(s.area_ha or 0.0 for s in record.steps)
        feedback.setProgress(100)
        return {self.OUTPUT: dest, "ANSWER": record.answer, "CHOICE": record.choice or "",
                "MEASURED_CHOICE": record.measured_choice or "", "CHECKS": " | ".join(record.checks),
                "REASONING": record.reasoning, "AREA_HA": total}
