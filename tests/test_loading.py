"""Loading and using DiNofPipeline like any diffusers pipeline: `DiffusionPipeline.from_pretrained` after the import,
the self-contained (`bundle_code=True`) copy loaded where the package cannot be imported, the scheduler family, NumPy
integers, non-finite output, local folders against Hub ids, and training_scripts/sample.py."""

import argparse
import ast
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DiffusionPipeline
from test_gaussian_prior import gaussian_pipeline
from test_ncsnpp import PUBLISHED_KINDS
from test_pipeline import cheap_pipeline, run, tiny_pipeline

from dinof_diffusers import DiNofPipeline, DiNofScheduler, FlowPriorModel, GaussianPriorModel, NCSNppModel
from dinof_diffusers.hub_utils import is_local_path, model_file
from dinof_diffusers.training import resolve_run_config

REPO_ROOT = Path(__file__).resolve().parents[1]


def load_quietly(loader, *args, **kwargs):
    pipeline = loader(*args, **kwargs)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


# ----------------------------------------------------------------------------------------------------------------------
# DiffusionPipeline.from_pretrained and the self-contained copy
# ----------------------------------------------------------------------------------------------------------------------


def test_diffusion_pipeline_loads_a_saved_folder_after_the_import(tmp_path):
    tiny_pipeline().save_pretrained(tmp_path)
    loaded = load_quietly(DiffusionPipeline.from_pretrained, tmp_path)
    assert type(loaded) is DiNofPipeline and type(loaded.flow_prior) is FlowPriorModel
    reference = load_quietly(DiNofPipeline.from_pretrained, tmp_path)
    assert torch.equal(run(loaded).images, run(reference).images)


# Runs in a fresh interpreter in which `dinof_diffusers` cannot be imported (a meta-path finder refuses it before the
# editable install's finder or any sys.path entry is asked): loads the bundled folder with diffusers alone, samples,
# and saves the loaded pipeline again with bundle_code=True.
WITHOUT_THE_PACKAGE = r"""
import importlib.abc
import sys


class RefuseThePackage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "dinof_diffusers":
            raise ModuleNotFoundError(f"{name} is not installed here")


sys.meta_path.insert(0, RefuseThePackage())
import numpy as np
import torch
from diffusers import DiffusionPipeline

torch.set_num_threads(int(sys.argv[1]))
for folder in sys.argv[2:]:
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    module = sys.modules[type(pipe).__module__]
    assert module.__name__ == "diffusers_modules.local.pipeline_dinof", module.__name__
    # one class per name: the components are of the classes the pipeline file imported
    for component in (pipe.flow_prior, pipe.scheduler):
        assert type(component) is getattr(module, type(component).__name__), type(component)
    images = pipe(num_inference_steps=4, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    np.save(f"{folder}-images.npy", images.numpy())
    pipe.save_pretrained(f"{folder}-again", bundle_code=True)
assert not [name for name in sys.modules if name.split(".")[0] == "dinof_diffusers"]
"""


def code_files(folder):
    return {str(path.relative_to(folder)): path.read_text() for path in sorted(Path(folder).rglob("*.py"))}


