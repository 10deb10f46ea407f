"""Build script for forgetkern.

Metadata lives in pyproject.toml. This file exists for the compiled parts of the package, which
are built without importing torch (so ``pip install`` never needs torch at build time).
"""
from setuptools import setup

setup()
