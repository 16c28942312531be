#!/bin/bash
# How long another account's RSA signature waits while one account floods the crypto pool
# with RSA decrypt batches (docs/PERFORMANCE.md, session 8: the per-account pool share).
#
#   tests/bench/pool_fairness.sh [KMSD] [KMSCTL]      (as root; needs the kmstest account
#                                                      and kmsclients group of .ci/install-deps)
#
# Starts KMSD on a temporary directory, creates two RSA-2048 keys, lets kmstest sign with
# one, starts 8 `kmsctl decrypt --batch` processes (root) of 8,192 ciphertexts each on the
# other, and after 2 s times five `kmsctl sign` runs as kmstest (process start included).
set -u
KMSD=${1:-target/release/kmsd}
CTL=${2:-target/release/kmsctl}
d=$(mktemp -d)
chmod 755 "$d"
"$KMSD" --socket "$d/s" --data-dir "$d/data" --socket-group kmsclients >/dev/null 2>&1 &
daemon=$!
for _ in $(seq 50); do [ -S "$d/s" ] && break; sleep 0.1; done
c() { "$CTL" --socket "$d/s" "$@"; }
c create bulk --type rsa2048 >/dev/null
c create victim --type rsa2048 >/dev/null
c grant key-user --user kmstest --key victim >/dev/null
ct=$(printf x | c encrypt bulk)
yes "$ct" | head -8192 >"$d/cts"
flood=()
for _ in $(seq 8); do
  c decrypt bulk --batch --in "$d/cts" >/dev/null 2>&1 &
  flood+=($!)
done
sleep 2
for i in 1 2 3 4 5; do
  start=$(date +%s%N)
  printf msg | setpriv --reuid=kmstest --regid=kmstest --init-groups \
    "$CTL" --socket "$d/s" sign victim >/dev/null || echo "sign $i failed"
  end=$(date +%s%N)
  echo "sign $i by kmstest: $(((end - start) / 1000000)) ms"
done
kill "${flood[@]}" 2>/dev/null
kill "$daemon"
wait 2>/dev/null
rm -rf "$d"
