"""A Python-backend stub that died is noticed and its model restarted (unload, then load).

Triton 2.51's Python backend does not replace a stub process that was killed: its model stays
READY while every request to it fails ("Stub process ... is not healthy"). ``serve`` keeps a
:class:`StubWatch` on its server: it knows each stub by pid and by the model version it runs
(the stub's command line names ``REPO/<model>/<version>/model.py``). A stub gone while the
repository index still calls that version READY died (a version unloaded by a hot-swap is no
longer READY when its stub exits): the model is unloaded, so readiness turns false and clients
are told at once, then loaded again, with the server's control secret.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

from prism_deploy.serving.server import TritonServer, group_members

RESTART_TIMEOUT_S = 120.0


def stub_model(pid: int) -> tuple[str, str] | None:
    """(model, version) a Python-backend stub serves, from its command line."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if len(argv) > 1 and argv[0].endswith(b"triton_python_backend_stub"):
        script = Path(argv[1].decode(errors="replace"))
        return script.parent.parent.name, script.parent.name
    return None


class StubWatch:
    def __init__(self, server: TritonServer, log: Any = None) -> None:
        self.server = server
        self.log = log
        self.known = self.stubs()
        self.restarts: list[dict[str, Any]] = []
        self.pending: set[str] = set()  # restarts that failed: tried again at the next look

    def stubs(self) -> dict[int, tuple[str, str]]:
        if self.server.proc is None:
            return {}
        found = {pid: stub_model(pid) for pid in group_members(self.server.proc.pid)}
        return {pid: mv for pid, mv in found.items() if mv is not None}

    def dead(self) -> set[str]:
        """Models whose stub died since the last look (and whose version still counts as READY)."""
        now = self.stubs()
        gone = {mv for pid, mv in self.known.items() if pid not in now}
        self.known = now
        if not gone:
            return set()
        ready = self.ready_versions()
        return {model for model, version in gone if (model, version) in ready}

    def ready_versions(self) -> set[tuple[str, str]]:
        import tritonclient.http as httpclient

        client = httpclient.InferenceServerClient(self.server.http_url, connection_timeout=10, network_timeout=30)
        try:
            index = client.get_model_repository_index(headers=self.server.control_headers)
        finally:
            client.close()
        return {(str(m.get("name")), str(m.get("version"))) for m in index if m.get("state") == "READY"}

    def restart(self, model: str) -> dict[str, Any]:
        """Unload ``model`` (its dependents stay), load it again, wait until it is ready."""
        import tritonclient.http as httpclient

        started = time.monotonic()
        client = httpclient.InferenceServerClient(
            self.server.http_url, connection_timeout=10, network_timeout=RESTART_TIMEOUT_S
        )
        headers = self.server.control_headers
        outcome: dict[str, Any] = {"model": model, "ok": False}
        try:
            deadline = started + RESTART_TIMEOUT_S
            with contextlib.suppress(Exception):  # an unload of a broken model may report an error: load anyway
                client.unload_model(model, headers=headers)
            # out of service (readiness false) until the new process runs: a load right after the
            # unload request would otherwise replace the model while it still counts as ready
            while time.monotonic() < deadline and client.is_model_ready(model):
                time.sleep(0.05)
            outcome["unloaded_seconds"] = round(time.monotonic() - started, 3)
            client.load_model(model, headers=headers)
            while time.monotonic() < deadline and not client.is_model_ready(model):
                time.sleep(0.1)
            outcome["ok"] = bool(client.is_model_ready(model))
        except Exception as exc:  # reported, and tried again at the next look
            outcome["error"] = " ".join(str(exc).split())[:300]
        finally:
            client.close()
        outcome["seconds"] = round(time.monotonic() - started, 3)
        self.known = self.stubs()
        self.restarts.append(outcome)
        return outcome

    def check(self) -> list[dict[str, Any]]:
        """Restart every model whose stub died; what was done, one entry per model."""
        try:
            dead = self.dead()
        except Exception:  # the server is not answering its index: nothing to decide now
            return []
        done = []
        for model in sorted(dead | self.pending):
            outcome = self.restart(model)
            (self.pending.discard if outcome["ok"] else self.pending.add)(model)
            if self.log is not None:
                self.log(
                    f"{model}: its backend process died; restarted in {outcome['seconds']} s"
                    if outcome["ok"]
                    else f"{model}: its backend process died; restart failed ({outcome.get('error', 'not ready')})"
                )
            done.append(outcome)
        return done
