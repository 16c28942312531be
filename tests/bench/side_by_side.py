#!/usr/bin/env python3
"""Side-by-side measurement of two (or more) kmsd builds under the same kms-bench client.

On a shared or virtual machine, two runs of the same build differ by 10-15 % in ops/s, so a
change is judged by alternating the old and the new daemon, several rounds, and comparing
medians -- and by the daemon's CPU per operation by thread role, which moves much less than
throughput. This is the script behind "side by side" in docs/PERFORMANCE.md.

    tests/bench/side_by_side.py --bench target/release/kms-bench \\
        --rounds 5 --cases ecdsa-sign,aes-enc-1k OLD_KMSD NEW_KMSD [-- KMS-BENCH ARGS]

Each round starts every daemon in turn on a fresh temporary directory, runs
`kms-bench --socket S --json --seconds 3 --cases CASES [ARGS]` against it, and stops it.
Prints one line per run, then the medians per daemon and case. Python 3 standard library.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def run_once(kmsd, bench, cases, extra):
    with tempfile.TemporaryDirectory(prefix="kms-sbs-") as d:
        sock = os.path.join(d, "kms.sock")
        daemon = subprocess.Popen(
            [kmsd, "--socket", sock, "--data-dir", os.path.join(d, "data")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            for _ in range(100):
                if os.path.exists(sock):
                    break
                time.sleep(0.05)
            else:
                raise RuntimeError(f"{kmsd} did not create its socket")
            out = subprocess.run(
                [bench, "--socket", sock, "--json", "--seconds", "3", "--cases", cases]
                + extra,
                check=True,
                capture_output=True,
                text=True,
            ).stdout
        finally:
            daemon.terminate()
            daemon.wait(timeout=30)
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return [r for r in rows if r.get("op") != "journal-append"]


def fmt(label, ops, p99, cpu, client):
    roles = " ".join(f"{k} {v:6.1f}" for k, v in cpu.items())
    return f"{label:<40} {ops:>9.0f} ops/s  p99 {p99:>6.0f} us  cpu/op {roles}  client {client:5.1f}"


def main():
    argv = sys.argv[1:]
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bench", default="target/release/kms-bench")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cases", default="aes-enc-1k,ecdsa-sign,rsa-sign")
    p.add_argument("kmsd", nargs="+", help="kmsd binaries to alternate")
    a = p.parse_args(argv)

    results = {}  # (kmsd, case) -> list of rows
    for r in range(1, a.rounds + 1):
        for k in a.kmsd:
            for row in run_once(k, a.bench, a.cases, extra):
                results.setdefault((k, row["op"]), []).append(row)
                cpu = row.get("daemon_cpu_us_per_op", {})
                cpu = {x: cpu.get(x, 0.0) for x in ("reactor", "crypto", "writer")}
                print(
                    fmt(f"r{r} {k} {row['op']}", row["ops_per_s"],
                        row["p99_us"], cpu, row.get("client_cpu_us_per_op", 0.0)),
                    flush=True,
                )
    print(f"\nmedians of {a.rounds} rounds")
    for (k, case), rows in sorted(results.items(), key=lambda kv: (kv[0][1], a.kmsd.index(kv[0][0]))):
        med = lambda f: statistics.median(f(x) for x in rows)
        cpu = {
            x: med(lambda row: row.get("daemon_cpu_us_per_op", {}).get(x, 0.0))
            for x in ("reactor", "crypto", "writer")
        }
        print(
            fmt(f"{k} {case}", med(lambda x: x["ops_per_s"]),
                med(lambda x: x["p99_us"]), cpu, med(lambda x: x.get("client_cpu_us_per_op", 0.0)))
        )


if __name__ == "__main__":
    main()
