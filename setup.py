"""The one compiled part: nbflash._fastlaunch, the C hot path of prepared launches.

Optional: where no C compiler is present the build goes on without it, and nbflash
launches through CuPy's binding instead (launch._Driver). It links nothing of CUDA's:
libcuda is opened at run time."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("nbflash._fastlaunch", ["src/nbflash/_fastlaunch.c"], optional=True)])
