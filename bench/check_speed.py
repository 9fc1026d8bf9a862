"""How fast `apf-emu check` reads and checks logs: lines per second over at least a million real log lines.

A short real run's logs are replicated under distinct VM ids (with shifted mono_ns) until the target is reached,
so the checker sees realistic event mixes and every copy is itself a clean run. Usage:

    .venv/bin/python bench/check_speed.py [--lines 1000000] [--json]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]


def make_logs(work: Path, target_lines: int) -> int:
    seed_dir = work / "seed"
    subprocess.run([sys.executable, "-m", "apf_emu", "run", "--vcpus", "2", "--duration", "5", "--log-dir",
                    str(seed_dir)], cwd=ROOT, check=True, capture_output=True)
    files = {f.name: [orjson.loads(line) for line in f.read_bytes().splitlines() if line.strip()]
             for f in seed_dir.glob("*.jsonl")}
    per_copy = sum(len(v) for v in files.values())
    span = max(e["mono_ns"] for v in files.values() for e in v) - min(e["mono_ns"] for v in files.values() for e in v)
    out = work / "logs"
    out.mkdir()
    copies = -(-target_lines // per_copy)
    for i in range(copies):
        for name, events in files.items():
            with open(out / f"copy{i}-{name}", "wb") as f:
                for ev in events:
                    ev2 = dict(ev, vm=f"{ev['vm']}-{i}", mono_ns=ev["mono_ns"] + i * (span + 1))
                    f.write(orjson.dumps(ev2) + b"\n")
    return copies * per_copy


def measure(target_lines: int = 1_000_000) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="apf-bench-") as tmp:
        work = Path(tmp)
        lines = make_logs(work, target_lines)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "apf_emu", "check", str(work / "logs")], cwd=ROOT,
                              capture_output=True, text=True)
        seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"check found problems in replicated clean logs:\n{proc.stdout[-2000:]}{proc.stderr}")
    return {"lines": lines, "seconds": round(seconds, 2), "check_lines_per_s": round(lines / seconds)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lines", type=int, default=1_000_000)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    result = measure(args.lines)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"apf-emu check: {result['lines']} lines in {result['seconds']} s = "
              f"{result['check_lines_per_s']} lines/s")


if __name__ == "__main__":
    main()
