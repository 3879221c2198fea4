"""Hot-swap: a retrained adapter becomes the next version of the served adapter model.

``prism-deploy triton update REPO --adapter NEW.safetensors``:

1. refuses a new adapter whose ``in_dim``/``out_dim`` differ from the served one, unless
   ``--allow-shape-change`` (and never inside a chain, whose neighbours fix the widths);
2. builds it through the project's builder with the served version's configuration (target,
   precision, profile, layout, plugin), so the parity gate applies: a failing build exits 1
   and nothing is written;
3. writes ``REPO/<model>/<N+1>/`` atomically (filled under a staging name, then renamed);
4. if a server runs on the repository (``--url``, else the ``.prism-serve.json`` that ``serve``
   writes, which also holds the secret the model-control API requires), asks it to load the
   model again through the model-control API (explicit mode).
   With ``version_policy { latest { num_versions: 1 } }`` Triton loads version N+1, moves new
   requests to it, and unloads version N once the requests it holds have finished; this call
   waits (bounded) until version N is no longer ready, and reports both times.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prism_deploy.core.errors import PrismInputError, brief
from prism_deploy.serving import repository as repo_mod
from prism_deploy.serving import triton_config as cfg
from prism_deploy.serving.server import SECRET_HEADER, read_state
from prism_deploy.serving.stage_runtime import inspect_stage

UNLOAD_WAIT_S = 120.0
UPDATE_LOCK = ".prism-update.lock"  # in the repository folder; Triton ignores files there


def versions_of(model_dir: Path) -> list[int]:
    return sorted(
        int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit() and not p.name.startswith("0")
    )


def server_endpoint(repo: Path, url: str | None) -> tuple[str | None, dict[str, str]]:
    """``url`` if given, else the HTTP endpoint of a ``serve`` still running on ``repo``; with the
    header carrying the secret that ``serve`` recorded for ``repo`` (none when it recorded none)."""
    state = read_state(repo) or {}
    headers = {SECRET_HEADER: str(state["secret"])} if state.get("secret") else {}
    if url:
        return url, headers
    return (str(state["http"]) if state.get("http") else None), headers


def update_adapter(
    repo: str | os.PathLike[str],
    adapter: str | os.PathLike[str],
    *,
    build: Callable[[Any], Any],
    model: str | None = None,
    allow_shape_change: bool = False,
    url: str | None = None,
    load: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """``build(BuildRequest) -> BuildResult`` is the caller's: the CLI passes the builder with its
    parity check (this layer does not import the parity layer), and ``update_adapter`` refuses a
    result that was not checked."""
    from prism_deploy.core.fsutil import folder_lock

    root = Path(repo)
    repo_mod.read_manifest(root)  # not a repository: said before waiting for its lock
    # one writer of the repository at a time: the manifest is read, the version chosen and the
    # manifest written again under the lock, so a concurrent update of another model is kept
    with folder_lock(root, UPDATE_LOCK, log):
        report = _add_adapter_version(
            root, repo, adapter, build=build, model=model, allow_shape_change=allow_shape_change
        )
    endpoint, headers = server_endpoint(root, url)
    if load and endpoint is not None:
        report["server"] = swap(endpoint, report["model"], report["version"], headers=headers)
    return report


def _add_adapter_version(
    root: Path,
    repo: str | os.PathLike[str],
    adapter: str | os.PathLike[str],
    *,
    build: Callable[[Any], Any],
    model: str | None,
    allow_shape_change: bool,
) -> dict[str, Any]:
    from prism_deploy.builder import BuildRequest, Profile
    from prism_deploy.format import read_adapter_config

    manifest = repo_mod.read_manifest(root)
    adapters = sorted(n for n, r in manifest["models"].items() if r.get("kind") == "adapter")
    if model is None:
        if len(adapters) != 1:
            raise PrismInputError(f"{repo}: adapter models {', '.join(adapters) or 'none'}; name one with --model")
        model = adapters[0]
    if model not in adapters:
        raise PrismInputError(f"--model {model}: not an adapter model of {repo} ({', '.join(adapters) or 'none'})")
    record = manifest["models"][model]
    new_path = Path(adapter)
    if not new_path.is_file():
        raise PrismInputError(f"{adapter}: no such adapter file")
    new_config = read_adapter_config(new_path)
    served_in, served_out = record["inputs"][0]["dims"][-1], record["outputs"][0]["dims"][-1]
    shape_changed = (new_config.in_dim, new_config.out_dim) != (served_in, served_out)
    if shape_changed:
        what = f"{new_config.in_dim} -> {new_config.out_dim}, the served {model} is {served_in} -> {served_out}"
        if model in manifest.get("chain", []):
            raise PrismInputError(f"{adapter}: {what}; inside a chain the models around it fix the widths")
        if not allow_shape_change:
            raise PrismInputError(f"{adapter}: {what}; pass --allow-shape-change to serve the new widths")

    from prism_deploy.core.fsutil import inside

    # a name read from the repository's manifest: a folder of the repository, nothing outside it
    model_dir = inside(root, model, f"{root / repo_mod.REPO_MANIFEST}: models")
    version = max(versions_of(model_dir), default=0) + 1
    profile = Profile.from_json(record["profile"])
    build_dir = Path(tempfile.mkdtemp(prefix=f"{repo_mod.STAGING_PREFIX}build-", dir=model_dir))
    started = time.monotonic()
    try:
        result = build(
            BuildRequest(
                adapter=new_path,
                out_dir=build_dir,
                target=record["target"],
                precisions=(record["precision"],),
                profile=profile,
                per_pipe=record.get("engine_layout") == "per-pipe",
                plugin="on" if record.get("plugin") else "off",
            )
        )
        result.raise_for_failures()  # the parity gate: exit 1, nothing written
        outcome = result.outcomes[0]
        if not (outcome.entry or {}).get("parity"):
            raise PrismInputError(f"{adapter}: the new engine was built without a parity check; refusing to serve it")
        info = inspect_stage(build_dir, precision=record["precision"], target=record["target"])
        build_s = time.monotonic() - started
        if manifest["backend"] == "native":
            entry = repo_mod._native_model(model, info, "graph", repo_mod.Options(), batched=True)
        else:
            entry = repo_mod._python_stage(model, info, repo_mod.Options())
        new_text = None
        if shape_changed:  # the config is per model: the new widths replace the old ones
            old_text = (model_dir / "config.pbtxt").read_text(encoding="utf-8")
            new_text = _with_widths(old_text, new_config.in_dim, new_config.out_dim)
        vdir = repo_mod.add_version(root, model, version, entry.fill)
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)  # our temporary build folder (the version keeps hard links)
    if new_text is not None:
        from prism_deploy.core.fsutil import write_text_atomic

        write_text_atomic(model_dir / "config.pbtxt", new_text)
        record["inputs"][0]["dims"][-1], record["outputs"][0]["dims"][-1] = new_config.in_dim, new_config.out_dim
    record["versions"] = sorted({*record.get("versions", []), version})
    record.setdefault("sources", {})[str(version)] = str(new_path.resolve())
    record["adapter_sha256"] = info.details.get("adapter_sha256")
    repo_mod.write_manifest(root, manifest)
    report: dict[str, Any] = {
        "repository": str(root),
        "model": model,
        "version": version,
        "version_dir": str(vdir),
        "previous": version - 1 if version > 1 else None,
        "engine": outcome.config.id,
        "build": outcome.action,
        "build_seconds": round(build_s, 3),
        "parity": (outcome.entry or {}).get("parity"),
        "shape_changed": shape_changed,
        "server": None,
    }
    return report


def _with_widths(text: str, in_dim: int, out_dim: int) -> str:
    from google.protobuf import text_format

    message = cfg.parse_text(text, "config.pbtxt")
    message.input[0].dims[-1] = in_dim
    message.output[0].dims[-1] = out_dim
    out = text_format.MessageToString(message)
    cfg.check_config(cfg.parse_text(out, "config.pbtxt"))
    return out


def swap(
    url: str, model: str, version: int, *, wait_s: float = UNLOAD_WAIT_S, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    """Load ``model`` again (its newest version serves) and wait until older versions are unloaded."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(url, network_timeout=wait_s, connection_timeout=10)
    started = time.monotonic()
    try:
        client.load_model(model, headers=headers)
    except InferenceServerException as exc:
        raise PrismInputError(f"{url}: loading {model} version {version} failed ({brief(exc, 300)})") from None
    loaded_s = time.monotonic() - started
    if not client.is_model_ready(model, str(version)):
        raise PrismInputError(f"{url}: {model} version {version} is not ready after loading")
    deadline = started + wait_s
    old_ready = True
    while time.monotonic() < deadline:
        index = client.get_model_repository_index(headers=headers)
        old_ready = any(
            m.get("name") == model and m.get("version") not in (None, "", str(version)) and m.get("state") == "READY"
            for m in index
        )
        if not old_ready:
            break
        time.sleep(0.1)
    return {
        "url": url,
        "loaded_seconds": round(loaded_s, 3),
        "old_unloaded": not old_ready,
        "old_unloaded_seconds": round(time.monotonic() - started, 3) if not old_ready else None,
    }
