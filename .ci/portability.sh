#!/usr/bin/env bash
# The compiled module where MSG_NOSIGNAL and MSG_DONTWAIT are not defined
# (macOS under strict POSIX headers, some BSDs), proven on Linux: a copy of
# the tree is built with the -D switches that make fastrelay/_compat.h
# undefine both macros first, so it takes the fallbacks (flags 0) exactly as
# such a platform would. The build must say so (the header's #pragma
# message), then a few tests run against it: relay round trips through real
# relay processes, the sendmsg paths (partial writes, EPIPE on a vanished
# peer) and the relay ignoring SIGPIPE, which the MSG_NOSIGNAL fallback
# relies on.
#
#   bash .ci/portability.sh
#
# The normal in-place build is not touched. Takes about 30 s on 2 cores.
set -euo pipefail

cd "$(dirname "$0")/.."
PY="$("${PYTHON:-python}" -c 'import sys; print(sys.executable)')"
START=$SECONDS
die() { printf '[portability] FAIL: %s\n' "$*" >&2; exit 1; }

WORK="$(mktemp -d "${TMPDIR:-/tmp}/fastrelay-portability.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
SRC="$WORK/src"
mkdir -p "$SRC"
git ls-files -z --cached --others --exclude-standard \
    | tar --null --files-from=- --ignore-failed-read -cf - 2>/dev/null \
    | tar -xf - -C "$SRC"
[ -f "$SRC/setup.py" ] || die "could not copy the working tree"

echo "[portability] build with MSG_NOSIGNAL and MSG_DONTWAIT undefined"
(cd "$SRC" && CFLAGS="${CFLAGS:-} -DFASTRELAY_ASSUME_NO_MSG_NOSIGNAL -DFASTRELAY_ASSUME_NO_MSG_DONTWAIT" \
    timeout 600 "$PY" setup.py build_ext --inplace >"$WORK/build.log" 2>&1) \
    || { tail -n 40 "$WORK/build.log" >&2; die "the build failed"; }
# The header announces each fallback it takes; both must show.
for flag in MSG_NOSIGNAL MSG_DONTWAIT; do
    grep -q "fastrelay: no $flag here" "$WORK/build.log" \
        || die "the build did not take the $flag fallback (no note from _compat.h)"
done
grep -h "note: .*fastrelay: no MSG_" "$WORK/build.log" | sort -u | sed "s/^/  /"

# The relays the tests start import from PYTHONPATH, as this does from a
# directory that holds no fastrelay package.
MODULE="$(cd "$WORK" && PYTHONPATH="$SRC" "$PY" -c 'import fastrelay._frames as m; print(m.__file__)')"
case "$MODULE" in
    "$SRC"/*) echo "  testing $MODULE" ;;
    *) die "the tests would import $MODULE, not the fallback build" ;;
esac

(cd "$SRC" && PYTHONPATH="$SRC" timeout 600 "$PY" -m pytest -p no:cacheprovider -q \
    tests/test_portability.py tests/test_relay_e2e.py tests/test_memory_safety.py) \
    || die "tests failed against the build without MSG_NOSIGNAL / MSG_DONTWAIT"
printf '[portability] OK in %ds\n' "$((SECONDS - START))"
