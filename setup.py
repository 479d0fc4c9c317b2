"""Build the Cython codec `fastrelay._frames`.

All metadata lives in pyproject.toml; this file only describes the extension.

Release builds (the default, and every published wheel) compile with -O3 and
no debug info: `-g0` comes last on the compile line, so it overrides the `-g`
that CPython's own CFLAGS (sysconfig) and a user's $CFLAGS put earlier, and
the linker is told to drop debug sections as well.

FASTRELAY_DEBUG=1 builds with debug info, line tracing and a Cython
annotation report (fastrelay/_frames.html); neither that report nor the
generated fastrelay/_frames.c is ever committed or shipped.

FASTRELAY_SANITIZE=1 instruments the modules with AddressSanitizer and
UndefinedBehaviorSanitizer (undefined behaviour aborts instead of printing a
warning and going on), for .ci/sanitizers.sh; never for a wheel. The
sanitizer runtime is deliberately not linked in: CPython is not built with
ASan, so the runtime has to be preloaded (LD_PRELOAD) anyway, and leaving it
out lets the same objects run under gcc's runtime (the test run) or under
atheris' clang runtime that carries libFuzzer (the fuzzer). Importing such a
build without a preloaded runtime fails on an undefined __asan_* symbol.
FASTRELAY_SANITIZE=fuzz adds comparison tracing (-fsanitize-coverage=trace-cmp),
which libFuzzer turns into guidance with -use_value_profile=1: gcc cannot
emit the edge coverage libFuzzer reads, but it can show it the compares.

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
SANITIZE = os.environ.get("FASTRELAY_SANITIZE") or "0"
if SANITIZE not in ("0", "1", "fuzz"):
    sys.exit(f"FASTRELAY_SANITIZE must be 0, 1 or fuzz, not {SANITIZE!r}")

if SANITIZE != "0":
    compile_args = [
        "-O0" if DEBUG else "-O1",  # -O1: exact reports, tests still fast enough
        "-g",
        "-fno-omit-frame-pointer",  # whole stacks in the reports
        "-fsanitize=address,undefined",
        "-fno-sanitize-recover=all",  # undefined behaviour aborts: a run cannot miss it
        # CPython's CFLAGS carry -fwrapv, which defines signed overflow and so
        # hides it from UBSan; nothing here relies on signed wrap-around.
        "-fno-wrapv",
    ]
    if SANITIZE == "fuzz":
        compile_args.append("-fsanitize-coverage=trace-cmp")
    link_args = []  # no runtime linked in: it is preloaded (see above)
elif DEBUG:
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
        # The .pxd, the .pxi includes and the C headers are part of the module's source.
        depends=[
            "fastrelay/_frames.pxd",
            *sorted(glob.glob("fastrelay/*.pxi")),
            *sorted(glob.glob("fastrelay/*.h")),
        ],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
        define_macros=[("CYTHON_TRACE", "1")] if DEBUG else [],
    )


# _frames: the relay's hot path. _testing: the same codec (the .pxi files)
# exposed for tests; nothing in the relay imports it.
setup(ext_modules=[extension("_frames"), extension("_testing")], cmdclass={"build_ext": build_ext})