def test_bundled_copy_loads_without_the_package(tmp_path):
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "default")
    assert not code_files(tmp_path / "default")  # the default save stays package-based
    bundled = tmp_path / "bundled"
    pipe.save_pretrained(bundled, bundle_code=True)
    index = json.loads((bundled / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_dinof", "DiNofPipeline"] and index["unet"] == [
        "diffusers",
        "UNet2DModel",
    ]
    assert index["scheduler"] == ["scheduler_component", "DiNofScheduler"]
    assert index["flow_prior"] == ["flow_prior_component", "FlowPriorModel"]

    # every folder holds each module its entry file needs, directly or not, under a flat relative import
    files = code_files(bundled)
    for folder, entry in (
        ("", "pipeline_dinof"),
        ("scheduler", "scheduler_component"),
        ("flow_prior", "flow_prior_component"),
    ):
        names = {Path(name).stem for name in files if str(Path(name).parent) == (folder or ".")}
        named_by_entry = set()
        for name in names:
            for node in ast.walk(ast.parse(files[os.path.join(folder, f"{name}.py")])):
                if isinstance(node, ast.ImportFrom) and node.level:
                    assert node.level == 1 and node.module in names, (folder, name, node.module)
                    named_by_entry |= {node.module} if name == entry else set()
        assert named_by_entry == names - {entry}, folder
    assert {"validation", "glow_layout", "flow_prior", "scheduling_dinof", "gaussian_prior"} <= {
        Path(name).stem for name in files if "/" not in name
    }
    # generated from the package's source: only the header and the relative imports differ, made flat
    source = (REPO_ROOT / "dinof_diffusers" / "schedulers" / "scheduling_dinof.py").read_text().splitlines()
    copy = files["scheduler/scheduling_dinof.py"].splitlines()
    assert copy[0].startswith("# Generated") and len(copy) == len(source) + 1
    changed = [(original, line) for original, line in zip(source, copy[1:]) if line != original]
    assert changed and all(
        re.sub(r"^(\s*)from \.+(?:\w+\.)*(\w+) import", r"\1from .\2 import", original) == line
        for original, line in changed
    )

    # the installed package loads the bundled folder with its own classes, no remote code
    loaded = load_quietly(DiNofPipeline.from_pretrained, bundled)
    assert type(loaded.scheduler) is DiNofScheduler and type(loaded.flow_prior) is FlowPriorModel
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(bundled)
    run_config = resolve_run_config(argparse.Namespace(pretrained_model_name_or_path=str(bundled)))
    assert run_config.pretrained_kind == "dinof" and run_config.flow_prior == "pretrained"  # train.py's reading

    # a GaussianPriorModel prior and an NCSNppModel score network: their modules are bundled as well
    scheduler, prior = gaussian_pipeline()
    torch.manual_seed(0)
    ncsnpp = NCSNppModel(**dict(PUBLISHED_KINDS["ncsnpp-ve"], in_channels=1)).eval()
    gaussian = tmp_path / "gaussian"
    DiNofPipeline(unet=ncsnpp, scheduler=scheduler, flow_prior=prior).save_pretrained(gaussian, bundle_code=True)
    index = json.loads((gaussian / "model_index.json").read_text())
    assert index["flow_prior"][1] == "GaussianPriorModel" and index["unet"] == ["unet_component", "NCSNppModel"]
    assert {"gaussian_prior.py", "validation.py"} <= {path.name for path in (gaussian / "flow_prior").glob("*.py")}
    assert {"ncsnpp.py", "ncsnpp_layers.py"} <= {path.name for path in (gaussian / "unet").glob("*.py")}

    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    command = [sys.executable, "-c", WITHOUT_THE_PACKAGE, str(torch.get_num_threads()), str(bundled), str(gaussian)]
    result = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    gaussian_loaded = load_quietly(DiNofPipeline.from_pretrained, gaussian)
    assert type(gaussian_loaded.flow_prior) is GaussianPriorModel and type(gaussian_loaded.unet) is NCSNppModel
    for folder, original in ((bundled, loaded), (gaussian, gaussian_loaded)):
        np.testing.assert_array_equal(np.load(f"{folder}-images.npy"), run(original).images.numpy())
        assert code_files(f"{folder}-again") == code_files(folder)  # a bundled pipeline bundles again, the same


def test_push_to_hub_uploads_the_bundled_copy_without_checkpoints(tmp_path, monkeypatch):
    from dinof_diffusers.training import checkpoints

    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path)  # what train.py saves: package-based, beside its checkpoints and logs
    uploads = []
    monkeypatch.setattr(checkpoints, "create_repo", lambda repo_id, **kwargs: argparse.Namespace(repo_id=repo_id))
    monkeypatch.setattr(checkpoints, "upload_folder", lambda **kwargs: uploads.append(kwargs))
    run = argparse.Namespace(
        output_dir=str(tmp_path), hub_model_id="you/dinof", hub_private_repo=False, hub_token=None, logging_dir="logs"
    )
    assert checkpoints.push_to_hub(run, pipe, commit_message="DiNof") == "you/dinof"
    (upload,) = uploads
    assert upload["repo_id"] == "you/dinof" and upload["folder_path"] == str(tmp_path)
    assert {"checkpoint-*", "logs/*", "samples/*"} <= set(upload["ignore_patterns"])
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_dinof", "DiNofPipeline"]  # trust_remote_code=True loads it
    assert (tmp_path / "pipeline_dinof.py").is_file() and (tmp_path / "scheduler" / "scheduler_component.py").is_file()


# ----------------------------------------------------------------------------------------------------------------------
# Arguments: the scheduler family, NumPy integers, non-finite output
# ----------------------------------------------------------------------------------------------------------------------


