#!/usr/bin/env bash
# Memory safety of the compiled modules: build them with AddressSanitizer and
# UndefinedBehaviorSanitizer (FASTRELAY_SANITIZE in setup.py) and push hostile
# bytes through them. Any report fails the run.
#
#   bash .ci/sanitizers.sh              # what .ci/run does: `tests`, then `fuzz` for $FUZZ_SECONDS
#   bash .ci/sanitizers.sh tests [pytest args]   # default: the protocol, fuzz, property, abuse,
#                                                # sans-I/O, compression, compiled-handshake,
#                                                # lingering-close and backpressure tests
#   bash .ci/sanitizers.sh fuzz [libFuzzer args] # atheris on fuzz/fuzz_relay.py, e.g.
#                                                # -max_total_time=3600 or a corpus directory
#
# How:
#  - The tree is copied (tracked and untracked-not-ignored files) into a temp
#    dir and built in place there, so the normal build in fastrelay/ is never
#    touched; PYTHONPATH points at the copy, and the relays the tests start
#    (`python -m fastrelay` through tests/relay_process.py) import it too.
#  - CPython is not built with ASan, so gcc's runtimes are preloaded
#    (LD_PRELOAD libasan + libubsan) into the test process, and the relays
#    inherit that environment. A preflight checks that a relay really maps
#    the sanitized module and the runtime.
#  - PYTHONMALLOC=malloc: every Python object gets its own malloc block, so
#    ASan knows its bounds (pymalloc would carve small objects out of arenas
#    where an overrun lands in a neighbour unseen).
#  - Leak checking is on: with the real interpreter (not a pyenv shim script)
#    and PYTHONMALLOC=malloc, CPython itself leaves nothing unreachable at
#    exit. .ci/lsan.supp lists the few third-party allocations that are held
#    for the life of the process (cryptography's bindings), each with why.
#  - A report aborts the process that hit it. A relay's stderr is also kept in
#    a file (FASTRELAY_CMD wraps `python -m fastrelay` in a tee), and the run
#    fails if any relay printed a report, even one whose end no test checked.
#  - fuzz: atheris' own runtime (clang's ASan + UBSan with libFuzzer,
#    asan_with_fuzzer.so) is preloaded instead of gcc's, over a build with
#    FASTRELAY_SANITIZE=fuzz; -use_value_profile=1 lets libFuzzer learn from
#    the compiled code's comparisons. Crashes land in artifacts/fuzz/.
#
# Needs gcc, git, and network access to the package index the first time
# atheris is needed (installed into the temp dir when not importable).
# KEEP_SANITIZER_DIR=1 keeps the temp dir. Costs on a 2-core machine: see
# the README's "Developing" table.
set -euo pipefail

cd "$(dirname "$0")/.."
REPO="$(pwd)"
# The interpreter itself: a pyenv shim is a bash script, and a bash under
# LD_PRELOAD=libasan reports its own leaks at exit.
PY="$("${PYTHON:-python}" -c 'import sys; print(sys.executable)')"
FUZZ_SECONDS="${FUZZ_SECONDS:-60}"
ATHERIS_VERSION=3.0.0
TESTS=(
    tests/test_protocol_errors.py
    tests/test_fuzz.py
    tests/test_codec_properties.py
    tests/test_relay_properties.py
    tests/test_abuse.py
    tests/test_connection_sansio.py
    tests/test_compression.py
    tests/test_memory_safety.py
    tests/test_upgrade_fast.py
    tests/test_hmac_tokens.py
    tests/test_lingering_close.py
    tests/test_backpressure.py
)
# halt/abort: the first report ends the process, so nothing runs on after it.
ASAN_OPTS="abort_on_error=1:halt_on_error=1:detect_leaks=1:detect_stack_use_after_return=1"
# A 32 MB quarantine (freed memory kept poisoned to catch late uses) instead
# of 256: the abuse tests bound the relay's RSS at 200 MiB, and ASan's RSS is
# about 120 MiB plus the quarantine.
ASAN_OPTS="$ASAN_OPTS:strict_string_checks=1:quarantine_size_mb=32"
UBSAN_OPTS="halt_on_error=1:abort_on_error=1:print_stacktrace=1"
LSAN_OPTS="suppressions=$REPO/.ci/lsan.supp:print_suppressions=0"
# What a sanitizer report starts with (ASan, LSan, UBSan).
REPORT='ERROR: (AddressSanitizer|LeakSanitizer)|runtime error:|SUMMARY: [A-Za-z]*Sanitizer'

