"""`g2tr bench` end to end on a tiny workload: it runs, agrees with the reference, writes its files."""
import json
import subprocess
import sys

import pytest

from g2tr_kernels import _native
from g2tr_kernels.cli import main


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # --no-compile: inductor takes ~15 s per shape on 2 cores; the smoke test is about the command.
    code = main(["bench", "--workloads", "S1", "--repeats", "1", "--dtype", "float32", "--quick",
                 "--no-compile", "--out", str(out)])
    assert code == 0
    return out


def test_writes_the_three_files(bench_out):
    for name in ("bench.md", "bench.json", "bench.png"):
        assert (bench_out / name).stat().st_size > 0, name
    assert (bench_out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_json_has_machine_workload_rows_and_costs(bench_out):
    result = json.loads((bench_out / "bench.json").read_text())
    assert result["args"]["dtype"] == "float32"
    assert {"cpu", "torch", "torch_threads", "build_info"} <= set(result["machine"])
    (record,) = result["workloads"]
    assert record["id"] == "S1-tiny"
    assert record["k_total"] < record["n_total"]  # the smoke shape really merges
    rows = {(r["scope"], r["method"]): r for r in record["rows"]}
    for key in [("reduce", "reference"), ("reduce", "published structure"), ("floor", "floor: fp32 matmul")]:
        assert key in rows, key
        assert "error" not in rows[key], rows[key]
        assert rows[key]["median_s"] > 0
    for field in ("median_s", "min_s", "times_s", "speedup_vs_baseline", "speedup_vs_published", "ratio_to_floor",
                  "peak_extra_bytes", "max_abs_err", "keep_idx_diff", "assign_diff"):
        assert field in rows[("reduce", "published structure")], field
    ref = rows[("reduce", "reference")]
    assert ref["max_abs_err"] == 0 and ref["keep_idx_diff"] == 0 and ref["assign_diff"] == 0
    assert ref["speedup_vs_baseline"] == 1.0
    assert {c["workload"] for c in result["costs"]} == {"S1-tiny"}
    assert result["costs"][0]["label"] == "estimate, not measured"


@pytest.mark.skipif(not _native.loaded(), reason="the compiled extension did not load")
def test_cpu_backend_rows_agree_with_the_reference(bench_out):
    record = json.loads((bench_out / "bench.json").read_text())["workloads"][0]
    assert "cpu" in record["backends"]
    rows = {(r["scope"], r["method"]): r for r in record["rows"]}
    whole = rows[("reduce", "g2tr cpu")]
    assert whole["keep_idx_diff"] == 0
    assert whole["assign_diff"] <= record["n_total"] // 100  # fp32 near-ties may round either way
    assert whole["max_abs_err"] < 1e-4
    assert rows[("score", "g2tr cpu")]["max_abs_err"] < 1e-5
    assert rows[("select", "g2tr cpu")]["keep_idx_diff"] == 0


def test_markdown_names_the_machine_and_the_table(bench_out):
    text = (bench_out / "bench.md").read_text()
    assert "## Machine" in text and "torch" in text
    assert "| stage | method | median |" in text
    assert "estimate, not measured" in text.lower() or "ESTIMATE, NOT MEASURED" in text


def test_unknown_workload_is_a_clear_error():
    with pytest.raises(SystemExit, match="unknown workload 'X9'"):
        main(["bench", "--workloads", "X9"])


def test_module_entry_point_parses_arguments():
    done = subprocess.run([sys.executable, "-m", "g2tr_kernels", "bench", "--help"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for flag in ("--workloads", "--dtype", "--keep-ratio", "--device", "--repeats", "--large", "--scaling", "--e2e", "--out"):
        assert flag in done.stdout
