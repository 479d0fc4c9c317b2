"""Build the Cython codec `fastrelay._frames`.

All metadata lives in pyproject.toml; this file only describes the extension.

Release builds (the default, and every published wheel) compile with -O3 and
no debug info: `-g0` comes last on the compile line, so it overrides the `-g`
that CPython's own CFLAGS (sysconfig) and a user's $CFLAGS put earlier, and
the linker is told to drop debug sections as well.

FASTRELAY_DEBUG=1 builds with debug info, line tracing and a Cython
annotation report (fastrelay/_frames.html); neither that report nor the
generated fastrelay/_frames.c is ever committed or shipped.

The .pyx is cythonized when build_ext runs, not when setup.py is imported:
building the sdist does not generate (or need) the .c file, and the wheel is
built from the .pyx carried by the sdist. Cython comes from
[build-system].requires.
"""

import glob
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext as _build_ext

DEBUG = os.environ.get("FASTRELAY_DEBUG") == "1"

if DEBUG:
    compile_args = ["-O0", "-g"]
    link_args = []
else:
    compile_args = ["-O3", "-g0"]
    # Belt and braces: strip any debug section that a toolchain default might
    # still bring in (GNU ld / ld64 spelling).
    link_args = ["-Wl,-S"] if sys.platform == "darwin" else ["-Wl,--strip-debug"]

DIRECTIVES = {
    "language_level": 3,
    "boundscheck": False,
    "wraparound": False,
    "cdivision": True,
    "initializedcheck": False,
    "linetrace": DEBUG,
}


class build_ext(_build_ext):
    """Cythonize lazily, right before compiling."""

    def run(self):
        from Cython.Build import cythonize

        # cythonize() returns new Extension objects; keep the ones that
        # finalize_options() has already prepared and only swap their sources
        # (.pyx -> generated .c).
        generated = {
            ext.name: ext.sources
            for ext in cythonize(self.extensions, compiler_directives=DIRECTIVES, annotate=DEBUG)
        }
        for ext in self.extensions:
            ext.sources = generated[ext.name]
        super().run()


def extension(name: str) -> Extension:
    return Extension(
        f"fastrelay.{name}",
        [f"fastrelay/{name}.pyx"],
        # The .pxd and the .pxi includes are part of the module's source.
        depends=["fastrelay/_frames.pxd", *sorted(glob.glob("fastrelay/*.pxi"))],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
        define_macros=[("CYTHON_TRACE", "1")] if DEBUG else [],
    )


# _frames: the relay's hot path. _testing: the same codec (the .pxi files)
# exposed for tests; nothing in the relay imports it.
setup(ext_modules=[extension("_frames"), extension("_testing")], cmdclass={"build_ext": build_ext})