START=$SECONDS
step() { printf '\n[sanitizers %3ds] %s\n' "$((SECONDS - START))" "$*"; }
die() { printf '[sanitizers] FAIL: %s\n' "$*" >&2; exit 1; }

command -v gcc >/dev/null || die "gcc is needed (the runtimes are gcc's)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/fastrelay-sanitizers.XXXXXX")"
cleanup() {
    local rc=$?
    if [ "${KEEP_SANITIZER_DIR:-0}" = 1 ]; then
        echo "[sanitizers] kept $WORK" >&2
    else
        rm -rf "$WORK"
    fi
    if [ "$rc" -eq 0 ]; then
        printf '[sanitizers] OK in %ds\n' "$((SECONDS - START))"
    else
        printf '[sanitizers] FAILED (exit %d) after %ds\n' "$rc" "$((SECONDS - START))" >&2
    fi
}
trap cleanup EXIT

# build MODE DIR: a copy of the working tree in DIR, its modules built in
# place with FASTRELAY_SANITIZE=MODE.
build() {
    local mode=$1 dir=$2
    step "build with FASTRELAY_SANITIZE=$mode in $dir"
    mkdir -p "$dir"
    git ls-files -z --cached --others --exclude-standard \
        | tar --null --files-from=- --ignore-failed-read -cf - 2>/dev/null \
        | tar -xf - -C "$dir"
    [ -f "$dir/setup.py" ] || die "could not copy the working tree"
    (cd "$dir" && CC=gcc FASTRELAY_SANITIZE="$mode" timeout 600 "$PY" setup.py build_ext --inplace \
        >"$dir/build.log" 2>&1) || { tail -n 40 "$dir/build.log" >&2; die "build failed"; }
    grep -E '^gcc .*_frames\.c' "$dir/build.log" | sed 's/^/  /'
    grep -q -- '-fsanitize=address,undefined' "$dir/build.log" || die "not a sanitizer build"
}

runtime() {  # the path of one of gcc's shared runtimes
    local lib
    lib="$(gcc -print-file-name="$1")"
    [ -f "$lib" ] || die "gcc has no $1 (install its sanitizer runtimes, e.g. libasan8 libubsan1)"
    echo "$lib"
}

run_tests() {
    local src="$WORK/tests-src"
    build 1 "$src"
    local logs="$WORK/relay-logs"
    mkdir -p "$logs"
    # Each relay: `python -m fastrelay`, its stderr also copied into $logs
    # (one file per relay, named by its PID, which stays the relay's: exec).
    # tee itself runs without the preloaded runtime.
    cat >"$WORK/relay" <<EOF
#!/usr/bin/env bash
exec "$PY" -m fastrelay "\$@" 2> >(LD_PRELOAD= exec tee "$logs/relay.\$\$.stderr" >&2)
EOF
    chmod +x "$WORK/relay"

    local preload
    preload="$(runtime libasan.so) $(runtime libubsan.so)"
    sanitized() {  # sanitized SECONDS COMMAND...: in the copy, with the runtimes preloaded
        local limit=$1
        shift
        # timeout outside the preload: only the Python processes run sanitized.
        (cd "$src" && timeout "$limit" env PYTHONPATH="$src" PYTHONMALLOC=malloc \
            FASTRELAY_CMD="$WORK/relay" ASAN_OPTIONS="$ASAN_OPTS" UBSAN_OPTIONS="$UBSAN_OPTS" \
            LSAN_OPTIONS="$LSAN_OPTS" LD_PRELOAD="$preload" "$@")
    }

    step "preflight: the tests and their relays load the sanitized module"
    sanitized 120 "$PY" - "$src" "$WORK/preflight" <<'EOF' || die "preflight failed"
import sys
from pathlib import Path

src, workdir = sys.argv[1:]
sys.path.insert(0, f"{src}/tests")
import fastrelay._frames as frames  # noqa: E402
from relay_process import start_relay  # noqa: E402
from wsraw import RawClient, frame  # noqa: E402

assert frames.__file__.startswith(src + "/"), f"imported {frames.__file__}, not the sanitized build"
Path(workdir).mkdir()
relay = start_relay(Path(workdir))
try:
    maps = Path(f"/proc/{relay.pid}/maps").read_text()
    assert frames.__file__ in maps, f"relay pid {relay.pid} does not map {frames.__file__}"
    assert "libasan" in maps, f"relay pid {relay.pid} runs without the ASan runtime"
    a, b = RawClient(relay.port, "/pre"), RawClient(relay.port, "/pre")
    a.send(frame(0x1, b"sanitized"))
    assert b.recv_frame() == (True, 0x1, b"sanitized")
    a.close()
    b.close()
    status = relay.stop()
    assert status == 0, f"exit status {status}\n{relay.output()}"
finally:
    relay.kill()
print(f"  relay pid {relay.pid} mapped {frames.__file__} and libasan; round trip OK, exit 0")
EOF

    step "pytest under ASan + UBSan: ${*:-${TESTS[*]}}"
    local rc=0
    # --capture=sys: a report is written to file descriptor 2 by C code just
    # before the abort; fd-level capture would swallow it with the process.
    sanitized 2400 "$PY" -m pytest -p no:cacheprovider --capture=sys -q "${@:-${TESTS[@]}}" \
        || rc=$?

    step "relay stderr: any sanitizer report?"
    local reported
    reported="$(grep -l -E "$REPORT" "$logs"/* 2>/dev/null || true)"
    for log in $reported; do
        printf '\n--- %s ---\n' "$(basename "$log")" >&2
        cat "$log" >&2
    done
    echo "  $(find "$logs" -type f | wc -l) relays ran, $(echo "$reported" | grep -c . || true) reported"
    [ -z "$reported" ] || die "a relay printed a sanitizer report (above)"
    [ "$rc" -eq 0 ] || die "pytest exited $rc under the sanitizers"
}

