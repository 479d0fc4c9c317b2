"""Build the Cython codec `fastrelay._frames`.

FASTRELAY_DEBUG=1 builds with debug info, line tracing and a Cython
annotation report (fastrelay/_frames.html); release builds are -O3 with no
debug info.
"""
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("FASTRELAY_DEBUG") == "1"

compile_args = ["-O0", "-g"] if DEBUG else ["-O3", "-g0"]
directives = {
    "language_level": 3,
    "boundscheck": False,
    "wraparound": False,
    "cdivision": True,
    "initializedcheck": False,
    "linetrace": DEBUG,
}

extension = Extension(
    "fastrelay._frames",
    ["fastrelay/_frames.pyx"],
    extra_compile_args=compile_args,
    define_macros=[("CYTHON_TRACE", "1")] if DEBUG else [],
)

setup(ext_modules=cythonize([extension], compiler_directives=directives, annotate=DEBUG))
