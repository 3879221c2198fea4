"""What a new user reads: the README names every command, and no committed file names a folder
of the machines this was written on (the repository is all a reader has)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from prism_deploy.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = re.compile(r"/work/|/tmp/pytest|\.\./shared")


def test_the_readme_names_every_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = build_parser()._commands  # type: ignore[attr-defined]
    missing = []
    for name in commands:
        # `triton-update` is also spelled `triton update`, `parity-chain` is `parity --chain`
        spellings = {name, name.replace("-", " ", 1), name.replace("-", " --", 1)}
        if not any(f"`{s}" in readme or f"`prism-deploy {s}" in readme for s in spellings):
            missing.append(name)
    assert not missing, f"README.md's command list does not mention {missing}"


def test_no_committed_file_names_a_path_outside_the_repository():
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    found = []
    for name in listed.stdout.decode().split("\0"):
        path = ROOT / name
        if not name or not path.is_file() or path.stat().st_size > 4 << 20:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary: weights, images
        found += [
            f"{name}:{i}"
            for i, line in enumerate(text.splitlines(), 1)
            if OUTSIDE.search(line) and name != "tests/test_repository_text.py"
        ]
    assert not found, f"paths outside the repository in {found[:10]}"