def test_a_scheduler_of_another_family_is_refused(tmp_path):
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match="DiNofPipeline needs a DiNofScheduler.*DDPMScheduler"):
        DiNofPipeline(unet=pipe.unet, scheduler=DDPMScheduler(), flow_prior=pipe.flow_prior)
    scheduler = pipe.scheduler
    with pytest.raises(ValueError, match="needs a DiNofScheduler"):
        pipe.scheduler = DDPMScheduler()
    assert pipe.scheduler is scheduler
    pipe.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="needs a DiNofScheduler"):
        DiNofPipeline.from_pretrained(tmp_path, scheduler=DDPMScheduler())
    pipe.scheduler = DiNofScheduler.from_config(scheduler.config, corrector="none")  # the same family is fine


def test_numpy_integers_are_accepted():
    pipe = tiny_pipeline()
    expected = run(pipe, batch_size=2, num_inference_steps=3)
    output = run(pipe, batch_size=np.int64(2), num_inference_steps=np.int32(3))
    assert torch.equal(output.images, expected.images) and output.nfe == expected.nfe
    with pytest.raises(ValueError, match="batch_size"):
        run(pipe, batch_size=np.float64(2.0))
    # and where the ODE likelihood validates integers (an analytic score network: a quick, smooth ODE)
    pipe, _ = cheap_pipeline()
    images = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    likelihoods = [
        pipe.log_likelihood(images, batch_size=size, num_bits=bits, generator=torch.Generator().manual_seed(0))
        for size, bits in ((1, 8), (np.int64(1), np.int64(8)))
    ]
    assert torch.equal(likelihoods[0].bits_per_dim, likelihoods[1].bits_per_dim)


