#!/usr/bin/env bash
# Coverage-guided fuzzing (libFuzzer, through libfuzzer-sys) of the parsers
# that outside bytes reach: fuzz/fuzz_targets/*.rs (fuzz/README.md).
#
#   scripts/fuzz.sh --smoke [SECONDS]        every target for SECONDS each (default 4)
#   scripts/fuzz.sh --seconds N [TARGET...]  longer runs (default: every target)
#   scripts/fuzz.sh --list                   the targets
#
# Built on the pinned stable toolchain: the coverage instrumentation is
# rustc's stable `-Cpasses=sancov-module` with LLVM's sanitizer-coverage
# options (what `cargo fuzz build -s none` passes); no nightly, no
# sanitizer (a panic aborts and is the crash). Debug assertions and
# overflow checks are on. Build outputs in <target>/fuzz (cargo's target
# directory, scripts/target-dir.sh), the corpus each run grows in
# <target>/fuzz/corpus/<target> (seeded from fuzz/corpus/<target>, which
# stays as committed), crashes in <target>/fuzz/artifacts/<target>/.
# Prints per target: executions, coverage (cov: edges, ft: features),
# corpus size, and any crash with its reproducer (`<binary> <file>` replays
# it). Exits 1 if a target crashed.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=""; seconds=4; only=()
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) mode=smoke; shift; if [ $# -gt 0 ] && [[ $1 =~ ^[0-9]+$ ]]; then seconds=$1; shift; fi ;;
    --seconds) mode=run; seconds=$2; shift 2 ;;
    --list) mode=list; shift ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    -*) echo "fuzz.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) only+=("$1"); shift ;;
  esac
done
[ -n "$mode" ] || { sed -n '2,21p' "$0"; exit 2; }

all=$(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^access-layer-fuzz$')
if [ "$mode" = list ]; then echo "$all"; exit 0; fi
targets=("${only[@]}")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets <<<"$all"
for t in "${targets[@]}"; do
  grep -qx "$t" <<<"$all" || { echo "fuzz.sh: no target $t (scripts/fuzz.sh --list)" >&2; exit 2; }
done

out="$(scripts/target-dir.sh)/fuzz"
host=$(rustc -vV | sed -n 's/^host: //p')
flags="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4"
flags+=" -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table"
flags+=" -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing"
echo "== fuzz: building ${#targets[@]} targets into $out (first build: a few minutes)"
bins=()
for t in "${targets[@]}"; do bins+=(--bin "$t"); done
# --target: the instrumentation reaches the targets' code, not build
# scripts and proc macros.
CARGO_TARGET_DIR="$out" RUSTFLAGS="$flags" \
  cargo build --release --locked --manifest-path fuzz/Cargo.toml --target "$host" "${bins[@]}"

failed=0
printf '%-14s %12s %8s %8s %8s  %s\n' target executions cov ft corpus result
for t in "${targets[@]}"; do
  bin="$out/$host/release/$t"
  corpus="$out/corpus/$t"; artifacts="$out/artifacts/$t/"
  mkdir -p "$corpus" "$artifacts" "fuzz/corpus/$t"
  # A log per run ($$): two runs at once (a smoke run beside a long one)
  # must not write into each other's.
  mkdir -p "$out/logs"
  log="$out/logs/$t-$$.log"
  set +e
  "$bin" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
    -print_final_stats=1 -artifact_prefix="$artifacts" "$corpus" "fuzz/corpus/$t" >"$log" 2>&1
  rc=$?
  set -e
  # The log may hold raw input bytes (a crash's): read it as text, and a
  # line that is not there is not an error.
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1 || true)
  stats=$(grep -aE '^#[0-9]+.* cov: ' "$log" | tail -1 || true)
  cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$stats")
  ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$stats")
  n=$(find "$corpus" -type f | wc -l)
  if [ $rc -eq 0 ]; then
    result=ok
  else
    failed=1
    crash=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1 || true)
    result="CRASH (exit $rc): reproduce with $bin ${crash:-<see $log>}"
  fi
  printf '%-14s %12s %8s %8s %8s  %s\n' "$t" "${execs:-?}" "${cov:-?}" "${ft:-?}" "$n" "$result"
  if [ $rc -ne 0 ]; then { grep -aE 'panicked|assertion|ERROR' "$log" || true; } | head -5 | sed 's/^/    /'; fi
done
exit $failed
