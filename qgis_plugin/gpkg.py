"""Writing one question's results to a new GeoPackage, atomically and without overwriting anything.

Why a new file per question: a crash or a cancel in the middle of a write must leave the user's earlier
results readable, and QGIS keeps open every GeoPackage it shows. So everything is written to a hidden
`.part` file in the destination folder, then linked to a name that does not exist yet (link() fails
instead of replacing), and the `.part` name removed.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import sqlite3
import unicodedata
from pathlib import Path

import numpy as np
from osgeo import gdal, ogr, osr
from qgis.core import (
    Qgis,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransformContext,
    QgsLayerMetadata,
    QgsVectorLayer,
)
from qgis.PyQt.QtXml import QDomDocument, QDomImplementation

from .geometry import mask_polygons, measure
from .record import AskRecord, StepRecord
from .styles import style_step_layer

ANSWER_TABLE = "terrascope_answer"


class ResultsWriteError(OSError):
    """The results could not be written; the message names the file and the reason."""


def slugify(text: str, max_len: int = 40) -> str:
    """A file-name-safe ASCII slug of a question."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^A-Za-z0-9]+", "_", ascii_text).strip("_").lower()
    return slug[:max_len].rstrip("_") or "question"


def step_table(step: int) -> str:
    return f"step_{step + 1}"


def mask_table(step: int) -> str:
    return f"mask_{step + 1}"


def unique_path(folder: Path, stem: str, suffix: str = ".gpkg") -> Path:
    """The first `stem[_n].gpkg` in `folder` that does not exist (nothing is ever replaced)."""
    candidate = folder / f"{stem}{suffix}"
    n = 2
    while candidate.exists():
        candidate = folder / f"{stem}_{n}{suffix}"
        n += 1
    return candidate


def measure_steps(record: AskRecord, context: QgsCoordinateTransformContext, ellipsoid: str) -> None:
    """Polygonize and measure every step that has not been measured yet."""
    for step in record.steps:
        if step.polygons:
            continue
        crs = QgsCoordinateReferenceSystem.fromWkt(step.crs_wkt) if step.crs_wkt else QgsCoordinateReferenceSystem()
        step.polygons = measure(mask_polygons(step.mask, step.transform, step.crs_wkt), crs, context, ellipsoid)


def _srs(wkt: str) -> osr.SpatialReference | None:
    if not wkt:
        return None
    srs = osr.SpatialReference()
    srs.ImportFromWkt(wkt)
    srs.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    return srs


def _write_vectors(path: Path, record: AskRecord) -> None:
    ds = ogr.GetDriverByName("GPKG").CreateDataSource(str(path))
    if ds is None:
        raise ResultsWriteError(f"cannot create {path}")
    try:
        for step in record.steps:
            layer = ds.CreateLayer(step_table(step.step), _srs(step.crs_wkt), ogr.wkbMultiPolygon,
                                   ["GEOMETRY_NAME=geom", "FID=fid"])
            for name, kind in (("label", ogr.OFTString), ("step", ogr.OFTInteger), ("area_ha", ogr.OFTReal),
                               ("perimeter_m", ogr.OFTReal), ("score", ogr.OFTReal)):
                layer.CreateField(ogr.FieldDefn(name, kind))
            layer.StartTransaction()
            for poly in step.polygons:
                feature = ogr.Feature(layer.GetLayerDefn())
                geom = ogr.CreateGeometryFromWkb(bytes(poly.geometry.asWkb()))
                feature.SetGeometry(ogr.ForceToMultiPolygon(geom))
                feature.SetField("label", step.label)
                feature.SetField("step", step.step + 1)
                if poly.area_ha is not None:
                    feature.SetField("area_ha", poly.area_ha)
                if poly.perimeter_m is not None:
                    feature.SetField("perimeter_m", poly.perimeter_m)
                feature.SetField("score", float(step.score))
                layer.CreateFeature(feature)
            layer.CommitTransaction()
        table = ds.CreateLayer(ANSWER_TABLE, None, ogr.wkbNone)
        columns = ("question", "options", "answer", "choice", "reasoning", "text", "layers", "model", "device",
                   "created", "steps_json")
        for name in columns:
            table.CreateField(ogr.FieldDefn(name, ogr.OFTString))
        row = ogr.Feature(table.GetLayerDefn())
        steps_json = json.dumps([{"step": s.step + 1, "label": s.label, "score": s.score, "area_ha": s.area_ha,
                                  "worker_area_ha": s.worker_area_ha, "perimeter_m": s.perimeter_m,
                                  "measurements": s.measurements} for s in record.steps], default=str)
        values = (record.question, json.dumps(record.options), record.answer, record.choice or "",
                  record.reasoning, record.text, json.dumps(record.layer_names), record.model, record.device,
                  record.created, steps_json)
        for name, value in zip(columns, values):
            row.SetField(name, value)
        table.CreateFeature(row)
        _write_styles(ds, record)
    finally:
        ds = None