run_fuzz() {
    local src="$WORK/fuzz-src"
    build fuzz "$src"
    local site="$WORK/atheris"
    if ! "$PY" -c "import atheris" 2>/dev/null; then
        step "install atheris $ATHERIS_VERSION into $site"
        timeout 300 "$PY" -m pip install --quiet --target "$site" "atheris==$ATHERIS_VERSION"
    fi
    local atheris_dir
    atheris_dir="$(PYTHONPATH="$site" "$PY" -c 'import atheris; print(atheris.path())')"
    [ -f "$atheris_dir/asan_with_fuzzer.so" ] || die "no asan_with_fuzzer.so in $atheris_dir"
    # gcc traces float compares too (-fsanitize-coverage=trace-cmp), which
    # libFuzzer has no hooks for: give them empty ones.
    cat >"$WORK/cmp_float.c" <<'EOF'
void __sanitizer_cov_trace_cmpf(float a, float b) { (void)a; (void)b; }
void __sanitizer_cov_trace_cmpd(double a, double b) { (void)a; (void)b; }
EOF
    gcc -shared -fPIC -O2 -o "$WORK/cmp_float.so" "$WORK/cmp_float.c"

    local artifacts="$REPO/artifacts/fuzz"
    mkdir -p "$artifacts"
    local args=("$@")
    [ "${#args[@]}" -gt 0 ] || args=("-max_total_time=$FUZZ_SECONDS")
    fuzzing() {  # COMMAND...: from the checkout (relative corpus and crash paths work),
        # importing the copy. Leaks are LSan's job in the test run; libFuzzer's
        # own leak check would stop at CPython's caches.
        env PYTHONPATH="$src:$site" PYTHONMALLOC=malloc \
            ASAN_OPTIONS="abort_on_error=1:detect_leaks=0" UBSAN_OPTIONS="$UBSAN_OPTS" \
            LD_PRELOAD="$atheris_dir/asan_with_fuzzer.so $WORK/cmp_float.so" "$@"
    }
    local module
    # From the harness's directory, as the harness imports (sys.path[0]).
    module="$(cd "$src/fuzz" && fuzzing "$PY" -c 'import fastrelay._frames as m; print(m.__file__)')"
    case "$module" in
        "$src"/*) echo "  fuzzing $module" ;;
        *) die "the fuzzer would import $module, not the sanitized build" ;;
    esac
    step "atheris on fuzz/fuzz_relay.py against the sanitized build: ${args[*]}"
    fuzzing "$PY" "$src/fuzz/fuzz_relay.py" -use_value_profile=1 -artifact_prefix="$artifacts/" \
        "${args[@]}" || die "the fuzzer stopped on a crash: see above and $artifacts/"
}

case "${1:-all}" in
    all)
        run_tests
        run_fuzz
        ;;
    tests)
        shift
        run_tests "$@"
        ;;
    fuzz)
        shift
        run_fuzz "$@"
        ;;
    *) die "usage: $0 [tests [pytest args] | fuzz [libFuzzer args]]" ;;
esac
