#!/usr/bin/env python
"""Plant plausible bugs in the kernel source, one at a time, and check the host tests catch each.

    python tools/kernel_mutants.py      # about a minute on 2 cores; exit 1 if a bug goes unnoticed

Each mutant is a copy of plugins/ with one edit to tile_dispatch.cu, run through
tests/kernel/test_host.py on the CPU (PRISM_DEPLOY_PLUGINS points the harness at the copy). The
tests that plant their own bugs, and the slow property and benchmark-pipe tests, are left out.
A mutant marked equivalent changes nothing the contract promises (it reads one more padding
element inside a 16-byte piece the original reads in part): it is expected to survive.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNEL = "tile_dispatch/tile_dispatch.cu"

# (name, original text, mutated text, equivalent)
MUTANTS = [
    (
        "kvalid off by one",
        "const int kvalid = min(TC, in_dim - c * TC);",
        "const int kvalid = min(TC, in_dim - c * TC) - 1;",
        False,
    ),
    ("vector load one past kvalid", "if (col0 + VEC <= kvalid) {", "if (col0 + VEC <= kvalid + 1) {", True),
    (
        "lane mapping",
        "const int col0 = ((seg * SEG_SLOTS + i) * LPR + li) * VEC;\n#pragma unroll\n                                for",
        "const int col0 = ((seg * SEG_SLOTS + i) * LPR + (li ^ 1)) * VEC;\n#pragma unroll\n                                for",
        False,
    ),
    ("int8 scale dropped", "acc[j] = fmaf(gk, d * scale, acc[j]);", "acc[j] = fmaf(gk, d, acc[j]);", False),
    (
        "group reduction too short",
        "for (int o = LPR / 2; o > 0; o >>= 1)",
        "for (int o = LPR / 4; o > 0; o >>= 1)",
        False,
    ),
    ("hand-off from the wrong group", "(k % GROUPS) * LPR);", "((k + 1) % GROUPS) * LPR);", False),
    ("column list drops the last c", "if (c < C && c * TC < in_dim) {", "if (c < C - 1 && c * TC < in_dim) {", False),
    (
        "batch stride",
        "for (int base = 0; base < nsel; base += BATCH) {",
        "for (int base = 0; base < nsel; base += BATCH + 1) {",
        False,
    ),
    ("softmax without its max", "if (sel) part += expf(s[i] - smax);", "if (sel) part += expf(s[i]);", False),
    (
        "rows of a warp",
        "const int local_row = slab_row0 + i * WARPS + warp;",
        "const int local_row = slab_row0 + i + warp;",
        False,
    ),
    (
        "token chunk offset",
        "const hidden_t* x = hidden + (size_t)(t0 + 32 * j + b) * in_dim;",
        "const hidden_t* x = hidden + (size_t)(32 * j + b) * in_dim;",
        False,
    ),
    (
        "segments overwrite",
        "                            dot[j] += d;",
        "                            dot[j] = d;",
        False,
    ),
    (
        "tie break",
        "const bool sel = kw > tau || (kw == tau && w <= cutoff);",
        "const bool sel = kw > tau || (kw == tau && w < cutoff);",
        False,
    ),
    ("routing stops too early", "if (n == TOP_K) {", "if (n >= TOP_K) {", False),
    ("routing minimum misses tau", "key[i] >= tau && key[i] < lowest", "key[i] > tau && key[i] < lowest", False),
]
SELECT = (
    "not property and not benchmark_pipe and not wrong_tie and not divergent and not shared_memory and not grid_short"
)


def main() -> int:
    source = (ROOT / "plugins" / KERNEL).read_text()
    survivors = 0
    with tempfile.TemporaryDirectory(prefix="kernel-mutants-") as tmp:
        print(f"{'mutant':32} {'result':8} tests")
        for name, old, new, equivalent in MUTANTS:
            if source.count(old) != 1:
                print(f"error: the text of mutant {name!r} is not once in {KERNEL}: update this list", file=sys.stderr)
                return 2
            plugins = Path(tmp) / name.replace(" ", "_")
            shutil.copytree(ROOT / "plugins", plugins)
            (plugins / KERNEL).write_text(source.replace(old, new))
            env = dict(os.environ, PRISM_DEPLOY_PLUGINS=str(plugins), PRISM_DEPLOY_CACHE=str(Path(tmp) / "cache"))
            run = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pytest",
                    "-q",
                    "-x",
                    "-p",
                    "no:cacheprovider",
                    "tests/kernel/test_host.py",
                    "-k",
                    SELECT,
                ],
                capture_output=True,
                text=True,
                env=env,
                cwd=ROOT,
            )
            caught = run.returncode != 0
            summary = next((ln for ln in reversed(run.stdout.splitlines()) if " in " in ln), "").strip("= ")
            result = "caught" if caught else ("survived (equivalent)" if equivalent else "SURVIVED")
            survivors += not caught and not equivalent
            print(f"{name:32} {result:8} {summary}")
    print(f"{survivors} non-equivalent mutants survived" if survivors else "every non-equivalent mutant was caught")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
