# All metadata lives in pyproject.toml; this shim only declares the cffi
# extension, which setuptools cannot take from pyproject.toml, and builds
# the NSS module (plain C, nss_module/Makefile) into the package.
import pathlib
import shutil
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py

NSS_LIB = "nss_module/libnss_pwserver.so.2"


class build_py_and_nss(build_py):
    def run(self):
        super().run()
        subprocess.run(["make", "-s", "-C", "nss_module"], check=True)
        subprocess.run(["make", "-s", "-C", "delivery/_csrc"], check=True)   # pdelivery (the Makefile installs it)
        if not self.editable_mode:
            shutil.copy2(NSS_LIB, pathlib.Path(self.build_lib) / NSS_LIB)


setup(cffi_modules=["pwcache/build_pwtable.py:ffibuilder", "pop/build_engine.py:ffibuilder"], cmdclass={"build_py": build_py_and_nss})
