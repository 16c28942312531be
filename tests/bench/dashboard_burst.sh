#!/usr/bin/env bash
# Two dashboards through one burst of events (docs/PERFORMANCE.md, "The dashboard under a
# burst of events"): starts kmsd on DATA_DIR (a store made by `kms-bench --scale 100000
# --data-dir DATA_DIR`), opens OLD_TUI and NEW_TUI side by side in tmux, runs a 10 s
# `kms-bench --cases rotate` burst against the daemon, and prints each dashboard's CPU
# during the burst and how long after it each falls idle (no CPU used for 0.5 s).
#
#     tests/bench/dashboard_burst.sh OLD_TUI NEW_TUI DATA_DIR [BIN_DIR]
set -euo pipefail
old=$(realpath "$1")
new=$(realpath "$2")
data=$3
bin=$(realpath "${4:-target/release}")
work=$(mktemp -d)
socket=$work/s.sock
cp "$old" "$work/old-tui"
cp "$new" "$work/new-tui"
"$bin/kmsd" --socket "$socket" --data-dir "$data" >"$work/kmsd.log" 2>&1 &
kmsd=$!
cleanup() {
  tmux kill-session -t burst-old 2>/dev/null || true
  tmux kill-session -t burst-new 2>/dev/null || true
  kill "$kmsd" 2>/dev/null || true
  wait "$kmsd" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
for _ in $(seq 100); do [[ -S $socket ]] && break; sleep 0.2; done
tmux new-session -d -s burst-old -x 120 -y 40 "$work/old-tui --socket $socket"
tmux new-session -d -s burst-new -x 120 -y 40 "$work/new-tui --socket $socket"
sleep 6 # both have read the whole list
old_pid=$(pgrep -x old-tui)
new_pid=$(pgrep -x new-tui)
cpu() { awk '{printf "%.2f", ($14 + $15) / 100}' "/proc/$1/stat"; }
o0=$(cpu "$old_pid")
n0=$(cpu "$new_pid")
"$bin/kms-bench" --socket "$socket" --cases rotate --seconds 10 --conns 16 --json >"$work/bench.json"
ended=$(date +%s.%N)
echo "burst: $(grep -o '"ops_per_s":[0-9.]*' "$work/bench.json" | head -1)"
echo "CPU during the burst: old $(echo "$(cpu "$old_pid") - $o0" | bc) s, new $(echo "$(cpu "$new_pid") - $n0" | bc) s"
old_idle="" new_idle=""
last_o=$(cpu "$old_pid") last_n=$(cpu "$new_pid")
for _ in $(seq 240); do
  sleep 0.5
  co=$(cpu "$old_pid") cn=$(cpu "$new_pid")
  since=$(echo "$(date +%s.%N) - $ended" | bc)
  [[ -z $old_idle && $co == "$last_o" ]] && old_idle=$since
  [[ -z $new_idle && $cn == "$last_n" ]] && new_idle=$since
  last_o=$co last_n=$cn
  [[ -n $old_idle && -n $new_idle ]] && break
done
echo "idle after the burst: old ${old_idle:-not within 120} s, new ${new_idle:-not within 120} s"
echo "total CPU: old $(cpu "$old_pid") s, new $(cpu "$new_pid") s; RSS: old $(ps -o rss= -p "$old_pid") KiB, new $(ps -o rss= -p "$new_pid") KiB"
