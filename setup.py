# All metadata lives in pyproject.toml; this shim only declares the cffi
# extension, which setuptools cannot take from pyproject.toml.
from setuptools import setup

setup(cffi_modules=["pwcache/build_pwtable.py:ffibuilder"])
