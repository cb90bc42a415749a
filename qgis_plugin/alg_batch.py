"""Processing: "Ask about rasters (batch)" - many rasters x one question or a CSV of questions."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsFeature,
    QgsFeatureSink,
    QgsField,
    QgsFields,
    QgsGeometry,
    QgsProcessing,
    QgsProcessingException,
    QgsProcessingParameterFeatureSink,
    QgsProcessingParameterFile,
    QgsProcessingParameterMultipleLayers,
    QgsRasterLayer,
    QgsWkbTypes,
)
from qgis.PyQt.QtCore import QVariant

from .alg_common import (
    TerraScopeAlgorithm,
    add_mask_features,
    mask_fields,
    parse_options,
    read_layer,
)
from .client import WorkerError, WorkerUnavailable
from .errors import describe
from .rasters import RasterReadError, RasterWindow

RASTER_SUFFIXES = {".tif", ".tiff", ".vrt", ".img", ".jp2", ".gpkg", ".nc"}


def read_questions_csv(path: str) -> list[tuple[str, list[str]]]:
    """(question, options) rows from a CSV with a 'question' column and an optional 'options' column."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise QgsProcessingException(f"Cannot read the questions CSV {path}: {exc}") from None
    if rows and "question" not in {k.strip().lower() for k in rows[0] if k}:
        raise QgsProcessingException(f"The questions CSV {path} needs a 'question' column.")
    out = []
    for row in rows:
        norm = {(k or "").strip().lower(): (v or "") for k, v in row.items()}
        if norm.get("question", "").strip():
            out.append((norm["question"].strip(), parse_options(norm.get("options", ""))))
    if not out:
        raise QgsProcessingException(f"The questions CSV {path} has no question.")
    return out


def folder_rasters(folder: str) -> list[Path]:
    path = Path(folder)
    if not path.is_dir():
        raise QgsProcessingException(f"The folder {folder} does not exist.")
    return sorted(p for p in path.iterdir() if p.suffix.lower() in RASTER_SUFFIXES and p.is_file())


def answer_fields() -> QgsFields:
    fields = QgsFields()
    for name, kind in (("raster", QVariant.String), ("question", QVariant.String), ("answer", QVariant.String),
                       ("choice", QVariant.String), ("measured_choice", QVariant.String), ("checks", QVariant.String),
                       ("reasoning", QVariant.String), ("steps", QVariant.Int),
                       ("area_ha", QVariant.Double), ("area_ha_steps", QVariant.String), ("error", QVariant.String)):
        fields.append(QgsField(name, kind))
    return fields


def window_polygon(window: RasterWindow) -> QgsGeometry:
    return QgsGeometry.fromRect(window.extent())