def _write_masks(path: Path, steps: list[StepRecord]) -> None:
    for step in steps:
        rows, cols = step.mask.shape
        options = [f"RASTER_TABLE={mask_table(step.step)}", "APPEND_SUBDATASET=YES", "TILE_FORMAT=PNG",
                   f"RASTER_DESCRIPTION=Mask of step {step.step + 1}: {step.label[:200]}"]
        # UInt16 (a gridded coverage) reads back as one band; Byte tiles would read back as RGBA.
        ds = gdal.GetDriverByName("GPKG").Create(str(path), cols, rows, 1, gdal.GDT_UInt16, options=options)
        if ds is None:
            raise ResultsWriteError(f"cannot add mask {step.step + 1} to {path}: {gdal.GetLastErrorMsg()}")
        ds.SetGeoTransform(list(step.transform))
        srs = _srs(step.crs_wkt)
        if srs is not None:
            ds.SetProjection(srs.ExportToWkt())
        ds.GetRasterBand(1).WriteArray(step.mask.astype(np.uint16))
        ds.FlushCache()
        ds = None


def layer_metadata(record: AskRecord, step: StepRecord | None) -> QgsLayerMetadata:
    """Question, answer and reasoning where QGIS shows them (Layer Properties > Metadata)."""
    md = QgsLayerMetadata()
    title = record.question.strip()
    if step is not None:
        title = f"Step {step.step + 1}: {step.label} — {title}"
    md.setTitle(title[:250])
    parts = [f"Question: {record.question}", f"Answer: {record.answer}"]
    if record.choice:
        parts.append(f"Choice: {record.choice}")
    if record.options:
        parts.append("Options: " + " | ".join(record.options))
    parts.append(f"Reasoning: {record.reasoning}")
    md.setAbstract("\n\n".join(parts))
    md.setKeywords({"TerraScope": ["TerraScope", record.model or "model"]})
    return md


def step_qml(step: int) -> str:
    """The QML of a step layer's style (built on a memory layer: no file is touched)."""
    layer = QgsVectorLayer("MultiPolygon?crs=EPSG:4326", "style", "memory")
    style_step_layer(layer, step)
    doc = QDomDocument()
    layer.exportNamedStyle(doc)
    return doc.toString()


def _write_styles(ds: ogr.DataSource, record: AskRecord) -> None:
    """Each step's style as QGIS's default in `layer_styles`, so the GeoPackage alone opens styled."""
    table = ds.CreateLayer("layer_styles", None, ogr.wkbNone)
    for name, width in (("f_table_catalog", 256), ("f_table_schema", 256), ("f_table_name", 256),
                        ("f_geometry_column", 256), ("styleName", 30), ("styleQML", 0), ("styleSLD", 0),
                        ("description", 0), ("owner", 30), ("ui", 30)):
        field = ogr.FieldDefn(name, ogr.OFTString)
        field.SetWidth(width)
        table.CreateField(field)
    flag = ogr.FieldDefn("useAsDefault", ogr.OFTInteger)
    flag.SetSubType(ogr.OFSTBoolean)
    table.CreateField(flag)
    table.CreateField(ogr.FieldDefn("update_time", ogr.OFTDateTime))
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y/%m/%d %H:%M:%S")
    for step in record.steps:
        f = ogr.Feature(table.GetLayerDefn())
        for name, value in (("f_table_catalog", ""), ("f_table_schema", ""), ("f_table_name", step_table(step.step)),
                            ("f_geometry_column", "geom"), ("styleName", step_table(step.step)),
                            ("styleQML", step_qml(step.step)), ("styleSLD", ""),
                            ("description", "TerraScope step colour"), ("owner", ""), ("update_time", now)):
            f.SetField(name, value)
        f.SetField("useAsDefault", 1)
        table.CreateFeature(f)


_METADATA_SQL = [
    ("CREATE TABLE IF NOT EXISTS gpkg_extensions (table_name TEXT, column_name TEXT, extension_name TEXT NOT NULL, "
     "definition TEXT NOT NULL, scope TEXT NOT NULL, CONSTRAINT ge_tce UNIQUE (table_name, column_name, "
     "extension_name))"),
    ("CREATE TABLE IF NOT EXISTS gpkg_metadata (id INTEGER CONSTRAINT m_pk PRIMARY KEY ASC NOT NULL, "
    "md_scope TEXT NOT NULL DEFAULT 'dataset', md_standard_uri TEXT NOT NULL, "
    "mime_type TEXT NOT NULL DEFAULT 'text/xml', metadata TEXT NOT NULL DEFAULT '')"),
    ("CREATE TABLE IF NOT EXISTS gpkg_metadata_reference (reference_scope TEXT NOT NULL, table_name TEXT, "
    "column_name TEXT, row_id_value INTEGER, timestamp DATETIME NOT NULL DEFAULT "
    "(strftime('%Y-%m-%dT%H:%M:%fZ','now')), md_file_id INTEGER NOT NULL, md_parent_id INTEGER, "
    "CONSTRAINT crmr_mfi_fk FOREIGN KEY (md_file_id) REFERENCES gpkg_metadata(id), "
    "CONSTRAINT crmr_mpi_fk FOREIGN KEY (md_parent_id) REFERENCES gpkg_metadata(id))"),
]
_METADATA_EXTENSION = "http://www.geopackage.org/spec120/#extension_metadata"


