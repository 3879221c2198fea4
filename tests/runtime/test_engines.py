"""Engine folders as the builder and the loader meet them (issue 17, sections 1 to 4).

- The ownership rule (docs/engines.md): ``build -o DIR`` deletes or replaces only files its
  own manifest lists; a folder holding files it did not write, an unreadable or newer
  manifest, or another adapter's engines is refused (exit 2, one line saying what would be
  lost) unless ``--force``, which still deletes nothing it cannot prove it wrote.
- Confinement: every file a manifest names resolves inside its folder (no ``..``, no absolute
  path, no symlink out); a file outside is never opened, nor its hash printed.
- Every field: manifests mutated at random (hypothesis) load as engines that run, or fail with
  one clean error; ``build`` into such a folder exits 0 or 2 and never loses a file.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prism_deploy.cli.main import main
from prism_deploy.core.errors import PrismInputError
from prism_deploy.format.engine_manifest import EngineFileError
from prism_deploy.reference import random_adapter, simple_config
from prism_deploy.runtime import load_engines

FAST = ["--batch", "1:2:4", "--seq", "1:8:16"]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """Two adapters of other layouts, and a per-pipe fp32 build of the first (two pipes, so
    combine weights and parts can disagree in length)."""
    root = tmp_path_factory.mktemp("engine-folders")
    a = root / "a.safetensors"
    b = root / "b.safetensors"
    random_adapter(simple_config(24, 20, (2, 2), top_k=2, pipes=2, combine="weighted"), seed=1).save(a)
    random_adapter(simple_config(24, 20, (4, 1)), seed=2).save(b)
    assert (
        main(
            [
                "build",
                str(a),
                "-o",
                str(root / "eng"),
                "--target",
                "ort-cpu",
                "--precision",
                "fp32",
                "--per-pipe",
                *FAST,
            ]
        )
        == 0
    )
    return {"a": a, "b": b, "eng": root / "eng"}


def copy_build(built: dict[str, Path], dest: Path) -> Path:
    shutil.copytree(built["eng"], dest)
    return dest


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != ".build.lock"}


def one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def build_into(capsys, adapter: Path, folder: Path, *extra: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(
        [
            "build",
            str(adapter),
            "-o",
            str(folder),
            "--target",
            "ort-cpu",
            "--precision",
            "fp32",
            "--per-pipe",
            *FAST,
            *extra,
        ]
    )
    return code, capsys.readouterr().err


# ---- 1. ownership -------------------------------------------------------------------------------


def test_a_users_file_in_the_folder_is_refused_and_kept(built, tmp_path, capsys):
    eng = copy_build(built, tmp_path / "eng")
    (eng / "my.ort.onnx").write_bytes(b"mine")
    code, err = build_into(capsys, built["b"], eng)
    assert code == 2 and "did not write (my.ort.onnx)" in one_error_line(err)
    assert (eng / "my.ort.onnx").read_bytes() == b"mine"
    code, _ = build_into(capsys, built["a"], eng, "--force")  # --force builds, and keeps the file
    assert code == 0 and (eng / "my.ort.onnx").read_bytes() == b"mine"


@pytest.mark.parametrize(
    "manifest", ["{not json", '{"schema": "prism-deploy.engines", "schema_version": 99, "adapter": {}, "engines": []}']
)
def test_an_unreadable_or_newer_manifest_is_refused_and_nothing_deleted(manifest, built, tmp_path, capsys):
    eng = copy_build(built, tmp_path / "eng")
    (eng / "manifest.json").write_text(manifest)
    before = files(eng)
    code, err = build_into(capsys, built["a"], eng)
    assert code == 2 and "nothing was changed" in one_error_line(err)
    assert files(eng) == before
    code, _ = build_into(capsys, built["a"], eng, "--force")  # its files are kept, not deleted
    assert code == 0 and set(before) - {"manifest.json"} <= set(files(eng))


def test_another_adapters_engines_are_refused_saying_what_would_be_lost(built, tmp_path, capsys):
    eng = copy_build(built, tmp_path / "eng")
    before = files(eng)
    code, err = build_into(capsys, built["b"], eng)
    line = one_error_line(err)
    assert code == 2 and "holds the engines of adapter a.safetensors" in line and "1 engine(s), 2 file(s)" in line
    assert files(eng) == before
    code, _ = build_into(capsys, built["b"], eng, "--force")
    assert code == 0 and json.loads((eng / "manifest.json").read_text())["adapter"]["file"] == "b.safetensors"


def test_concurrent_builds_of_different_adapters_lose_nothing(built, tmp_path):
    """Four processes, two adapters, one folder: the lock serialises them, the first adapter
    to get it owns the folder, the other adapter's builds are refused: every engine the
    final manifest lists is there and intact."""
    eng = tmp_path / "eng"
    argv = ["--target", "ort-cpu", "--precision", "fp32", *FAST, "-o", str(eng)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "prism_deploy", "build", str(built[k]), *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for k in ("a", "b", "a", "b")
    ]
    results = [(p.wait(timeout=300), p.stderr.read() if p.stderr else "") for p in procs]
    codes = [c for c, _ in results]
    assert set(codes) <= {0, 2} and codes.count(0) >= 1 and codes.count(2) >= 1, results
    for code, err in results:
        if code == 2:
            assert "holds the engines of adapter" in err and "Traceback" not in err
    engines = load_engines(eng)  # the manifest and every file it lists verify
    assert engines.run(np.zeros((1, 2, 24), np.float32)).shape == (1, 2, 20)


def test_a_failed_build_leaves_no_folder_behind(built, tmp_path, capsys):
    out = tmp_path / "new"
    code, err = build_into(capsys, built["a"], out, "--batch", "4:2:1")
    assert code == 2 and not out.exists()


# ---- 3. nothing outside its folder ----------------------------------------------------------------


def _first_part(manifest: dict[str, Any]) -> dict[str, Any]:
    return manifest["engines"][0]["parts"][0]


@pytest.mark.parametrize("where", ["dotdot", "absolute", "symlink", "passwd"])
def test_manifest_paths_stay_inside_the_folder(where, built, tmp_path, capsys):
    eng = copy_build(built, tmp_path / "eng")
    outside = tmp_path / "outside"
    outside.mkdir()
    manifest = json.loads((eng / "manifest.json").read_text())
    part = _first_part(manifest)
    name = part["file"]
    shutil.copyfile(eng / name, outside / name)
    if where == "dotdot":
        part["file"] = f"../outside/{part['file']}"
    elif where == "absolute":
        part["file"] = str(outside / part["file"])
    elif where == "passwd":  # a system file stands outside; a copy of the idea in tmp, never /etc itself
        secret = tmp_path / "passwd"
        secret.write_text("root:x:0:0::/root:/bin/sh\n")
        part["file"] = str(secret)
    else:  # a name inside the folder that is a symlink to a copy outside it
        (eng / part["file"]).unlink()
        (eng / part["file"]).symlink_to(outside / part["file"])
    (eng / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineFileError) as info:
        load_engines(eng)
    message = str(info.value)
    assert "outside" in message or "not a plain file name" in message
    if where == "passwd":
        import hashlib

        assert hashlib.sha256((tmp_path / "passwd").read_bytes()).hexdigest()[:12] not in message
    capsys.readouterr()
    assert main(
        ["build", str(built["a"]), "-o", str(eng), "--target", "ort-cpu", "--precision", "fp32", "--per-pipe", *FAST]
    ) in (0, 2)
    assert (outside / name).is_file()  # nothing outside was touched: not read, not hashed, not deleted
    if where == "passwd":
        assert (tmp_path / "passwd").read_text() == "root:x:0:0::/root:/bin/sh\n"


# ---- 2 and 4. every field -------------------------------------------------------------------------

# the examples, then one of each kind of wrong value in each place that matters
CASES = {
    "combine_weights shorter than the parts": ("engines/0/combine_weights", [1.0]),
    "combine_weights {}": ("engines/0/combine_weights", {}),
    "combine_weights [nan]": ("engines/0/combine_weights", [float("nan"), 1.0]),
    "combine_weights 1e308": ("engines/0/combine_weights", [1e308, 1.0]),
    "schema_version true": ("schema_version", True),
    "target bogus": ("engines/0/target", "bogus"),
    "configuration target bogus": ("engines/0/configuration/target", "bogus"),
    "profile inverted": ("engines/0/configuration/profile/batch", [4, 2, 1]),
    "profile of 250 digits": ("engines/0/configuration/profile/seq", [1, 2, int("9" * 250)]),
    "parts not a list": ("engines/0/parts", "x"),
    "part file null": ("engines/0/parts/0/file", None),
    "part sha256 a number": ("engines/0/parts/0/sha256", 5),
    "pipe index out of range": ("engines/0/parts/1/pipe", 7),
    "config in_dim a string": ("adapter/config/in_dim", "24"),
    "config pipes empty": ("adapter/config/pipes", []),
    "engines not a list": ("engines", {}),
    "deep nesting": ("engines/0/tools", json.loads("[" * 50 + "]" * 50)),
}


def _set(obj: Any, path: str, value: Any) -> None:
    *parents, last = path.split("/")
    for part in parents:
        obj = obj[int(part)] if isinstance(obj, list) else obj[part]
    if isinstance(obj, list):
        obj[int(last)] = value
    else:
        obj[last] = value


def check_folder(eng: Path, adapter: Path, capsys) -> None:
    """The class property: load gives engines that run finitely, or one clean error; build
    exits 0 or 2 (one line), and a refused build changes no file."""
    try:
        engines = load_engines(eng)
    except PrismInputError as exc:
        assert "\n" not in str(exc)
    else:
        y = engines.run(np.ones((1, 3, 24), np.float32))
        assert y.shape == (1, 3, 20) and np.isfinite(y).all()
    before = files(eng)
    capsys.readouterr()
    code = main(
        ["build", str(adapter), "-o", str(eng), "--target", "ort-cpu", "--precision", "fp32", "--per-pipe", *FAST]
    )
    err = capsys.readouterr().err
    assert code in (0, 2), err
    if code == 2:
        one_error_line(err)
        assert files(eng) == before


@pytest.mark.parametrize("case", list(CASES))
def test_each_wrong_manifest_field_is_one_clean_error(case, built, tmp_path, capsys):
    eng = copy_build(built, tmp_path / "eng")
    manifest = json.loads((eng / "manifest.json").read_text())
    path, value = CASES[case]
    _set(manifest, path, value)
    (eng / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineFileError) as info:
        load_engines(eng)
    assert "\n" not in str(info.value)
    check_folder(eng, built["a"], capsys)


JSON_VALUES = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(1 << 70), max_value=1 << 70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=12),
        st.sampled_from(
            ["../x.ort.onnx", "/nonexistent/prism-deploy-victim", "", ".", "fp32", "ort-cpu", "trt", "per-pipe"]
        ),
    ),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6,
)


def _paths(obj: Any, prefix: str = "") -> list[str]:
    out = []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else []
    for key, value in items:
        path = f"{prefix}/{key}" if prefix else str(key)
        out.append(path)
        out += _paths(value, path)
    return out


@settings(
    max_examples=int(os.environ.get("PRISM_FUZZ_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_mutated_manifests_load_cleanly_or_fail_cleanly(built, tmp_path_factory, capsys, data):
    eng = copy_build(built, tmp_path_factory.mktemp("fuzz") / "eng")
    manifest = json.loads((eng / "manifest.json").read_text())
    mutated = copy.deepcopy(manifest)
    for _ in range(data.draw(st.integers(1, 3))):
        paths = _paths(mutated)
        path = data.draw(st.sampled_from(paths))
        *parents, last = path.split("/")
        holder = mutated
        for part in parents:
            holder = holder[int(part)] if isinstance(holder, list) else holder[part]
        if isinstance(holder, dict) and data.draw(st.booleans()):
            del holder[last]
        else:
            _set(mutated, path, data.draw(JSON_VALUES))
    (eng / "manifest.json").write_text(json.dumps(mutated))  # NaN/Infinity tokens included
    check_folder(eng, built["a"], capsys)


def test_the_fuzz_starts_from_a_folder_that_loads(built):
    assert load_engines(built["eng"]).run(np.ones((1, 3, 24), np.float32)).shape == (1, 3, 20)
    assert os.path.isfile(built["eng"] / "manifest.json")


@pytest.mark.parametrize("name", ["../first.onnx", "/nonexistent/first.onnx", "sub/first.onnx", "link.onnx"])
def test_model_json_paths_stay_inside_the_folder(name, zoo, tmp_path):
    from prism_deploy.runtime.chain import Pipeline

    folder = tmp_path / "A"
    shutil.copytree(zoo["A"], folder)
    manifest = json.loads((folder / "model.json").read_text())
    graph = manifest["files"]["graph"]["name"]
    if name == "link.onnx":  # a symlink inside the folder to a copy outside it
        shutil.copyfile(folder / graph, tmp_path / "outside.onnx")
        (folder / name).symlink_to(tmp_path / "outside.onnx")
    manifest["files"]["graph"]["name"] = name
    (folder / "model.json").write_text(json.dumps(manifest))
    with pytest.raises(PrismInputError, match="outside|not a plain file name") as info:
        Pipeline(folder, zoo["adapter"], zoo["B"])
    assert "\n" not in str(info.value)


def test_an_interrupted_commit_leaves_the_folder_as_it_was(built, tmp_path, capsys, monkeypatch):
    """Ctrl-C after the engines moved in but before the manifest: they go again (issue 17)."""
    from prism_deploy.builder import loop

    eng = copy_build(built, tmp_path / "eng")
    before = files(eng)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "write_manifest", interrupted)
    assert (
        main(
            [
                "build",
                str(built["a"]),
                "-o",
                str(eng),
                "--target",
                "ort-cpu",
                "--precision",
                "fp16",
                "--per-pipe",
                *FAST,
            ]
        )
        == 130
    )  # "error: interrupted"
    assert files(eng) == before
    monkeypatch.undo()
    code, _ = build_into(capsys, built["a"], eng)
    assert code == 0


def test_engines_a_killed_build_left_unlisted_are_recognised_and_removed(built, tmp_path, capsys):
    """SIGKILL between the move and the manifest: the engine files carry their own hash in their
    names, so the next build knows them for its own; a user's file of such a name is not."""
    eng = copy_build(built, tmp_path / "eng")
    (eng / "manifest.json").unlink()  # as if killed before the first manifest was written
    engines = sorted(p.name for p in eng.iterdir() if p.name.endswith(".ort.onnx"))
    fake = eng / "mine.0123456789ab.ort.onnx"  # an engine-like name whose content does not match it
    fake.write_bytes(b"not an engine")
    code, err = build_into(capsys, built["a"], eng)
    assert code == 2 and "did not write (mine.0123456789ab.ort.onnx)" in err
    assert all((eng / name).exists() for name in engines)  # refused: nothing removed
    fake.unlink()
    code, _ = build_into(capsys, built["a"], eng)
    assert code == 0 and load_engines(eng).run(np.ones((1, 2, 24), np.float32)).shape == (1, 2, 20)
