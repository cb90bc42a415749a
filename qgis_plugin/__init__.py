"""TerraScope for QGIS: the plugin package.

Importing this package must stay free of QGIS imports: the worker venv imports ``qgis_plugin.protocol``
and ``qgis_plugin.client`` from here, and has no QGIS.
"""


def classFactory(iface):
    """Entry point QGIS calls when it loads the plugin."""
    from .plugin import TerraScopePlugin

    return TerraScopePlugin(iface)
