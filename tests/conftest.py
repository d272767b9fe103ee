"""Shared pytest set-up: tests import their helpers (pwtest, testbed, ...)
from this folder."""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
