#!/usr/bin/env bash
# What a VM guest's halt polling does to kms's single calls (docs/PERFORMANCE.md, "What
# limits it"): alternates guest_halt_poll_ns off, 200 us, and off with a SCHED_IDLE busy
# loop per core, ROUNDS times, running the AES and ECDSA rows and a pipe ping-pong at each.
# Needs root and a guest whose cpuidle driver is haltpoll; restores the setting it found.
#
#     tests/bench/halt_polling.sh [ROUNDS] [KMS_BENCH]
set -euo pipefail
rounds=${1:-3}
bench=${2:-target/release/kms-bench}
knob=/sys/module/haltpoll/parameters/guest_halt_poll_ns
[[ -w $knob ]] || { echo "needs root and the haltpoll cpuidle driver ($knob)" >&2; exit 2; }
found=$(cat "$knob")
spinners=()
restore() {
  # The setting first: nothing after it may stop the trap before it is written back.
  echo "$found" >"$knob"
  if ((${#spinners[@]})); then kill "${spinners[@]}" 2>/dev/null || true; fi
}
trap restore EXIT
summary() {
  python3 -c 'import sys, json
print(" ".join("%s=%d/p99=%d" % (j["op"], j["ops_per_s"], j["p99_us"])
      for j in map(json.loads, sys.stdin) if j.get("op") != "journal-append"))'
}
for r in $(seq "$rounds"); do
  for mode in off poll spin; do
    case $mode in
      off) echo 0 >"$knob" ;;
      poll) echo 200000 >"$knob" ;;
      spin)
        echo 0 >"$knob"
        for _ in $(seq "$(nproc)"); do
          chrt -i 0 sh -c 'while :; do :; done' &
          spinners+=($!)
        done
        ;;
    esac
    # Assignments, so that a failing kms-bench ends the script (set -e, pipefail).
    wide=$("$bench" --json --seconds 3 --cases aes-enc-1k,ecdsa-sign | summary)
    deep=$("$bench" --json --seconds 3 --conns 1 --depth 32 --cases aes-enc-1k | summary)
    pipe=$(perf bench sched pipe -l 50000 2>&1 | grep usecs/op || echo 'perf not installed')
    echo "r$r $mode 16x1 $wide"
    echo "r$r $mode 1x32 $deep"
    echo "r$r $mode pipe $pipe"
    if ((${#spinners[@]})); then
      kill "${spinners[@]}" 2>/dev/null || true
      wait "${spinners[@]}" 2>/dev/null || true
      spinners=()
    fi
  done
done
