"""Plugin settings in QgsSettings, and the CURVE client key in the QGIS authentication database.

The key pair of a remote worker is a credential, so it never goes into QgsSettings (a plain ini file):
only the id of an auth config is stored there; the keys live in QGIS's encrypted auth database.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields

from qgis.core import QgsApplication, QgsAuthMethodConfig, QgsSettings

PREFIX = "terrascope/"
DEFAULT_ENDPOINT = "tcp://127.0.0.1:5557"
DEVICES = ("auto", "cuda", "cpu")
_Z85_KEY = re.compile(r"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")


class SettingsError(ValueError):
    """A setting has a value the plugin cannot use; the message names the setting."""


@dataclass
class PluginSettings:
    """Everything the user can configure. Defaults work for a local worker on this machine."""

    endpoint: str = DEFAULT_ENDPOINT
    auto_start: bool = True
    python: str = ""  # interpreter of the worker venv; "" = not configured
    model: str = "terrascope-mini"  # a preset name or a checkpoint folder
    device: str = "auto"
    request_timeout_s: float = 4.0  # silence (the worker beats every 1 s) before it counts as gone: < 5 s
    start_timeout_s: float = 180.0  # how long a starting local worker may take to answer a ping
    max_side: int = 1024  # longest side (pixels) sent to the model; larger windows are decimated
    output_dir: str = ""  # "" = the project's folder (or ~/TerraScope when the project is unsaved)
    auth_cfg: str = ""  # id of the QGIS auth config holding the CURVE keys of a remote worker
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0 = greedy (reproducible); > 0 samples
    seed: int = 0  # sampling seed (with temperature > 0)
    max_seg: int = 20  # most [SEG] steps per answer (generation stops after the last one)
    measure_grounding: bool = True  # feed each mask's measured area back into the reasoning

    def validate(self) -> None:
        """Raise SettingsError naming the first unusable value."""
        if not re.match(r"^(tcp|ipc|inproc)://\S+$", self.endpoint):
            raise SettingsError(f"Endpoint '{self.endpoint}' is not a ZeroMQ address such as {DEFAULT_ENDPOINT}.")
        if self.device not in DEVICES:
            raise SettingsError(f"Device '{self.device}' is not one of {', '.join(DEVICES)}.")
        if not 0.5 <= self.request_timeout_s <= 600:
            raise SettingsError(f"Timeout {self.request_timeout_s} s is outside 0.5-600 s.")
        if not 1 <= self.start_timeout_s <= 3600:
            raise SettingsError(f"Start timeout {self.start_timeout_s} s is outside 1-3600 s.")
        if not 64 <= self.max_side <= 8192:
            raise SettingsError(f"Largest image side {self.max_side} px is outside 64-8192 px.")
        if not 1 <= self.max_new_tokens <= 8192:
            raise SettingsError(f"Maximum answer length {self.max_new_tokens} tokens is outside 1-8192.")
        if not 0.0 <= self.temperature <= 5.0:
            raise SettingsError(f"Temperature {self.temperature} is outside 0-5.")
        if self.seed < 0:
            raise SettingsError(f"Seed {self.seed} is negative.")
        if not 0 <= self.max_seg <= 20:
            raise SettingsError(f"Most [SEG] steps {self.max_seg} is outside 0-20.")

    def generation(self) -> dict:
        """The `settings` object of an ask request."""
        out: dict = {"max_new_tokens": self.max_new_tokens, "max_seg": self.max_seg}
        if self.temperature > 0:
            out.update(temperature=self.temperature, seed=self.seed)
        return out

    def is_local(self) -> bool:
        """True when the endpoint is on this machine, where a worker may be auto-started."""
        host = self.endpoint.split("://", 1)[-1].rsplit(":", 1)[0]
        return self.endpoint.startswith(("ipc://", "inproc://")) or host in ("127.0.0.1", "localhost", "[::1]")


def load_settings(qsettings: QgsSettings | None = None) -> PluginSettings:
    """Read the settings, falling back to the default of any missing or unreadable value."""
    qs = qsettings or QgsSettings()
    values = {}
    defaults = PluginSettings()
    for f in fields(PluginSettings):
        default = getattr(defaults, f.name)
        raw = qs.value(PREFIX + f.name, default)
        try:
            if isinstance(default, bool):
                values[f.name] = raw if isinstance(raw, bool) else str(raw).lower() in ("1", "true", "yes")
            else:
                values[f.name] = type(default)(raw)
        except (TypeError, ValueError):
            values[f.name] = default
    return PluginSettings(**values)


def save_settings(settings: PluginSettings, qsettings: QgsSettings | None = None) -> None:
    """Validate then write every field (so a bad value never reaches disk)."""
    settings.validate()
    qs = qsettings or QgsSettings()
    for f in fields(PluginSettings):
        qs.setValue(PREFIX + f.name, getattr(settings, f.name))


@dataclass(frozen=True)
class CurveKeys:
    """Z85-encoded CURVE keys: the server's public key and this client's key pair."""

    server_public: str
    client_public: str
    client_secret: str

    def validate(self) -> None:
        for name in ("server_public", "client_public", "client_secret"):
            if not _Z85_KEY.match(getattr(self, name)):
                raise SettingsError(f"The {name.replace('_', ' ')} key is not a 40-character Z85 CURVE key.")


def store_curve_keys(keys: CurveKeys, auth_cfg: str = "") -> str:
    """Store (or update) the keys in the QGIS auth database; returns the auth config id to keep."""
    keys.validate()
    manager = QgsApplication.authManager()
    config = QgsAuthMethodConfig("Basic")
    config.setName("TerraScope worker (CURVE)")
    # "Basic" is a stock method, so the QGIS auth editor can show and delete the entry.
    config.setConfig("username", keys.client_public)
    config.setConfig("password", keys.client_secret)
    config.setConfig("server_public", keys.server_public)
    if auth_cfg:
        config.setId(auth_cfg)
        ok = manager.updateAuthenticationConfig(config)
    else:
        ok = manager.storeAuthenticationConfig(config)
    if not ok or not config.id():
        raise SettingsError("Could not store the worker key in the QGIS authentication database "
                            "(is the master password set?).")
    return config.id()


def load_curve_keys(auth_cfg: str) -> CurveKeys | None:
    """The keys of a remote worker, or None when none is configured."""
    if not auth_cfg:
        return None
    config = QgsAuthMethodConfig()
    ok = QgsApplication.authManager().loadAuthenticationConfig(auth_cfg, config, True)
    if isinstance(ok, tuple):  # some PyQt builds return (bool, config)
        ok, config = ok
    if not ok or not config.config("password"):
        raise SettingsError(f"Auth config '{auth_cfg}' with the worker key is missing from the QGIS "
                            "authentication database.")
    return CurveKeys(config.config("server_public"), config.config("username"), config.config("password"))


def remove_curve_keys(auth_cfg: str) -> None:
    """Delete the stored keys (the settings dialog's 'clear key')."""
    if auth_cfg:
        QgsApplication.authManager().removeAuthenticationConfig(auth_cfg)
