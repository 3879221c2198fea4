"""``serve --env`` on an environment that lacks what the backend imports: one line saying what
to install there, not the traceback of the first failed import."""

from __future__ import annotations

import subprocess
import sys

import pytest

from prism_deploy.core.errors import PrismInputError
from prism_deploy.serving.env import check_env


def test_an_environment_without_the_backend_packages_says_what_it_needs(tmp_path):
    bare = tmp_path / "bare-env"  # no system site packages: what the base interpreter has does not count
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120)
    with pytest.raises(PrismInputError) as caught:
        check_env(bare, tmp_path, onnxruntime_version="1.2.3")
    message = str(caught.value)
    assert str(bare) in message and "lacks numpy and onnxruntime" in message
    assert "pip install 'numpy<2' onnxruntime==1.2.3" in message and "Traceback" not in message


def test_the_temporary_server_log_goes_when_the_server_stops_cleanly(tmp_path, monkeypatch):
    """``serve`` without --log writes Triton's log to a temporary file: removed on a clean stop,
    kept when the server failed (the error message names it)."""
    from prism_deploy.serving.server import TritonServer

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    for exit_code, kept in ((0, False), (3, True)):
        server = TritonServer(repo=tmp_path, env=None, http_port=1, grpc_port=2, metrics_port=3)  # type: ignore[arg-type]
        monkeypatch.setattr(
            server, "command", lambda code=exit_code: [sys.executable, "-c", f"raise SystemExit({code})"]
        )
        monkeypatch.setattr(server, "environment", lambda: None)
        server.start()
        log = server.log_path
        assert log is not None and log.parent == tmp_path and log.exists()
        server.wait(30)
        assert server.stop() == exit_code
        assert log.exists() == kept
