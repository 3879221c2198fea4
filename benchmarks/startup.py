"""Start-up time of the CLI: whole processes, as a user meets them.

Times ``prism-deploy --help`` and ``prism-deploy inspect examples/demo-adapter.safetensors``
(and, for comparison, ``python -c pass`` and ``python -c "import torch"``) as fresh processes,
``--runs`` times each after one warm-up run, interleaved so that a change of load hits every
command alike, and records minimum, median and maximum wall seconds with the machine.

    python benchmarks/startup.py --json benchmarks/results/DATE-cpu-startup.json [--compare OTHER_CHECKOUT]

``--compare`` times the same two prism-deploy commands from another checkout of the project
(e.g. an earlier commit in a git worktree) in the same run, interleaved with this one.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prism_deploy.bench.machine import describe_machine, load_average  # noqa: E402

COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "prism-deploy --help": [sys.executable, "-m", "prism_deploy", "--help"],
    "prism-deploy inspect example": [
        sys.executable,
        "-m",
        "prism_deploy",
        "inspect",
        "examples/demo-adapter.safetensors",
    ],  # each runs in its checkout
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10, help="timed runs of each command (default 10)")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--compare", type=Path, metavar="CHECKOUT", help="another checkout to time side by side")
    args = ap.parse_args()
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT)}
    # ``python -m`` puts the working folder first on sys.path: each command runs in its own checkout
    commands = {name: (argv, env, ROOT) for name, argv in COMMANDS.items()}
    if args.compare is not None:
        other = {**env, "PYTHONPATH": str(args.compare.resolve())}
        rev = subprocess.run(
            ["git", "-C", str(args.compare), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip() or str(args.compare)
        for name in ("prism-deploy --help", "prism-deploy inspect example"):
            commands[f"{name} [{rev}]"] = (COMMANDS[name], other, args.compare.resolve())
    started = dt.datetime.now(dt.timezone.utc)
    load_start = load_average()
    samples: dict[str, list[float]] = {name: [] for name in commands}
    for i in range(args.runs + 1):
        for name, (argv, cmd_env, cwd) in commands.items():
            t = time.perf_counter()
            out = subprocess.run(argv, cwd=cwd, env=cmd_env, capture_output=True)
            seconds = time.perf_counter() - t
            if out.returncode != 0:
                raise SystemExit(f"error: {name} exited {out.returncode}: {out.stderr.decode()[-300:]}")
            if i:  # the first round warms the file cache
                samples[name].append(seconds)
    result = {
        "schema": "prism-deploy-startup/1",
        "started_utc": started.isoformat(timespec="seconds"),
        "machine": {**describe_machine(), "load_average_start": load_start, "load_average_end": load_average()},
        "command": " ".join(["python benchmarks/startup.py", *sys.argv[1:]]),
        # paths relative to this checkout: a committed result names no machine's folders
        "commands": {
            name: {
                "argv": commands[name][0][1:],
                "pythonpath": os.path.relpath(commands[name][1]["PYTHONPATH"], ROOT),
                "runs": len(s),
                "min_s": min(s),
                "median_s": statistics.median(s),
                "max_s": max(s),
            }
            for name, s in samples.items()
        },
    }
    for name, r in result["commands"].items():
        print(
            f"{name:32s} median {r['median_s']:.3f} s  (min {r['min_s']:.3f}, max {r['max_s']:.3f}, {r['runs']} runs)"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
