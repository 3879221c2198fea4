"""``prism-deploy bench``: the command, its JSON, the floor arithmetic and its bad-input paths.

Tiny adapters and ``--repeat 3`` keep this fast; nothing here asserts a time.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from prism_deploy.bench import bytes_must_move, case_floor, floor_seconds, flops_must_do, machine
from prism_deploy.bench.timing import time_cpu
from prism_deploy.cli.main import main
from prism_deploy.format import AdapterConfig, PipeSpec
from prism_deploy.reference import describe, random_adapter, simple_config  # noqa: F401


@pytest.fixture(autouse=True)
def small_rate_measurements(monkeypatch):
    """The tests check the plumbing, not this machine's speed (and run as on a CPU-only
    machine, tests/conftest.py, so the GPU backends are unavailable on any runner)."""
    monkeypatch.setattr(machine, "COPY_BYTES_CPU", 8 * 1024 * 1024)
    monkeypatch.setattr(machine, "MATMUL_N_CPU", 256)


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.safetensors"
    random_adapter(simple_config(16, 12, (2, 2), top_k=2, pipes=2, combine="weighted"), seed=3).save(path)
    return path


def _bench(args: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(["bench", *args])
    except SystemExit as exc:  # refused by the option parser
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


# ---- the floor, checked by hand -------------------------------------------------------------

HAND = AdapterConfig(
    8,
    4,
    (
        PipeSpec("all", (2, 2), (2, 4)),  # ungated: 4 tiles of 2x4
        PipeSpec("gated", (2, 2), (2, 4), top_k=1),  # gate [4, 8] + bias [4]
    ),
)


def test_floor_bytes_by_hand():
    # 3 tokens; the gate picked 2 distinct tiles among them.
    fp32 = bytes_must_move(HAND, "fp32", 3, [None, 2])
    assert fp32 == {
        "tiles": 4 * 8 * 4 + 2 * 8 * 4,  # 128 + 64
        "gates": 4 * 8 * 4 + 4 * 4,  # weight 128 + bias 16
        "activations": 3 * (8 + 4) * 4,  # 144
        "total": 192 + 144 + 144,
    }
    fp16 = bytes_must_move(HAND, "fp16", 3, [None, 2])
    assert (fp16["tiles"], fp16["gates"], fp16["total"]) == (96, 64 + 8, 96 + 72 + 144)
    int8 = bytes_must_move(HAND, "int8", 3, [None, 2])
    # tiles 1 byte each plus one fp32 scale per tile row (2 rows); gate rows also get a scale.
    assert int8["tiles"] == (4 * 8 + 4 * 2 * 4) + (2 * 8 + 2 * 2 * 4)
    assert int8["gates"] == 4 * 8 + 4 * 4 + 4 * 4
    # Unknown routing: the least possible, top_k tiles.
    assert bytes_must_move(HAND, "fp32", 3)["tiles"] == 128 + 1 * 8 * 4


def test_floor_time_by_hand():
    info = describe(HAND, random_adapter(HAND).tensors())
    # Per token: ungated 2*4*8 = 64; gated 2*1*8 + gate 2*4*8 = 80.
    assert flops_must_do(info, 3) == 3 * 144
    f = floor_seconds(480.0, 432.0, bandwidth=1000.0, matrix_rate=100.0)
    assert f == {"memory_s": 0.48, "compute_s": 4.32, "floor_s": 4.32, "bound": "compute"}
    case = case_floor(HAND, info, "fp32", 3, 1000.0, 1e9, [None, 2])
    assert case["floor_s"] == pytest.approx(0.48) and case["bound"] == "memory"
    # every tile read: the 2 unselected gated tiles add 2 * 8 * 4 bytes
    assert case["all_tiles"]["bytes"] == 480 + 2 * 8 * 4
    assert case["all_tiles"]["flops"] == 3 * (64 + 2 * 4 * 8 + 64)  # gated pipe computes all 4 tiles


def test_floor_matches_describe_for_one_token():
    adapter = random_adapter(simple_config(64, 40, (4, 4), top_k=5, pipes=3, combine="weighted"))
    info = adapter.describe()
    moved = bytes_must_move(adapter.config, "fp32", 1)
    assert moved["tiles"] + moved["gates"] == info["weight_bytes_per_token"]["gated"]


def test_floor_rejects_unknown_precision():
    from prism_deploy.core.errors import PrismInputError

    with pytest.raises(PrismInputError, match="fp8"):
        bytes_must_move(HAND, "fp8", 1)


# ---- timing and memory mechanics --------------------------------------------------------------


def test_time_cpu_rotates_buffers_and_counts_samples():
    seen: list[int] = []
    inputs = list(range(4))
    result = time_cpu(seen.append, inputs, warmup_ms=0, repeat=7)
    assert result["samples"] == 7 and result["buffers"] == 4
    timed = seen[-7:]
    assert all(a != b for a, b in zip(timed, timed[1:]))  # never the same input twice in a row
    assert set(seen[:4]) == set(inputs)  # warm-up touched every buffer
    assert result["p10_s"] <= result["median_s"] <= result["p90_s"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and clear_refs are Linux features")
def test_peak_memory_sees_a_transient_allocation():
    # in a fresh process: in this one, memory an earlier test freed (and the allocator kept) can
    # take the 64 MB without the resident set growing
    import subprocess

    code = (
        "import json, numpy as np\n"
        "from prism_deploy.bench.memory import PeakMemory\n"
        "with PeakMemory() as m:\n"
        "    block = np.ones(64 * 1024 * 1024 // 8)\n"
        "    del block\n"
        "print(json.dumps(m.result()))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    r = json.loads(done.stdout.strip().splitlines()[-1])
    if r["peak_rss_method"].startswith("VmHWM"):
        assert r["peak_rss_bytes"] - r["rss_at_start_bytes"] >= 48 * 1024 * 1024


# ---- the command ------------------------------------------------------------------------------

CASE_FIELDS = {
    "backend",
    "precision",
    "batch",
    "seq",
    "tokens",
    "median_s",
    "p10_s",
    "p90_s",
    "samples",
    "tokens_per_s",
    "ratio_to_torch",
    "floor_s",
    "ratio_to_floor",
    "memory",
    "max_abs_err",
    "max_rel_err",
    "method",
    "buffers",
}


def _check_results(data: dict, batches: list[int]) -> None:
    m = data["machine"]
    for key in ("cpu_model", "cpu_cores", "load_average_start", "load_average_end", "gpu", "versions", "device"):
        assert key in m, key
    assert m["cpu_cores"] >= 1 and "torch" in m["versions"] and "numpy" in m["versions"]
    assert data["rates"]["copy_bandwidth"]["bytes_per_s"] > 0
    assert data["rates"]["matrix_rate"]["fp32"]["flops_per_s"] > 0
    assert data["adapter"]["sha256"] and data["adapter"]["content_sha256"]
    for c in data["cases"]:
        assert CASE_FIELDS <= set(c), CASE_FIELDS - set(c)
        assert c["samples"] == 3
        assert c["p10_s"] <= c["median_s"] <= c["p90_s"]
        assert c["memory"]["peak_rss_bytes"] > 0
        assert c["ratio_to_floor"] == pytest.approx(c["median_s"] / c["floor_s"])
    torch_cases = [c for c in data["cases"] if (c["backend"], c["precision"]) == ("torch", "fp32")]
    assert sorted(c["batch"] for c in torch_cases) == batches
    for c in torch_cases:
        assert c["ratio_to_torch"] == 1.0 and c["max_abs_err"] == 0.0  # torch fp32 is the reference
    for u in data["backends"]["unavailable"]:
        assert u["reason"].strip()


def test_bench_runs_torch_and_ort_cpu(tiny: Path, tmp_path: Path, capsys):
    out = tmp_path / "r" / "bench.json"
    code, text, _ = _bench(
        [
            str(tiny),
            "--backends",
            "torch,ort-cpu",
            "--batch",
            "1,4",
            "--repeat",
            "3",
            "--warmup",
            "0",
            "--json-out",
            str(out),
        ],
        capsys,
    )
    assert code == 0, text
    data = json.loads(out.read_text())
    _check_results(data, [1, 4])
    assert data["backends"]["ran"] == ["ort-cpu", "torch"]
    ort = [c for c in data["cases"] if c["backend"] == "ort-cpu"]
    assert sorted(c["batch"] for c in ort) == [1, 4]
    for c in ort:  # the same inputs as torch: fp32 agrees with the reference
        assert c["max_rel_err"] < 1e-4
        torch_median = next(
            t["median_s"] for t in data["cases"] if t["backend"] == "torch" and t["batch"] == c["batch"]
        )
        assert c["ratio_to_torch"] == pytest.approx(c["median_s"] / torch_median)
    assert "ort-cpu" in text and "torch" in text
    assert [p.name for p in out.parent.iterdir()] == ["bench.json"]  # no temp file left


def test_bench_torch_json_and_unavailable_reasons(tiny: Path, tmp_path: Path, capsys):
    out = tmp_path / "bench.json"
    code, text, _ = _bench(
        [
            str(tiny),
            "--backends",
            "torch,ort-cuda,trt,kernel",
            "--precision",
            "fp32,fp16,int8",
            "--batch",
            "1,2",
            "--repeat",
            "3",
            "--warmup",
            "0",
            "--json-out",
            str(out),
        ],
        capsys,
    )
    assert code == 0
    data = json.loads(out.read_text())
    _check_results(data, [1, 2])
    assert data["machine"]["gpu"] is None
    reasons = {(u["backend"], u["precision"]): u["reason"] for u in data["backends"]["unavailable"]}
    for name in ("ort-cuda", "trt", "kernel"):
        assert (name, None) in reasons and "GPU" in reasons[(name, None)]
        assert f"unavailable: {name}" in text
    assert "int8" in reasons[("torch", "int8")]
    fp16 = [c for c in data["cases"] if (c["backend"], c["precision"]) == ("torch", "fp16")]
    assert len(fp16) == 2 and all(0 < c["max_rel_err"] < 1e-2 for c in fp16)  # fp16 weights: close, not equal
    floors = {(f["precision"], f["batch"]) for f in data["floors"]}
    assert {("fp32", 1), ("fp16", 2), ("int8", 1)} <= floors


def test_bench_baseline_is_measured_when_fp32_not_asked(tiny: Path, tmp_path: Path, capsys):
    out = tmp_path / "bench.json"
    code, _, _ = _bench(
        [
            str(tiny),
            "--backends",
            "torch",
            "--precision",
            "fp16",
            "--batch",
            "2",
            "--seq",
            "3",
            "--repeat",
            "3",
            "--warmup",
            "0",
            "--json-out",
            str(out),
        ],
        capsys,
    )
    assert code == 0
    data = json.loads(out.read_text())
    pairs = {(c["precision"], c["ratio_to_torch"] is not None) for c in data["cases"]}
    assert pairs == {("fp32", True), ("fp16", True)}
    assert all(c["tokens"] == 6 and c["tokens_per_s"] == pytest.approx(6 / c["median_s"]) for c in data["cases"])
    # the floor's activations follow the tokens: 6 x (16 in + 12 out) float32
    assert all(f["bytes"]["activations"] == 6 * 28 * 4 for f in data["floors"])


def test_bench_plot(tiny: Path, tmp_path: Path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "bench.png"
    code, _, _ = _bench(
        [str(tiny), "--backends", "torch", "--batch", "1,2", "--repeat", "3", "--warmup", "0", "--plot", str(png)],
        capsys,
    )
    assert code == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_runs_each_gated_form_side_by_side(tiny: Path, tmp_path: Path, capsys):
    out = tmp_path / "forms.json"
    backends = "ort-cpu,ort-cpu/A,ort-cpu/B,ort-cpu/sparse"
    code, text, _ = _bench(
        [
            str(tiny),
            "--backends",
            backends,
            "--precision",
            "fp32,int8",
            "--batch",
            "1,4",
            "--repeat",
            "3",
            "--warmup",
            "0",
            "--json-out",
            str(out),
        ],
        capsys,
    )
    assert code == 0, text
    data = json.loads(out.read_text())
    assert data["backends"]["ran"] == sorted(backends.split(","))
    for backend in backends.split(","):
        cases = [c for c in data["cases"] if c["backend"] == backend]
        assert sorted((c["precision"], c["batch"]) for c in cases) == [
            ("fp32", 1),
            ("fp32", 4),
            ("int8", 1),
            ("int8", 4),
        ]
        for c in cases:  # each form against the same floor, and right
            assert c["floor_s"] > 0 and c["max_rel_err"] < (1e-4 if c["precision"] == "fp32" else 5e-2)
        assert backend in text
    details = {d["name"]: d for d in data["backends"]["details"]}
    assert details["ort-cpu/sparse"]["precisions"]["fp32"]["export"]["gated_form"] == "sparse"


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--backends", "torch,cuda-magic"], "--backends"),
        (["--precision", "fp8"], "--precision"),
        (["--batch", "0"], "--batch"),
        (["--batch", "one"], "--batch"),
        (["--repeat", "0"], "--repeat"),
        (["--warmup", "-5"], "--warmup"),
        (["--seq", "x"], "--seq"),
        (["--threads", "0"], "--threads"),
        (["--engines", "/nonexistent/engines"], "--engines"),
        (["--backends", "torch/sparse"], "--backends"),
        (["--backends", "ort-cpu/C"], "--backends"),
    ],
)
def test_bench_bad_options_exit_2(tiny: Path, capsys, args, fragment):
    code, _, err = _bench(
        [str(tiny), "--backends", "torch", *args] if "--backends" not in args else [str(tiny), *args], capsys
    )
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0]


def test_bench_missing_or_bad_adapter_exit_2(tmp_path: Path, capsys):
    code, _, err = _bench([str(tmp_path / "nope.safetensors"), "--backends", "torch"], capsys)
    assert code == 2 and err.startswith("error:") and "nope.safetensors" in err
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    code, _, err = _bench([str(bad), "--backends", "torch", "--repeat", "3"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error:")


def test_bench_plot_without_matplotlib_exit_2(tiny: Path, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    code, out, err = _bench([str(tiny), "--backends", "torch", "--plot", str(tmp_path / "p.png")], capsys)
    assert code == 2 and "matplotlib" in err and out == ""  # refused before any timing
    assert not (tmp_path / "p.png").exists()


def test_bench_runs_built_engines(tiny: Path, tmp_path: Path, capsys):
    engines = tmp_path / "engines"
    assert main(["build", str(tiny), "-o", str(engines), "--target", "ort-cpu", "--precision", "fp32"]) == 0
    capsys.readouterr()
    out = tmp_path / "bench.json"
    code, text, _ = _bench(
        [
            str(tiny),
            "--engines",
            str(engines),
            "--backends",
            "torch,ort-cpu",
            "--precision",
            "fp32,fp16",
            "--batch",
            "2",
            "--repeat",
            "3",
            "--warmup",
            "0",
            "--json-out",
            str(out),
        ],
        capsys,
    )
    assert code == 0
    data = json.loads(out.read_text())
    ort = [c for c in data["cases"] if c["backend"] == "ort-cpu"]
    assert [c["precision"] for c in ort] == ["fp32"] and ort[0]["max_rel_err"] < 1e-4
    detail = next(d for d in data["backends"]["details"] if d["name"] == "ort-cpu")
    assert detail["precisions"]["fp32"]["source"] == "engines"
    # no fp16 engine was built: listed with the reason, not dropped
    assert any(
        u["backend"] == "ort-cpu" and u["precision"] == "fp16" and "fp16" in u["reason"]
        for u in data["backends"]["unavailable"]
    )


def test_a_result_records_the_command_without_the_checkouts_folder():
    """`python -m prism_deploy bench` put the checkout's absolute __main__.py in every result."""
    import prism_deploy
    from prism_deploy.bench.machine import recorded_argv

    main_py = str(Path(prism_deploy.__file__).resolve().parent / "__main__.py")
    assert recorded_argv([main_py, "bench", "/data/a.safetensors"]) == [
        "prism_deploy/__main__.py",
        "bench",
        "/data/a.safetensors",
    ]
    assert recorded_argv(["/usr/local/bin/prism-deploy", "bench"]) == ["/usr/local/bin/prism-deploy", "bench"]
