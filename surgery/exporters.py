"""In a source checkout, `surgery.exporters` is the repository's top-level exporters/ folder.

The installed distribution maps exporters/ to the `surgery.exporters` package (setup.py, setuptools'
package_dir), so only `surgery` lands in site-packages; there that package folder is found before this
module. Here, a module with a `__path__` is a package whose submodules live in that folder.
"""
from pathlib import Path

__path__ = [str(Path(__file__).resolve().parent.parent / "exporters")]
