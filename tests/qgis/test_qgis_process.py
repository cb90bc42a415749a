"""The batch algorithm through `qgis_process` (headless QGIS), with the plugin installed from its zip.

`qgis_process` comes with the Debian package `qgis` (the GUI application), which the test machines may not
have; the test says so in its skip reason instead of passing silently.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import zipfile

import pytest
from qgis.core import QgsVectorLayer
from qgislib import scene, write_geotiff

from qgis_plugin import package

# Debian's /usr/bin/qgis_process wrapper passes --noversioncheck from /etc/default/qgis, which the 3.22 binary
# rejects ("Command --noversioncheck not known!"); call the binary behind it when it is there.
QGIS_PROCESS = shutil.which("qgis_process.bin") or shutil.which("qgis_process")


@pytest.mark.skipif(QGIS_PROCESS is None, reason="qgis_process is not installed (Debian package 'qgis')")
def test_batch_through_qgis_process(worker, tmp_path):
    profile = tmp_path / "profile"
    plugins = profile / "profiles" / "default" / "python" / "plugins"
    plugins.mkdir(parents=True)
    with zipfile.ZipFile(package.build(tmp_path / "dist")) as zf:
        zf.extractall(plugins)
    ini = profile / "profiles" / "default" / "QGIS" / "QGIS3.ini"
    ini.parent.mkdir(parents=True)
    ini.write_text(f"[PythonPlugins]\nterrascope=true\n\n[terrascope]\nendpoint={worker.endpoint}\n"
                   "auto_start=false\nmax_new_tokens=4\nmax_side=96\n", encoding="utf-8")
    rasters = [write_geotiff(tmp_path / f"r{i}.tif", scene(32, 32, seed=i), (500000, 10, 0, 4100000, 0, -10), 32631)
               for i in range(3)]
    out = tmp_path / "answers.gpkg"
    cmd = [QGIS_PROCESS, "run", "terrascope:ask_batch", "--", *[f"INPUTS={r}" for r in rasters],
           "QUESTION=Is there water?", f"ENDPOINT={worker.endpoint}", f"OUTPUT={out}"]
    env = dict(os.environ, QGIS_CUSTOM_CONFIG_PATH=str(profile), QT_QPA_PLATFORM="offscreen")
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    layer = QgsVectorLayer(str(out), "answers", "ogr")
    assert layer.isValid() and layer.featureCount() == 3
    assert all(f["answer"] and not f["error"] for f in layer.getFeatures())
