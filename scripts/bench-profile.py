#!/usr/bin/env python3
"""Run outbox-bench under system-wide CPU sampling and say, per phase, where the CPU went.

    scripts/bench-profile.py [--out DIR] [--freq HZ] [--bin PATH] -- all
    scripts/bench-profile.py --analyse DIR          # again, from an earlier run's files

The bench prints `outbox-bench: phase <name> at <s> s` on stderr when it is not on a
terminal: the library's phases start with `lib`, the baselines' with `raw-...`, and `setup`
(filling backlogs, restarting servers) is left out. A phase ends where the next one starts or
its case ends. The run is recorded with `perf record -e cpu-clock -a -g` (a software timer:
this VM has no hardware counters), so every figure comes from the very run whose table is
printed. For each phase name (all its passes together) this prints:

- the CPU share of each process group (share of all cores; `idle` is the idle task; `other
  jobs` is whatever else ran on the machine: compilers, tests, fuzzers), and
- inside the bench process: the hottest leaf symbols (self time) and the share of its
  samples whose stack holds a frame of each crate or C library (inclusive).

Writes DIR/run.md (the bench's table), DIR/run.json, DIR/run.err, DIR/perf.data and
DIR/profile.md (this report).
"""

import argparse
import collections
import os
import re
import subprocess
import sys

PHASE = re.compile(r"^outbox-bench: phase (.+) at ([0-9.]+) s$")
DONE = re.compile(r"^outbox-bench: (.+) done in [0-9.]+ s \(from ([0-9.]+) s to ([0-9.]+) s of the run\)$")
FAILED = re.compile(r"^outbox-bench: FAILED (.+)$")


def record(args, rest):
    os.makedirs(args.out, exist_ok=True)
    bin_path = args.bin or os.path.join(
        os.environ.get("CARGO_TARGET_DIR", "target"), "release", "outbox-bench")
    if not os.path.isfile(bin_path):
        sys.exit(f"bench-profile: no binary at {bin_path}: cargo build --release -p outbox-bench")
    cmd = ["perf", "record", "-q", "-e", "cpu-clock", "-F", str(args.freq), "-a", "-g",
           "-o", os.path.join(args.out, "perf.data"), "--", bin_path, *rest,
           "--json", os.path.join(args.out, "run.json")]
    with open(os.path.join(args.out, "run.md"), "w") as out, \
            open(os.path.join(args.out, "run.err"), "w") as err:
        return subprocess.run(cmd, stdout=out, stderr=err).returncode


def windows(err_path):
    """[(phase name, start s, end s)] from the bench's stderr, times relative to its start."""
    marks, ends = [], []
    for line in open(err_path):
        line = line.rstrip("\n")
        if m := PHASE.match(line):
            marks.append((float(m.group(2)), m.group(1)))
        elif m := DONE.match(line):
            ends.append(float(m.group(3)))
    stops = sorted([t for t, _ in marks] + ends)
    out = []
    for t, name in marks:
        later = [s for s in stops if s > t]
        if name != "setup" and later:
            out.append((name, t, later[0]))
    return out


_PROCESS = {}


def process_name(pid, comm):
    """The process's own name (its main thread's, from /proc while it still runs), else the
    sampled thread's name: threads such as tokio workers are named alike in many processes."""
    if pid not in _PROCESS:
        try:
            with open(f"/proc/{pid}/comm") as f:
                _PROCESS[pid] = f.read().strip()
        except OSError:
            _PROCESS[pid] = None
    return _PROCESS[pid] or comm


def group_of(comm, pid, bench_pid):
    if pid == bench_pid:
        return "bench"
    if comm == "swapper" or pid == 0:
        return "idle"
    comm = process_name(pid, comm)
    if comm.startswith("postgres") or comm == "postmaster":
        return "postgres"
    if "scheduler" in comm or comm.startswith(("beam", "erl", "dirty_")):
        return "rabbitmq"
    if comm.startswith(("moto", "python")):
        return "moto"
    if comm.startswith(("tansu", "calfkit")):
        return "kafka broker"
    # Everything else is another job on the machine: compilers, linkers, tests, fuzzers.
    return "other jobs"


