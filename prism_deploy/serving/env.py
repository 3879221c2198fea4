"""The environment Triton's Python backend runs the models in, made from PyPI and cached.

The tritonserver shipped in the ``nvidia-pytriton`` wheel runs each Python-backend model in a
stub process whose embedded interpreter takes its packages from the ``python3`` first on
``PATH``. Its stub predates numpy 2's ABI: with numpy 2 it served empty outputs and zeros
without failing. So the models run in a virtual environment of
their own, never in the CLI's:

- packages: ``numpy<2``, ``onnxruntime`` at the exact version the engines were built with
  (the loader refuses any other), ``onnx`` (the loader records tool versions) and
  ``nvidia-pytriton`` (the server binary, its Python backend and the stubs); no PyTorch;
- ``<cache>/triton/env-py<major.minor>-<key>``, the key a hash of the Python version, the
  platform and the requirement list, so a different ORT version gets a different environment;
- the project's own code is a copy of the ``prism_deploy`` package in
  ``<cache>/triton/code-<hash of its sources>`` (put on ``PYTHONPATH`` by ``serve``): the
  environment does not change when the code does, and a served version keeps the code it
  started with;
- created in a temporary sibling folder, checked, then renamed into place; a file lock keeps
  two ``serve`` calls from creating it twice. ``check`` runs the shipped ``model.py`` in the
  environment (so the project code imports there without PyTorch) and refuses numpy >= 2.

``$PRISM_DEPLOY_CACHE`` moves the cache (default ``~/.cache/prism-deploy``).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prism_deploy.core.errors import PrismInputError

NUMPY_REQUIREMENT = "numpy>=1.26,<2"
PYTRITON_REQUIREMENT = "nvidia-pytriton==0.7.0"
MARKER = "prism-env.json"
CODE_MARKER = "prism-code.json"
# pip resolves and downloads about 100 MB on first use: bounded, but generously
PIP_TIMEOUT_S = 1800
CHECK_TIMEOUT_S = 120


def cache_root() -> Path:
    root = os.environ.get("PRISM_DEPLOY_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "prism-deploy") / "triton"


@dataclass(frozen=True)
class EnvSpec:
    """What goes into a backend environment; its hash names the folder."""

    python: str  # "3.11"
    requirements: tuple[str, ...]
    machine: str = field(default_factory=platform.machine)

    @property
    def key(self) -> str:
        text = json.dumps(
            {
                "python": self.python,
                "requirements": sorted(self.requirements),
                "machine": self.machine,
                "implementation": sys.implementation.name,
            },
            sort_keys=True,
        )
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def folder_name(self) -> str:
        return f"env-py{self.python}-{self.key}"

    def to_json(self) -> dict[str, Any]:
        return {
            "python": self.python,
            "requirements": list(self.requirements),
            "machine": self.machine,
            "key": self.key,
        }


def spec_for(onnxruntime_version: str, *, gpu: bool = False) -> EnvSpec:
    """The environment for engines built with ``onnxruntime_version`` (CPU or GPU wheel)."""
    import onnx

    ort = "onnxruntime-gpu" if gpu else "onnxruntime"
    return EnvSpec(
        python=f"{sys.version_info.major}.{sys.version_info.minor}",
        requirements=(
            NUMPY_REQUIREMENT,
            f"{ort}=={onnxruntime_version}",
            f"onnx=={onnx.__version__}",
            # the project's torch-free core validates manifests with jsonschema
            "jsonschema>=4.0",
            PYTRITON_REQUIREMENT,
        ),
    )


@dataclass
class BackendEnv:
    """A checked environment: its folder, the project-code folder, and what the check found."""

    path: Path
    code: Path
    info: dict[str, Any]

    @property
    def bin(self) -> Path:
        return self.path / "bin"

    @property
    def python(self) -> Path:
        return self.bin / "python"

    @property
    def site_packages(self) -> Path:
        return Path(self.info["site_packages"])

    def pytriton_dir(self) -> Path | None:
        found = self.info.get("pytriton")
        return Path(found) if found else None


def _say(log: Callable[[str], None] | None, text: str) -> None:
    if log is not None:
        log(text)


def ensure_env(spec: EnvSpec, log: Callable[[str], None] | None = None) -> Path:
    """The environment folder for ``spec``, created from PyPI on first use."""
    from filelock import FileLock

    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    final = root / spec.folder_name
    with FileLock(str(root / f"{spec.folder_name}.lock")):
        if (final / MARKER).is_file():
            return final
        if final.exists():
            raise PrismInputError(
                f"{final}: exists without {MARKER} (not a finished prism-deploy environment); "
                "move it away and run again"
            )
        partial = root / f"{spec.folder_name}.partial-{secrets.token_hex(4)}"
        _say(
            log,
            f"creating the Triton backend environment {final} ({', '.join(spec.requirements)}); "
            "first use only, a few minutes",
        )
        started = time.monotonic()
        _run([sys.executable, "-m", "venv", str(partial)], "python -m venv", timeout=300)
        python = partial / "bin" / "python"
        _run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--no-input",
                "--progress-bar",
                "off",
                *spec.requirements,
            ],
            "pip install",
            timeout=PIP_TIMEOUT_S,
            log=log,
        )
        site = _site_packages(python)
        _install_stub(site, spec.python)
        record = {
            **spec.to_json(),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(time.monotonic() - started, 1),
        }
        (partial / MARKER).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        os.replace(partial, final)
        _say(log, f"backend environment ready in {record['seconds']} s")
    return final


def _run(
    cmd: list[str],
    what: str,
    *,
    timeout: float,
    log: Callable[[str], None] | None = None,
    env: dict[str, str] | None = None,
) -> str:
    """Run ``cmd`` to completion within ``timeout``; with ``log``, its progress lines go there as they come."""
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    except OSError as exc:
        raise PrismInputError(f"{what}: cannot run {cmd[0]} ({exc})") from None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip())
            if log is not None and line.startswith(("Collecting", "Downloading", "Installing", "Successfully")):
                log(f"  {line.strip()}")
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(cmd, timeout)
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise PrismInputError(f"{what}: did not finish within {timeout:.0f} s") from None
    if proc.returncode != 0:
        tail = " ".join(lines[-3:])[-400:]
        raise PrismInputError(f"{what} failed with exit code {proc.returncode}{': ' + tail if tail else ''}")
    return "\n".join(lines)


def _site_packages(python: Path) -> Path:
    out = _run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], "site-packages", timeout=60
    )
    return Path(out.strip().splitlines()[-1])


def _install_stub(site: Path, python: str) -> None:
    """The wheel ships one stub per Python version; the backend looks for it beside itself."""
    base = site / "pytriton" / "tritonserver"
    stub = base / "python_backend_stubs" / python / "triton_python_backend_stub"
    if not stub.is_file():
        raise PrismInputError(f"{stub}: the nvidia-pytriton wheel has no Python backend stub for Python {python}")
    target = base / "backends" / "python" / "triton_python_backend_stub"
    shutil.copy2(stub, target)
    target.chmod(0o755)


def code_overlay(log: Callable[[str], None] | None = None) -> Path:
    """``<cache>/triton/code-<hash>`` holding a copy of the running ``prism_deploy`` package."""
    import prism_deploy

    source = Path(prism_deploy.__file__).resolve().parent
    files = sorted(
        p
        for p in source.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix in (".py", ".typed", ".json")
    )
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(source)).encode() + b"\0" + path.read_bytes() + b"\0")
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"code-{digest.hexdigest()[:12]}"
    if (final / CODE_MARKER).is_file():
        return final
    partial = root / f"{final.name}.partial-{secrets.token_hex(4)}"
    for path in files:
        dest = partial / "prism_deploy" / path.relative_to(source)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest)
    (partial / CODE_MARKER).write_text(
        json.dumps({"source": str(source), "files": len(files)}) + "\n", encoding="utf-8"
    )
    try:
        os.replace(partial, final)
    except OSError:  # another process put the same content there first
        if not (final / CODE_MARKER).is_file():
            raise
    _say(log, f"project code for the backend: {final}")
    return final


_CHECK = """
import importlib.util, json, runpy, sys
from importlib import metadata
try:  # numpy >= 2 is refused before anything imports it (or stops on another package first)
    numpy_version = metadata.version("numpy")
