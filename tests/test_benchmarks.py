"""The benchmarks run in their `--quick` modes (so that they cannot rot), and the pieces of the claim reproduction.

The scripts run as subprocesses, exactly as a user runs them, offline, on one thread, with caches under tmp.
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
STUDY = REPO_ROOT / "benchmarks" / "flow_gain_study.py"
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
    args = reproduce.parse_args(["--steps", "1000", "500", "--heun_steps", "5", "50", "--repeat_seeds", "0", "2"])
    assert args.control_steps == [1000] and args.repeat_seeds == [2] and args.rk45_tolerance == 1e-5
    assert reproduce.row_plan(args) == [
        ("sde", "pc", 1000, 0), ("sde", "pc", 500, 0), ("flow", "pc", 1000, 0), ("flow", "pc", 500, 0),
        ("gaussian", "pc", 1000, 0), ("sde", "heun", 50, 0), ("sde", "heun", 5, 0), ("flow", "heun", 50, 0),
        ("flow", "heun", 5, 0), ("sde", "rk45", 0, 0), ("flow", "rk45", 0, 0), ("sde", "pc", 500, 2),
        ("flow", "pc", 500, 2),
    ]  # fmt: skip
    args = reproduce.parse_args(["--rk45_tolerance", "0", "--heun_steps", "--repeat_seeds"])
    assert all(sampler == "pc" and seed == 0 for _, sampler, _, seed in reproduce.row_plan(args))
    assert reproduce.nfe_per_sample("sde", "pc", 1000, 0.6, 1) == 2000
    assert reproduce.nfe_per_sample("flow", "pc", 1000, 0.6, 1) == 1200
    assert reproduce.nfe_per_sample("gaussian", "pc", 100, 0.6, 1) == 120
    assert reproduce.nfe_per_sample("flow", "pc", 500, 0.6, 0) == 300
    assert reproduce.nfe_per_sample("flow", "heun", 10, 0.6, 1) == 19  # the last step is Euler's
    for flags in (["--likelihood_images", "298"], ["--rk45_tolerance", "-1"], ["--heun_steps", "0"]):
        with pytest.raises(SystemExit):
            reproduce.parse_args(flags)


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
        # the baseline starts at T: the score network must have been trained there too; on the train digits only
        arguments = json.loads((output_dir / "models" / f"{model}.training.json").read_text())["arguments"]
        assert arguments[arguments.index("--score_time_range") + 1] == "full"
        assert arguments[arguments.index("--sde") + 1] == model
        assert arguments[arguments.index("--digits_split") + 1] == "train"

    report = json.loads((output_dir / "results.json").read_text())
    meta, rows = report["meta"], report["rows"]
    assert meta["reference"] == "digits:test"
    data = [row for row in rows if row["prior"] == "data"]
    assert len(data) == 2 and report["spread"]["data"]["fid"]["draws"] == 2
    steps, heun = meta["steps"], meta["heun_steps"]
    expected = {(m, p, "pc", n, 0) for m in ("ve", "vp") for p in ("sde", "flow") for n in steps}
    expected |= {(m, "gaussian", "pc", max(steps), 0) for m in ("ve", "vp")}
    expected |= {(m, p, "heun", n, 0) for m in ("ve", "vp") for p in ("sde", "flow") for n in heun}
    expected |= {(m, p, "rk45", 0, 0) for m in ("ve", "vp") for p in ("sde", "flow")}
    expected |= {(m, p, "pc", min(steps), 1) for m in ("ve", "vp") for p in ("sde", "flow")}
    generated = [row for row in rows if row["prior"] != "data"]
    assert sorted((r["model"], r["prior"], r["sampler"], r["n"], r["seed"]) for r in generated) == sorted(expected)
    for row in generated:
        if row["sampler"] == "pc":
            steps_expected = row["n"] if row["prior"] == "sde" else int(0.6 * row["n"] + 1e-9)
            assert row["steps"] == steps_expected and row["nfe"] == 2 * steps_expected, row  # one Langevin step each
        elif row["sampler"] == "heun":
            assert row["steps"] == row["n"] and row["nfe"] == 2 * row["n"] - 1, row
        else:
            assert row["nfe"] >= 6, row  # rk45: at least one accepted step of 6 evaluations (+ the first)
        assert row["seconds_per_image"] > 0 and row["num_samples"] == meta["num_samples"]
        assert row["grid"] is None if row["seed"] else Path(row["grid"]).is_file()
        assert len(list(Path(row["samples_dir"]).glob("*.png"))) == row["num_samples"]
    for row in rows:
        for key in ("fid", "kid", "confidence"):
            assert math.isfinite(row[key]), (row["model"], row["prior"], row["sampler"], key)
        assert 1.0 <= row["confidence"] <= 10.0 + 1e-6
    assert len(report["spread"]["repeats"]) == 4

    likelihood = report["likelihood"]
    assert set(likelihood) == {"ve", "vp"}
    for bits in likelihood.values():
        flow, sde, difference = bits["priors"]["flow"], bits["priors"]["sde"], bits["difference"]
        assert flow["num_images"] == sde["num_images"] == bits["num_images"] == 4
        assert math.isclose(difference["bits_per_dim"], flow["bits_per_dim"] - sde["bits_per_dim"], abs_tol=1e-9)
        for estimate in (flow, sde, difference):
            assert math.isfinite(estimate["bits_per_dim"]) and estimate["bits_per_dim_se"] > 0
        assert bits["nfe"]["flow"] > 0 and bits["nfe"]["sde"] > 0

    pairs = report["paired_differences"]
    assert {(pair["model"], pair["n"]) for pair in pairs} == {(m, max(steps)) for m in ("ve", "vp")}
    for pair in pairs:
        assert 0 <= pair["mean_abs_difference"] <= 255 and 0 <= pair["identical_fraction"] <= 1

    table = (output_dir / "results.md").read_text()
    assert "| model | prior | sampler | N | steps | NFE | FID | KID | confidence | s/img |" in table
    main_rows = [row for row in generated if row["seed"] == 0]
    # the quality table, the repeats, the bits/dim table, then the paired differences
    assert table.count("\n| v") == len(main_rows) + 4 + 2 + len(pairs)
    assert "DiNof - baseline" in table
    assert "sampling ~" in result.stdout + result.stderr  # the cost estimate is shown before sampling


# ---------------------------------------------------------------------------------------------------------------------
# benchmarks/flow_gain_study.py
# ---------------------------------------------------------------------------------------------------------------------


def test_flow_gain_study_quick_end_to_end(tmp_path):
    """The study's stages on the digits with tiny everything (one t*, one flow size): a score network, a flow, both
    Gaussian priors through train.py, the diagnostic with two seeds, the report and the plots."""
    output_dir = tmp_path / "study"
    run_script(STUDY, ["--quick", "--datasets", "digits", "--output_dir", str(output_dir)], tmp_path)
    for name in ("results.md", "results.json", "flow_gain_study.png", "flow_training.png"):
        assert (output_dir / name).is_file(), name
    assert not list(output_dir.rglob(".tmp-*"))
    models = output_dir / "digits" / "models"
    for name in ("score", "flow-tiny-t0.6", "gaussian-full-t0.6", "gaussian-diagonal-t0.6"):
        assert (models / name / "model_index.json").is_file(), name
    prior = json.loads((models / "gaussian-diagonal-t0.6" / "flow_prior" / "config.json").read_text())
    assert prior["_class_name"] == "GaussianPriorModel" and prior["covariance"] == "diagonal"
    assert prior["flow_start"] == 0.6 and prior["num_images"] == 1500  # the training split only
    flow_index = json.loads((models / "flow-tiny-t0.6" / "model_index.json").read_text())
    assert flow_index["flow_prior"][1] == "FlowPriorModel"
    score_arguments = json.loads((models / "score.arguments.json").read_text())
    assert score_arguments[score_arguments.index("--score_time_range") + 1] == "full"

    report = json.loads((output_dir / "results.json").read_text())
    digits = report["datasets"]["digits"]
    state = json.loads((output_dir / "digits" / "state.json").read_text())
    assert set(state["stages"]) == {
        "data", "score", "flow-tiny-t0.6", "gaussian-full-t0.6", "gaussian-diagonal-t0.6", "flow_gain-seed0",
        "flow_gain-seed1",
    }  # fmt: skip
    nll = digits["seeds"]["0"]["nll"]["0.6"]
    assert set(nll["shares"]) == {"flow_tiny", "fitted_full", "fitted_diagonal"}
    test_nll = nll["nll"]["test"]
    for covariance in ("full", "diagonal"):  # train.py's priors are flow_gain.py's closed-form ones
        fitted, closed = test_nll[f"fitted_{covariance}"], test_nll[f"gaussian_{covariance}"]
        assert fitted["bits_per_dim"] == pytest.approx(closed["bits_per_dim"], abs=1e-5)
    quality = digits["seeds"]["0"]["quality"]
    rows = {"t0.6/flow_tiny", "t0.6/gaussian_full", "t0.6/gaussian_diagonal", "t0.6/baseline", "N10/baseline"}
    assert rows <= set(quality)
    assert set(digits["seeds"]["1"]["quality"]) >= {"t0.6/flow_tiny", "t0.6/gaussian_full"}
    assert quality["t0.6/flow_tiny"]["nfe"] == quality["t0.6/baseline"]["nfe"] == 2 * 6  # int(10 * 0.6) steps
    chunks = digits["flows"]["flow-tiny-t0.6"]["chunks"]
    assert chunks[-1]["stop"] == "budget" and math.isfinite(chunks[-1]["held_out_bits_per_dim"])
    table = (output_dir / "results.md").read_text()
    assert "| digits | 0.6 |" in table and "flow tiny: gain" in table
