"""The "TerraScope" Processing provider (batch work, models, qgis_process)."""

from __future__ import annotations

from qgis.core import QgsProcessingProvider
from qgis.PyQt.QtGui import QIcon

PROVIDER_ID = "terrascope"


class TerraScopeProvider(QgsProcessingProvider):
    def id(self) -> str:
        return PROVIDER_ID

    def name(self) -> str:
        return "TerraScope"

    def longName(self) -> str:
        return "TerraScope: pixel-grounded questions about rasters"

    def icon(self) -> QIcon:
        from .plugin import plugin_icon

        return plugin_icon()

    def loadAlgorithms(self) -> None:
        from .alg_batch import AskBatchAlgorithm
        from .alg_region import AskRegionAlgorithm

        self.addAlgorithm(AskBatchAlgorithm())
        self.addAlgorithm(AskRegionAlgorithm())