def test_non_finite_output_warns_once_per_call(caplog):
    pipe = tiny_pipeline()
    with caplog.at_level(logging.WARNING):
        run(pipe, batch_size=2)
    assert "non-finite" not in caplog.text
    with torch.no_grad():
        pipe.unet.conv_out.bias[0] = float("nan")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        images = run(pipe, batch_size=2).images
    assert torch.isnan(images).all()
    warnings = [record.getMessage() for record in caplog.records if "non-finite" in record.getMessage()]
    assert warnings == ["2 of the 2 generated images hold non-finite values (NaN or inf), which become black pixels: "
                        "the score network or the prior gives non-finite outputs (e.g. weights of a diverged training "
                        "run)."]  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# Local folders and Hub ids
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """The Hub offline, an empty cache, and a working folder holding a folder "outputs"."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "outputs").mkdir()
    monkeypatch.chdir(tmp_path)
    return str(tmp_path / "cache")


def test_a_mistyped_folder_is_no_such_folder_and_an_unreachable_hub_id_offline_or_not_found(offline_hub):
    # "outputs/pipline": "outputs" is a folder here, so this is a path (the Hub is not tried), as are these
    for name in ("outputs/pipline", "outputs/demo/pipline", "./pipline"):
        assert is_local_path(name)
        with pytest.raises(FileNotFoundError, match=f"No such folder: '{name}'"):
            DiNofPipeline.from_pretrained(name, cache_dir=offline_hub)
    assert not is_local_path("dinof-test/missing")
    with pytest.raises(OSError, match="'dinof-test/missing' cannot be read \\(offline / not found\\)"):
        DiNofPipeline.from_pretrained("dinof-test/missing", cache_dir=offline_hub)
    # the training path reads single files: offline and not cached is not "absent" (LocalEntryNotFoundError is an
    # EntryNotFoundError, as a file the repository lacks is)
    with pytest.raises(OSError, match="offline / not found"):
        model_file("dinof-test/missing", "model_index.json", cache_dir=offline_hub)


# ----------------------------------------------------------------------------------------------------------------------
# training_scripts/sample.py
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample_script():
    spec = importlib.util.spec_from_file_location("sample_script", REPO_ROOT / "training_scripts" / "sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sample_compares_dinof_and_the_baseline_on_one_grid(sample_script, tmp_path):
    tiny_pipeline(flow_start=0.6).save_pretrained(tmp_path / "pipeline")  # N = 50 noise scales
    out = tmp_path / "out"
    base = ["--pipeline", str(tmp_path / "pipeline"), "--output_dir", str(out), "--num_images", "2", "--device", "cpu"]
    sample_script.main([*base, "--compare_baseline", "--num_inference_steps", "10"])
    report = json.loads((out / "sampling.json").read_text())
    assert report["baseline"]["steps"] == 10 and report["dinof"]["steps"] == 6  # int(10 * 0.6) from t*
    assert report["dinof"]["nfe"] / report["baseline"]["nfe"] == 0.6
    assert (out / "dinof.png").is_file() and (out / "baseline.png").is_file()
    assert report["dinof"]["prior"] == "flow" and report["baseline"]["prior"] == "sde"
    assert report["dinof"]["sampler"] == "pc" and "ode_solver" not in report["dinof"]
    sample_script.main([*base, "--num_inference_steps", "10"])  # alone: DiNof's own steps from t*
    assert json.loads((out / "sampling.json").read_text())["dinof"]["steps"] == 10

    # The probability-flow ODE, same rule on steps: Heun's n steps cost 2n - 1 evaluations.
    sample_script.main([*base, "--compare_baseline", "--num_inference_steps", "10", "--sampler", "ode",
                        "--ode_solver", "heun", "--timestep_spacing", "karras"])  # fmt: skip
    report = json.loads((out / "sampling.json").read_text())
    assert (report["baseline"]["steps"], report["baseline"]["nfe"]) == (10, 19)
    assert (report["dinof"]["steps"], report["dinof"]["nfe"]) == (6, 11)
    for name, prior in (("dinof", "flow"), ("baseline", "sde")):
        assert {key: report[name][key] for key in ("prior", "sampler", "ode_solver", "timestep_spacing")} == {
            "prior": prior, "sampler": "ode", "ode_solver": "heun", "timestep_spacing": "karras",
        }  # fmt: skip
    sample_script.main([*base, "--prior", "sde", "--sampler", "ode", "--ode_solver", "rk45", "--rtol", "1e-3"])
    report = json.loads((out / "sampling.json").read_text())
    assert list(report) == ["baseline"] and report["baseline"]["rtol"] == 1e-3 and report["baseline"]["atol"] == 1e-5
    assert report["baseline"]["nfe"] > 0 and report["baseline"]["use_flow_prior"] is False


def test_sample_reports_bad_input_clearly(sample_script, tmp_path, capsys):
    tiny_pipeline().save_pretrained(tmp_path / "pipeline")
    tiny_pipeline(flow=False, continuous=False).save_pretrained(tmp_path / "discrete")
    (tmp_path / "a_file").write_text("")
    pipeline = ["--pipeline", str(tmp_path / "pipeline")]
    out = [*pipeline, "--output_dir", str(tmp_path)]
    discrete = ["--pipeline", str(tmp_path / "discrete"), "--output_dir", str(tmp_path)]
    cases = [
        ([*pipeline, "--output_dir", str(tmp_path / "a_file")], "--output_dir .* is a file"),
        ([*pipeline, "--output_dir", str(tmp_path / "a_file" / "under")], "--output_dir .* cannot be written to"),
        (["--pipeline", str(tmp_path / "pipline"), "--output_dir", str(tmp_path)], "No such folder"),
        ([*out, "--num_inference_steps", "80"], "num_inference_steps"),
        ([*out, "--num_inference_steps", "1", "--compare_baseline"], "0 steps"),
        # the prior and the sampler: a flag the choice would ignore, and what only the pipeline can tell
        ([*out, "--ode_solver", "heun"], "--ode_solver: only with --sampler ode"),
        ([*out, "--sampler", "ode", "--ode_solver", "rk45", "--num_inference_steps", "4"], "does not apply to .*rk45"),
        ([*out, "--sampler", "ode", "--atol", "1e-3"], "--atol: rk45's tolerances"),
        ([*out, "--prior", "sde", "--flow_temperature", "0.5"], "--flow_temperature has no effect"),
        ([*out, "--prior", "sde", "--compare_baseline"], "--compare_baseline"),
        ([*out, "--sampler", "dinof"], "invalid choice|must be one of"),  # the deprecated names are evaluate.py's
        ([*discrete, "--prior", "flow"], "^2 .*--prior flow needs a pipeline with a flow prior"),
        ([*discrete, "--sampler", "ode"], "^2 .*--sampler ode: .*continuous-time model"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            sample_script.main([*argv, "--num_images", "1", "--device", "cpu"])
        text = f"{exit_info.value.code} {capsys.readouterr().err}"
        assert exit_info.value.code != 0 and re.search(message, text, re.S), (argv, text)
    assert not (tmp_path / "sampling.json").exists()


def test_readme_says_how_to_run_the_installed_tools():
    readme = (REPO_ROOT / "README.md").read_text()
    first_lines = readme.split("```bash\n", 1)[1].splitlines()[:2]
    assert first_lines[0].startswith("make demo") and first_lines[1].startswith("make test")
    assert "source .venv/bin/activate" in readme
