"""Settings in QgsSettings, the CURVE key in the QGIS auth database, the dialog, and a CURVE worker."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import use_settings
from qgis.core import QgsApplication, QgsSettings
from qgislib import REPO, RealWorker, free_endpoint, process_events_until, worker_python

from qgis_plugin.settings import (
    PREFIX,
    CurveKeys,
    PluginSettings,
    SettingsError,
    load_curve_keys,
    load_settings,
    remove_curve_keys,
    save_settings,
    store_curve_keys,
)
from qgis_plugin.settings_dialog import SettingsDialog, keys_from_folder
from qgis_plugin.worker_manager import CONNECTED, UNREACHABLE


@pytest.fixture(scope="module")
def auth_ready():
    manager = QgsApplication.authManager()
    assert manager.setMasterPassword("terrascope-tests", True)
    return manager


@pytest.fixture(scope="module")
def key_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys") / "k"
    out = subprocess.run([worker_python(), "-m", "worker.cli", "keys", str(folder)], cwd=REPO, capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    return folder


def test_round_trip_and_defaults():
    assert load_settings() == PluginSettings()
    s = PluginSettings(endpoint="tcp://10.0.0.5:6000", auto_start=False, python="/opt/venv/bin/python",
                       model="/models/TerraScope", device="cuda", request_timeout_s=3.5, max_side=768,
                       output_dir="/data/out", max_new_tokens=256, temperature=0.7, seed=3, max_seg=4)
    save_settings(s)
    assert load_settings() == s
    assert not s.is_local() and PluginSettings().is_local()
    assert s.generation() == {"max_new_tokens": 256, "max_seg": 4, "temperature": 0.7, "seed": 3}
    assert PluginSettings().generation() == {"max_new_tokens": 512, "max_seg": 20}


def test_unreadable_stored_values_fall_back_to_defaults():
    QgsSettings().setValue(PREFIX + "max_side", "lots")
    QgsSettings().setValue(PREFIX + "auto_start", "false")
    s = load_settings()
    assert s.max_side == PluginSettings().max_side and s.auto_start is False


@pytest.mark.parametrize("field,value,words", [
    ("endpoint", "localhost:5557", "not a ZeroMQ address"),
    ("device", "tpu", "Device 'tpu'"),
    ("request_timeout_s", 0.1, "Timeout"),
    ("max_side", 10, "Largest image side"),
    ("temperature", 9.0, "Temperature"),
])
def test_bad_values_are_refused_with_a_message_naming_them(field, value, words):
    s = PluginSettings(**{field: value})
    with pytest.raises(SettingsError, match=words):
        save_settings(s)
    assert load_settings() == PluginSettings()  # nothing written


def test_curve_keys_live_in_the_auth_database(auth_ready, key_folder):
    keys = keys_from_folder(key_folder)
    cfg = store_curve_keys(keys)
    assert cfg and load_curve_keys(cfg) == keys
    ini = QgsSettings().fileName()
    save_settings(PluginSettings(auth_cfg=cfg))
    assert keys.client_secret not in Path(ini).read_text(encoding="utf-8")  # only the id is in the ini file
    other = CurveKeys(keys.server_public, keys.client_public, keys.server_public)
    assert store_curve_keys(other, cfg) == cfg and load_curve_keys(cfg) == other
    remove_curve_keys(cfg)
    with pytest.raises(SettingsError, match="missing"):
        load_curve_keys(cfg)
    with pytest.raises(SettingsError, match="Z85"):
        store_curve_keys(CurveKeys("short", keys.client_public, keys.client_secret))


def test_dialog_saves_settings_and_key(qgis_iface, auth_ready, key_folder):
    dialog = SettingsDialog(load_settings(), qgis_iface.mainWindow())
    dialog.endpoint.setText("tcp://127.0.0.1:6001")
    dialog.device.setCurrentText("cpu")
    dialog.auto_start.setChecked(False)
    dialog.temperature.setValue(0.5)
    dialog._import_keys(str(key_folder))
    dialog.accept()
    saved = load_settings()
    assert dialog.saved == saved and saved.endpoint == "tcp://127.0.0.1:6001" and saved.device == "cpu"
    assert saved.auth_cfg and load_curve_keys(saved.auth_cfg) == keys_from_folder(key_folder)
    bad = SettingsDialog(saved, qgis_iface.mainWindow())
    bad.endpoint.setText("nonsense")
    bad.accept()
    assert bad.saved is None and "ZeroMQ address" in bad.error_label.text()
    remove_curve_keys(saved.auth_cfg)


def test_plugin_uses_the_stored_key_for_a_curve_worker(plugin, auth_ready, key_folder, tmp_path):
    endpoint = free_endpoint()
    worker = RealWorker(tmp_path / "curve", "--curve-secret", str(key_folder / "server.secret"), "--client-key",
                        str(key_folder / "client.public"), endpoint=endpoint)
    try:
        import time

        time.sleep(0.5)
        plugin.show_dock()
        manager = plugin.manager
        # Without the key: no service, the status says unreachable.
        manager.apply_settings(use_settings(endpoint=endpoint, auto_start=False, request_timeout_s=1.0))
        assert process_events_until(lambda: manager.status.state == UNREACHABLE, 15)
        cfg = store_curve_keys(keys_from_folder(key_folder))
        manager.apply_settings(use_settings(endpoint=endpoint, auto_start=False, auth_cfg=cfg))
        assert process_events_until(lambda: manager.status.state == CONNECTED, 120), manager.status
        assert manager.status.info.get("curve") is True
        remove_curve_keys(cfg)
    finally:
        worker.stop()
