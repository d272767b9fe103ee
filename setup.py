# All metadata lives in pyproject.toml; this shim only declares the cffi
# extension, which setuptools cannot take from pyproject.toml, builds the
# NSS module (plain C, nss_module/Makefile) into the package, and builds
# pdelivery (plain C, delivery/_csrc/Makefile) into the environment's bin
# folder: a compiled program, so a data file of "bin", not a script.
import pathlib
import shutil
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py

NSS_LIB = "nss_module/libnss_pwserver.so.2"
PDELIVERY = "delivery/_csrc/pdelivery"


class build_py_and_c(build_py):
    def run(self):
        super().run()
        subprocess.run(["make", "-s", "-C", "nss_module"], check=True)
        subprocess.run(["make", "-s", "-C", "delivery/_csrc"], check=True)
        if not self.editable_mode:
            shutil.copy2(NSS_LIB, pathlib.Path(self.build_lib) / NSS_LIB)


setup(
    cffi_modules=["pwcache/build_pwtable.py:ffibuilder", "pop/build_engine.py:ffibuilder"],
    cmdclass={"build_py": build_py_and_c},
    data_files=[("bin", [PDELIVERY])],
)
