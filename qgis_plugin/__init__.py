"""qgis_plugin"""