def crate_of(sym):
    sym = sym.strip()
    if not sym or sym == "[unknown]":
        return None
    sym = re.sub(r"^<(.*?)( as .*)?>::", r"\1::", sym)
    if sym.startswith("sqlite3"):
        return "sqlite (C)"
    if sym.startswith("rd_kafka") or sym.startswith("rd_"):
        return "librdkafka (C)"
    if "::" in sym:
        return sym.split("::", 1)[0].lstrip("<&*")
    return None


def samples(perf_data):
    """Yield (time s, pid, comm, [symbols leaf first]) for every sample."""
    proc = subprocess.Popen(
        ["perf", "script", "-i", perf_data, "-F", "comm,pid,time,ip,sym", "--no-inline"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, errors="replace")
    head, stack = None, []
    for line in proc.stdout:
        if not line.strip():
            if head:
                yield (*head, stack)
            head, stack = None, []
        elif line[0] in " \t":
            parts = line.strip().split(None, 1)
            stack.append(re.sub(r"\+0x[0-9a-f]+$", "", parts[1].rsplit(" (", 1)[0]) if len(parts) > 1 else "")
        else:
            m = re.match(r"^\s*(.*?)\s+(\d+)\s+([0-9.]+):", line)
            if m:
                head = (float(m.group(3)), int(m.group(2)), m.group(1))
    if head:
        yield (*head, stack)
    proc.wait()


def analyse(out_dir, freq, cpus):
    wins = windows(os.path.join(out_dir, "run.err"))
    all_samples = list(samples(os.path.join(out_dir, "perf.data")))
    if not all_samples:
        sys.exit("bench-profile: no samples")
    t0 = min(s[0] for s in all_samples)
    bench_pid = next((s[1] for s in all_samples if s[2] == "outbox-bench"), None)
    names = list(dict.fromkeys(name for name, _, _ in wins))
    lines = ["# Profile per phase", "",
             f"perf record -e cpu-clock -F {freq} -a -g; {len(all_samples)} samples; "
             f"{cpus} CPUs; phases from the bench's stderr", ""]
    for name in names:
        spans = [(a, b) for n, a, b in wins if n == name]
        secs = sum(b - a for a, b in spans)
        groups = collections.Counter()
        leaf = collections.Counter()
        crates = collections.Counter()
        bench_n = 0
        for t, pid, comm, stack in all_samples:
            rel = t - t0
            if not any(a <= rel < b for a, b in spans):
                continue
            g = group_of(comm, pid, bench_pid)
            groups[g] += 1
            if g == "bench":
                bench_n += 1
                leaf[stack[0] if stack else "?"] += 1
                for c in {crate_of(f) for f in stack} - {None}:
                    crates[c] += 1
        total = max(freq * secs * cpus, 1)
        share = ", ".join(f"{g} {100 * n / total:.0f} %" for g, n in groups.most_common())
        lines += [f"## {name}", "", f"{len(spans)} window(s), {secs:.1f} s; CPU: {share}", ""]
        if bench_n:
            top = "; ".join(f"`{s[:70]}` {100 * n / bench_n:.0f} %" for s, n in leaf.most_common(8))
            inc = "; ".join(f"{c} {100 * n / bench_n:.0f} %" for c, n in crates.most_common(10))
            lines += [f"- bench, self: {top}", f"- bench, inclusive by crate: {inc}", ""]
    report = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "profile.md"), "w") as f:
        f.write(report)
    print(report)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="/tmp/bench-profile")
    parser.add_argument("--freq", type=int, default=199)
    parser.add_argument("--bin")
    parser.add_argument("--analyse", metavar="DIR", help="only analyse an earlier run in DIR")
    args, rest = parser.parse_known_args()
    rest = [a for a in rest if a != "--"]
    cpus = os.cpu_count() or 1
    if args.analyse:
        analyse(args.analyse, args.freq, cpus)
        return 0
    code = record(args, rest)
    analyse(args.out, args.freq, cpus)
    print(f"bench exit code {code}; table in {args.out}/run.md", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
