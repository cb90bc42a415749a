"""Build the installable plugin zip: ``python -m qgis_plugin.package --out dist``.

The zip holds one folder, ``terrascope/``, with the plugin's Python files (the shared protocol and client
included), ``metadata.txt`` and the icon, and nothing that QGIS's Python cannot import: the build fails if
any packaged file imports torch, the worker or the model. Standard library only, so any Python can build it.
The archive is reproducible: fixed timestamps and sorted entries.
"""

from __future__ import annotations

import argparse
import ast
import sys
import zipfile
from pathlib import Path

FOLDER = "terrascope"
ROOT = Path(__file__).resolve().parent.parent
PLUGIN_DIR = ROOT / "qgis_plugin"
EXCLUDED = {"package.py"}
FORBIDDEN_IMPORTS = ("torch", "transformers", "worker", "model", "rasterio", "pyproj", "shapely", "geopandas")
FIXED_TIME = (2024, 1, 1, 0, 0, 0)


class PackageError(RuntimeError):
    pass


def forbidden_imports(source: str, filename: str) -> list[str]:
    """Top-level module names in `FORBIDDEN_IMPORTS` that `source` imports (absolute imports only)."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [n for n in names if n.split(".")[0] in FORBIDDEN_IMPORTS]
    return found


def metadata_version(metadata: Path) -> str:
    for line in metadata.read_text(encoding="utf-8").splitlines():
        if line.startswith("version="):
            return line.split("=", 1)[1].strip()
    raise PackageError(f"{metadata} has no version=")


def files_to_pack(root: Path = ROOT) -> dict[str, Path]:
    """Archive name -> source file."""
    plugin = root / "qgis_plugin"
    out: dict[str, Path] = {}
    for path in sorted(plugin.rglob("*.py")):
        if path.name in EXCLUDED or "__pycache__" in path.parts:
            continue
        bad = forbidden_imports(path.read_text(encoding="utf-8"), str(path))
        if bad:
            raise PackageError(f"{path.relative_to(root)} imports {', '.join(bad)}, which QGIS does not ship")
        out[f"{FOLDER}/{path.relative_to(plugin).as_posix()}"] = path
    required = {"metadata.txt": root / "metadata.txt", "icon.png": root / "resources" / "icons" / "terrascope.png",
                "icon.svg": root / "resources" / "icons" / "terrascope.svg"}
    for name, path in required.items():
        if not path.exists():
            raise PackageError(f"missing {path.relative_to(root)}")
        out[f"{FOLDER}/{name}"] = path
    for extra in ("LICENSE",):
        if (root / extra).exists():
            out[f"{FOLDER}/{Path(extra).name}"] = root / extra
    return out


def build(out_dir: Path, root: Path = ROOT) -> Path:
    files = files_to_pack(root)
    metadata_version(root / "metadata.txt")
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{FOLDER}.zip"
    tmp = target.with_suffix(".zip.part")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(files):
            info = zipfile.ZipInfo(name, FIXED_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, files[name].read_bytes())
    tmp.replace(target)  # dist/ is a build folder: replacing our own previous zip is intended
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the TerraScope QGIS plugin zip.")
    parser.add_argument("--out", default="dist", help="output folder (default: dist)")
    args = parser.parse_args(argv)
    try:
        path = build(Path(args.out))
    except PackageError as exc:
        print(f"package: {exc}", file=sys.stderr)
        return 1
    with zipfile.ZipFile(path) as zf:
        count = len(zf.namelist())
    print(f"{path} ({count} files, {path.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