except metadata.PackageNotFoundError:
    numpy_version = None
missing = [m for m in ("numpy", "onnxruntime") if importlib.util.find_spec(m) is None]
if numpy_version and int(numpy_version.split(".")[0]) >= 2:
    print(json.dumps({"numpy": numpy_version}))
    sys.exit(0)
if missing:  # said as what to install, not as the traceback of the first failed import
    print(json.dumps({"missing": missing}))
    sys.exit(0)
runpy.run_path(sys.argv[1])  # the shipped model.py: registers the project code, imports the backend
import numpy, onnxruntime, sysconfig
try:
    import pytriton, os
    pytriton_dir = os.path.dirname(pytriton.__file__)
except ImportError:
    pytriton_dir = None
print(json.dumps({"python": "%d.%d.%d" % sys.version_info[:3], "numpy": numpy.__version__,
                  "onnxruntime": onnxruntime.__version__, "providers": onnxruntime.get_available_providers(),
                  "torch_imported": "torch" in sys.modules, "pytriton": pytriton_dir,
                  "site_packages": sysconfig.get_paths()["purelib"]}))
"""


def backend_process_env(env_path: Path, code: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment variables under which the backend's Python finds this environment first."""
    out = dict(os.environ if base is None else base)
    for name in ("PYTHONHOME", "PYTHONPATH", "VIRTUAL_ENV", "CONDA_PREFIX"):
        out.pop(name, None)
    out["PATH"] = f"{env_path / 'bin'}{os.pathsep}{out.get('PATH', '')}"
    out["PYTHONPATH"] = str(code)
    out["PRISM_DEPLOY_BACKEND_CODE"] = str(code)  # what model.py reads (the stub ignores PYTHONPATH)
    out["PYTHONNOUSERSITE"] = "1"
    return out


