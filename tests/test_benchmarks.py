"""The benchmarks run in their `--quick` modes (so that they cannot rot), and the pieces of the claim reproduction.

Both scripts run as subprocesses, exactly as a user runs them, offline, on one thread, with caches under tmp.
"""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
PERF = REPO_ROOT / "benchmarks" / "perf.py"
REPRODUCE = REPO_ROOT / "benchmarks" / "reproduce_claim.py"
RATIO_LINE = re.compile(r"^ratio (\w+) = (\S+)", re.MULTILINE)
PERF_RATIOS = {
    "pipeline_overhead",
    "dinof_over_baseline",
    "ode_heun_overhead",
    "ode_rk45_overhead",
    "flow_log_prob_vs_normflows",
    "flow_sample_vs_normflows",
    "flow_train_step_vs_normflows",
    "evaluation_two_processes",
}


def run_script(script, args, tmp_path, timeout=900):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p),
        "DINOF_CACHE_DIR": str(tmp_path / "dinof_cache"),
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "MPLBACKEND": "Agg",
    }
    result = subprocess.run(
        [sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp_path
    )
    if result.returncode != 0:
        raise AssertionError(
            f"{script.name} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
        )
    return result


def load_module(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------------------------------
# benchmarks/perf.py
# ---------------------------------------------------------------------------------------------------------------------


def test_perf_quick_prints_finite_positive_ratios_and_writes_json(tmp_path):
    output = tmp_path / "perf.json"
    result = run_script(PERF, ["--quick", "--threads", "1", "--output", str(output)], tmp_path)
    printed = {name: float(value) for name, value in RATIO_LINE.findall(result.stdout)}
    assert set(printed) == PERF_RATIOS, result.stdout
    for name, value in printed.items():
        assert math.isfinite(value) and value > 0, (name, value)
    assert "torch" in result.stdout and "torch_threads 1" in result.stdout  # the environment line

    report = json.loads(output.read_text())
    assert report["mode"] == "quick" and report["environment"]["torch"] == torch.__version__
    assert set(report["ratios"]) == PERF_RATIOS
    for name, entry in report["ratios"].items():
        assert entry["value"] == pytest.approx(printed[name], rel=1e-3)
    # the flow comparison is apples to apples: the same log p to float64 precision
    checks = report["ratios"]["flow_log_prob_vs_normflows"]
    assert checks["float64_log_prob_max_relative_difference"] < 1e-8
    overhead = report["ratios"]["dinof_over_baseline"]
    assert overhead["nfe_ratio"] == pytest.approx(0.6) and overhead["ideal"] > 0.6
    timings = dict(re.findall(r"^timing (\w+) = (\S+) ms", result.stdout, re.MULTILINE))
    assert set(timings) == set(report["timings"]) == {"ncsnpp_forward", "ncsnpp_forward_backward"}
    assert all(float(value) > 0 for value in timings.values())
    evaluation = report["ratios"]["evaluation_two_processes"]
    assert evaluation["value"] == pytest.approx(evaluation["images_per_second_2"] / evaluation["images_per_second_1"])


# ---------------------------------------------------------------------------------------------------------------------
# benchmarks/reproduce_claim.py
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reproduce():
    return load_module(REPRODUCE)


def test_plan_and_nfe(reproduce):
    plan = reproduce.row_plan([1000, 500], [1000])
    assert plan == [("baseline", 1000), ("baseline", 500), ("dinof", 1000), ("dinof", 500), ("gaussian", 1000)]
    assert reproduce.nfe_per_sample("baseline", 1000, 0.6, 1) == 2000
    assert reproduce.nfe_per_sample("dinof", 1000, 0.6, 1) == 1200
    assert reproduce.nfe_per_sample("gaussian", 100, 0.6, 1) == 120
    assert reproduce.nfe_per_sample("dinof", 500, 0.6, 0) == 300


@pytest.mark.parametrize("sde_type", ["ve", "vp"])
def test_gaussian_control_matches_the_marginal_moments_at_t_star(reproduce, sde_type):
    from dinof_diffusers.schedulers import DiNofScheduler

    scheduler = DiNofScheduler(sde_type=sde_type, sigma_max=10.0, flow_start=0.6)
    pipeline = type("P", (), {"scheduler": scheduler})()
    data_mean, data_var = reproduce.data_statistics(*scheduler.data_range)
    mean, std = reproduce.ClaimSampler(pipeline, data_mean, data_var).control_moments()
    if sde_type == "ve":  # x(t*) = x0 + sigma(t*) n
        mean_coeff, sigma = 1.0, 0.01 * (10.0 / 0.01) ** 0.6
    else:  # the VP marginal (docs/DESIGN.md, "The SDEs")
        log_mean = -0.25 * 0.6**2 * (20.0 - 0.1) - 0.5 * 0.6 * 0.1
        mean_coeff, sigma = math.exp(log_mean), math.sqrt(1.0 - math.exp(2.0 * log_mean))
    torch.testing.assert_close(mean.double(), mean_coeff * data_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(std.double(), (mean_coeff**2 * data_var + sigma**2).sqrt(), rtol=1e-5, atol=1e-6)
    assert mean.shape == std.shape == (1, 1, reproduce.RESOLUTION, reproduce.RESOLUTION)
    # the digits have a dark background and bright strokes: the moments vary over the image
    assert data_var.max() > 10 * data_var.min()


def test_reproduce_quick_end_to_end(tmp_path):
    output_dir = tmp_path / "reproduce"
    result = run_script(REPRODUCE, ["--quick", "--output_dir", str(output_dir)], tmp_path)
    for name in ("results.md", "results.json", "quality_vs_nfe.png", "grids/data.png"):
        assert (output_dir / name).is_file(), name
    assert not list(output_dir.rglob(".tmp-*"))
    for model in ("ve", "vp"):
        assert (output_dir / "models" / model / "model_index.json").is_file()
        # the baseline starts at T: the score network must have been trained there too
        arguments = json.loads((output_dir / "models" / f"{model}.training.json").read_text())["arguments"]
        assert arguments[arguments.index("--score_time_range") + 1] == "full"
        assert arguments[arguments.index("--sde") + 1] == model

    report = json.loads((output_dir / "results.json").read_text())
    rows = report["rows"]
    data = [row for row in rows if row["sampler"] == "data"]
    assert len(data) == 1
    steps = report["meta"]["steps"]
    expected = {(m, s, n) for m in ("ve", "vp") for s in ("baseline", "dinof") for n in steps}
    expected |= {(m, "gaussian", max(steps)) for m in ("ve", "vp")}
    generated = [row for row in rows if row["sampler"] != "data"]
    assert {(row["model"], row["sampler"], row["n"]) for row in generated} == expected
    for row in generated:
        steps_expected = row["n"] if row["sampler"] == "baseline" else int(0.6 * row["n"] + 1e-9)
        assert row["steps"] == steps_expected and row["nfe"] == 2 * steps_expected, row  # one Langevin step each
        assert row["seconds_per_image"] > 0 and row["num_samples"] == report["meta"]["num_samples"]
        assert (Path(row["grid"])).is_file()
        assert len(list(Path(row["samples_dir"]).glob("*.png"))) == row["num_samples"]
    for row in rows:
        for key in ("fid", "kid", "confidence"):
            assert math.isfinite(row[key]), (row["model"], row["sampler"], key)
        assert 1.0 <= row["confidence"] <= 10.0 + 1e-6

    pairs = report["paired_differences"]
    assert {(pair["model"], pair["n"]) for pair in pairs} == {(m, max(steps)) for m in ("ve", "vp")}
    for pair in pairs:
        assert 0 <= pair["mean_abs_difference"] <= 255 and 0 <= pair["identical_fraction"] <= 1

    table = (output_dir / "results.md").read_text()
    assert "| model | sampler | N | steps | NFE | FID | KID | confidence | s/img |" in table
    assert table.count("\n| v") == len(generated) + len(pairs)  # the quality table, then the paired differences
    assert "sampling ~" in result.stdout + result.stderr  # the cost estimate is shown before sampling