def metadata_xml(md: QgsLayerMetadata) -> str:
    """QGIS's own XML for layer metadata, as its OGR provider stores it in a GeoPackage."""
    doctype = QDomImplementation().createDocumentType("qgis", "http://mrcc.com/qgis.dtd", "SYSTEM")
    doc = QDomDocument(doctype)
    root = doc.createElement("qgis")
    root.setAttribute("version", Qgis.QGIS_VERSION)
    doc.appendChild(root)
    md.writeMetadataXml(root, doc)
    return doc.toString()


def _write_metadata(path: Path, record: AskRecord) -> None:
    """Question, answer and reasoning in each step table's metadata (GeoPackage metadata extension)."""
    if not record.steps:
        return  # the answer table holds them; no step table to describe
    con = sqlite3.connect(str(path))
    try:
        con.execute("PRAGMA synchronous=OFF")  # a private .part file: it is fsynced once before publishing
        with con:
            for sql in _METADATA_SQL:
                con.execute(sql)
            for table in ("gpkg_metadata", "gpkg_metadata_reference"):
                con.execute("INSERT INTO gpkg_extensions (table_name, column_name, extension_name, definition, scope) "
                            "SELECT ?, NULL, 'gpkg_metadata', ?, 'read-write' WHERE NOT EXISTS (SELECT 1 FROM "
                            "gpkg_extensions WHERE table_name = ? AND extension_name = 'gpkg_metadata')",
                            (table, _METADATA_EXTENSION, table))
            for step in record.steps:
                cur = con.execute("INSERT INTO gpkg_metadata (md_scope, md_standard_uri, mime_type, metadata) "
                                  "VALUES ('dataset', 'http://mrcc.com/qgis.dtd', 'text/xml', ?)",
                                  (metadata_xml(layer_metadata(record, step)),))
                con.execute("INSERT INTO gpkg_metadata_reference (reference_scope, table_name, md_file_id) "
                            "VALUES ('table', ?, ?)", (step_table(step.step), cur.lastrowid))
    except sqlite3.Error as exc:
        raise ResultsWriteError(f"cannot write the metadata of {path}: {exc}") from exc
    finally:
        con.close()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_results(record: AskRecord, folder: Path, context: QgsCoordinateTransformContext,
                  ellipsoid: str) -> Path:
    """Measure, write `record` to a new GeoPackage in `folder`, and return its path.

    Runs in a background task: polygonizing large masks takes far more than 100 ms.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ResultsWriteError(f"cannot create the results folder {folder}: {exc.strerror}") from exc
    measure_steps(record, context, ellipsoid)
    stem = f"terrascope_{record.created.replace(':', '').replace('-', '')}_{slugify(record.question)}"
    part = folder / f".{stem}.{os.getpid()}.part.gpkg"  # hidden; GDAL wants the .gpkg extension
    try:
        part.unlink(missing_ok=True)
        # SQLite syncs after every statement by default (~0.1 s each); the .part file is private, so it is
        # written unsynced and made durable once, before it gets its final name.
        gdal.SetThreadLocalConfigOption("OGR_SQLITE_SYNCHRONOUS", "OFF")
        try:
            _write_vectors(part, record)
            _write_masks(part, record.steps)
        finally:
            gdal.SetThreadLocalConfigOption("OGR_SQLITE_SYNCHRONOUS", None)
        _write_metadata(part, record)
        _fsync(part)
        final = _publish(part, folder, stem)
        record.gpkg_path = str(final)
        return final
    except ResultsWriteError:
        part.unlink(missing_ok=True)
        raise
    except (OSError, RuntimeError) as exc:
        part.unlink(missing_ok=True)
        raise ResultsWriteError(f"cannot write results to {folder}: {exc}") from exc


def _publish(part: Path, folder: Path, stem: str) -> Path:
    """Give the finished file its final name without ever replacing an existing file."""
    for _ in range(1000):
        final = unique_path(folder, stem)
        try:
            os.link(part, final)  # atomic, and fails if `final` appeared meanwhile
        except FileExistsError:
            continue
        except OSError:  # file systems without hard links
            if final.exists():
                continue
            part.rename(final)
            return final
        part.unlink()
        return final
    raise ResultsWriteError(f"no free file name for {stem} in {folder}")