def check_env(env_path: Path, code: Path, *, onnxruntime_version: str | None) -> BackendEnv:
    """Run the shipped ``model.py`` in the environment and check what it found; refuse numpy >= 2."""
    python = env_path / "bin" / "python"
    if not python.exists():
        raise PrismInputError(f"{env_path}: not a Python environment (no bin/python)")
    model_py = Path(__file__).with_name("triton_model.py")
    out = _run(
        [str(python), "-c", _CHECK, str(model_py)],
        f"{env_path}: environment check",
        timeout=CHECK_TIMEOUT_S,
        env=backend_process_env(env_path, code),
    )
    try:
        info = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise PrismInputError(f"{env_path}: environment check printed no result") from None
    if info.get("missing"):
        wanted = {
            "numpy": "'numpy<2'",
            "onnxruntime": f"onnxruntime=={onnxruntime_version}" if onnxruntime_version else "onnxruntime",
        }
        raise PrismInputError(
            f"{env_path}: the backend environment lacks {' and '.join(info['missing'])}; it needs "
            f"numpy < 2 and the engines' onnxruntime: {python} -m pip install "
            + " ".join(wanted[m] for m in info["missing"])
        )
    major = int(str(info["numpy"]).split(".")[0])
    if major >= 2:
        raise PrismInputError(
            f"{env_path}: numpy {info['numpy']} in the backend environment; Triton's bundled Python "
            "backend needs numpy < 2 (with numpy 2 it serves empty outputs and zeros)"
        )
    if info["torch_imported"]:
        raise PrismInputError(f"{env_path}: importing the serving code pulled in PyTorch; the backend must not")
    if onnxruntime_version is not None and info["onnxruntime"] != onnxruntime_version:
        raise PrismInputError(
            f"{env_path}: onnxruntime {info['onnxruntime']} in the backend environment, the engines "
            f"were built with {onnxruntime_version}"
        )
    return BackendEnv(env_path, code, info)


def prepare(
    onnxruntime_version: str,
    *,
    gpu: bool = False,
    env_path: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> BackendEnv:
    """The checked backend environment: ``env_path`` as given, else the cached one for the spec."""
    if env_path is not None:
        path = Path(env_path)
        if not path.is_dir():
            raise PrismInputError(f"{env_path}: no such environment folder")
    else:
        path = ensure_env(spec_for(onnxruntime_version, gpu=gpu), log)
    return check_env(path, code_overlay(log), onnxruntime_version=onnxruntime_version)
