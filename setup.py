"""Package discovery (everything else is in pyproject.toml): exporters/ stays at the top of the
repository but installs as `surgery.exporters`, so only `surgery` lands in site-packages."""
from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


class BuildPy(build_py):
    """Leave out surgery/exporters.py, the source-checkout stand-in for the mapped package."""

    def find_package_modules(self, package, package_dir):
        return [m for m in super().find_package_modules(package, package_dir) if (m[0], m[1]) != ("surgery", "exporters")]


EXPORTERS = ["surgery." + p for p in find_packages(include=["exporters", "exporters.*"])]
setup(packages=find_packages(include=["surgery", "surgery.*"]) + EXPORTERS,
      package_dir={"surgery.exporters": "exporters"}, cmdclass={"build_py": BuildPy})