class AskBatchAlgorithm(TerraScopeAlgorithm):
    INPUTS, FOLDER, QUESTIONS_CSV = "INPUTS", "FOLDER", "QUESTIONS_CSV"
    SAR_LAYERS, PAIR_LAYERS, OUTPUT, MASKS = "SAR_LAYERS", "PAIR_LAYERS", "OUTPUT", "MASKS"
    ALG_ID, ALG_TITLE = "ask_batch", "Ask about rasters (batch)"
    ALG_HELP = ("Asks TerraScope every question about every raster (layers and/or a folder) and writes one row per "
                "(raster, question): the raster's extent with answer, choice, the option the masks support "
                "(measured_choice), the worker's checks, reasoning, the number of steps, total "
                "area_ha and the area of each step. SAR or second-date layers are paired with the rasters in order. "
                "Optionally writes every mask polygon too. A raster that cannot be used gets its error in the row; "
                "the batch goes on.")

    def initAlgorithm(self, config=None) -> None:
        self.addParameter(QgsProcessingParameterMultipleLayers(self.INPUTS, "Rasters", QgsProcessing.TypeRaster,
                                                               optional=True))
        self.addParameter(QgsProcessingParameterFile(self.FOLDER, "Or a folder of rasters",
                                                     QgsProcessingParameterFile.Folder, optional=True))
        self.add_question_parameters(optional=True)
        self.addParameter(QgsProcessingParameterFile(self.QUESTIONS_CSV, "Or a CSV of questions (columns: question, "
                                                     "options)", extension="csv", optional=True))
        self.addParameter(QgsProcessingParameterMultipleLayers(self.SAR_LAYERS, "SAR layers, paired in order",
                                                               QgsProcessing.TypeRaster, optional=True))
        self.addParameter(QgsProcessingParameterMultipleLayers(self.PAIR_LAYERS, "Second dates, paired in order",
                                                               QgsProcessing.TypeRaster, optional=True))
        self.add_worker_parameters()
        self.addParameter(QgsProcessingParameterFeatureSink(self.OUTPUT, "Answers", QgsProcessing.TypeVectorPolygon))
        self.addParameter(QgsProcessingParameterFeatureSink(self.MASKS, "Mask polygons", QgsProcessing.TypeVectorPolygon,
                                                            optional=True, createByDefault=False))

    def _inputs(self, parameters, context) -> list[QgsRasterLayer]:
        layers = list(self.parameterAsLayerList(parameters, self.INPUTS, context))
        folder = self.parameterAsFile(parameters, self.FOLDER, context)
        if folder:
            for path in folder_rasters(folder):
                layer = QgsRasterLayer(str(path), path.name, "gdal")
                layers.append(layer)
        if not layers:
            raise QgsProcessingException("Give raster layers or a folder of rasters.")
        return layers

    def _questions(self, parameters, context) -> list[tuple[str, list[str]]]:
        csv_path = self.parameterAsFile(parameters, self.QUESTIONS_CSV, context)
        question = self.parameterAsString(parameters, self.QUESTION, context).strip()
        if csv_path and question:
            raise QgsProcessingException("Give one question or a CSV of questions, not both.")
        if csv_path:
            return read_questions_csv(csv_path)
        if not question:
            raise QgsProcessingException("Give a question or a CSV of questions.")
        return [(question, parse_options(self.parameterAsString(parameters, self.OPTIONS, context)))]

    def processAlgorithm(self, parameters, context, feedback):
        rasters = self._inputs(parameters, context)
        questions = self._questions(parameters, context)
        sars = list(self.parameterAsLayerList(parameters, self.SAR_LAYERS, context))
        pairs = list(self.parameterAsLayerList(parameters, self.PAIR_LAYERS, context))
        for name, extra in (("SAR layers", sars), ("second dates", pairs)):
            if extra and len(extra) != len(rasters):
                raise QgsProcessingException(f"{len(extra)} {name} for {len(rasters)} rasters: give one per raster.")
        if sars and pairs:
            raise QgsProcessingException("Give SAR layers or second dates, not both.")
        first = next((r for r in rasters if r.isValid() and r.crs().isValid()), None)
        crs = first.crs() if first is not None else QgsCoordinateReferenceSystem("EPSG:4326")
        fields = answer_fields()
        sink, dest = self.parameterAsSink(parameters, self.OUTPUT, context, fields, QgsWkbTypes.Polygon, crs)
        if sink is None:
            raise QgsProcessingException("The answers output could not be created.")
        mfields = mask_fields(with_source=True)
        msink, mdest = self.parameterAsSink(parameters, self.MASKS, context, mfields, QgsWkbTypes.MultiPolygon, crs)
        settings = self.settings(parameters, context)
        conn = self.connect(settings, feedback)
        total = len(rasters) * len(questions)
        done = 0
        try:
            max_side = min(settings.max_side, conn.max_side or settings.max_side)
            for i, raster in enumerate(rasters):
                windows: list[RasterWindow] = []
                read_error = ""
                try:
                    roles = ["t0", "t1"] if pairs else ["optical"]
                    windows.append(read_layer(raster, None, max_side, roles[0]))
                    if sars:
                        windows.append(read_layer(sars[i], None, max_side, "sar"))
                    if pairs:
                        windows.append(read_layer(pairs[i], None, max_side, "t1"))
                except RasterReadError as exc:
                    read_error = describe(exc)
                    feedback.reportError(f"{raster.name()}: {read_error}", False)
                for question, options in questions:
                    if feedback.isCanceled():
                        break
                    feedback.pushInfo(f"[{done + 1}/{total}] {raster.name()}: {question}")
                    row = self._ask_one(conn, raster, windows, read_error, question, options, settings, context,
                                        feedback, crs, fields, msink, mfields)
                    sink.addFeature(row, QgsFeatureSink.FastInsert)
                    done += 1
                    feedback.setProgress(100.0 * done / total)
                if feedback.isCanceled():
                    feedback.pushInfo("Cancelled: the rows answered so far are kept.")
                    break
        finally:
            conn.close()
        results = {self.OUTPUT: dest}
        if msink is not None:
            results[self.MASKS] = mdest
        return results

    def _ask_one(self, conn, raster, windows, read_error, question, options, settings, context, feedback, crs,
                 fields, msink, mfields) -> QgsFeature:
        row = QgsFeature(fields)
        values = {"raster": raster.source() if raster.isValid() else raster.name(), "question": question}
        if windows:
            geom = window_polygon(windows[0])
            src = QgsCoordinateReferenceSystem.fromWkt(windows[0].crs_wkt) if windows[0].crs_wkt else crs
            if src.isValid() and src != crs:
                geom.transform(QgsCoordinateTransform(src, crs, context.transformContext()))
            row.setGeometry(geom)
        error = read_error
        if not error:
            try:
                record = self.ask(conn, question, windows, options, settings, context, feedback)
                areas = [s.area_ha for s in record.steps]
                values.update(answer=record.answer, choice=record.choice or "",
                              measured_choice=record.measured_choice or "", checks=" | ".join(record.checks),
                              reasoning=record.reasoning,
                              steps=len(record.steps), area_ha=sum(a or 0.0 for a in areas),
                              area_ha_steps=json.dumps([None if a is None else round(a, 4) for a in areas]))
                if msink is not None:
                    add_mask_features(msink, record, mfields, crs, context, (values["raster"], question))
                feedback.pushInfo(f"    → {record.answer}")
            except WorkerUnavailable as exc:
                raise QgsProcessingException(describe(exc)) from None
            except (WorkerError, ValueError) as exc:
                if isinstance(exc, WorkerError) and exc.code == "cancelled":
                    error = "Cancelled."
                else:
                    error = describe(exc)
                    feedback.reportError(f"{raster.name()}: {error}", False)
        values["error"] = error
        row.setAttributes([values.get(f.name()) for f in fields])
        return row
