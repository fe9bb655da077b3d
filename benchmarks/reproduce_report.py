# Copyright 2024 The dinof-diffusers authors. Licensed under the Apache License, Version 2.0.
"""The report of `reproduce_claim.py`: its rows, the markdown tables (quality, spread, bits/dim, paired differences),
`results.json` and the quality-against-NFE plot."""

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from dinof_diffusers.file_utils import atomic_write_path, write_json_atomically, write_text_atomically

# the prior that starts the reverse process, and what the report calls it
PRIORS = {"sde": "baseline", "flow": "DiNof", "gaussian": "control"}
SAMPLERS = ("pc", "heun", "rk45")


@dataclass
class Row:
    """One line of the results table: `n` is PC's N, Heun's number of steps, 0 for rk45 and the data."""

    model: str
    prior: str
    sampler: str
    n: int
    steps: int
    nfe: Optional[float]
    fid: float
    kid: float
    kid_std: float
    confidence: float
    confidence_std: float
    seconds_per_image: Optional[float]
    num_samples: int
    samples_dir: str
    grid: Optional[str]
    threads: Optional[int] = None
    seed: int = 0

    @property
    def name(self) -> str:
        if self.prior == "data":
            return f"data-{self.seed}"
        return f"{self.model}-{self.prior}-{self.sampler}" + (f"-{self.n}" if self.n else "") + f"-s{self.seed}"


def make_row(model, prior, sampler, n, steps, nfe, metrics, seconds, num_samples, samples_dir, grid, seed=0) -> Row:
    return Row(
        model=model,
        prior=prior,
        sampler=sampler,
        n=n,
        steps=steps,
        nfe=nfe,
        fid=metrics["frechet_inception_distance"],
        kid=metrics["kernel_inception_distance_mean"],
        kid_std=metrics["kernel_inception_distance_std"],
        confidence=metrics["classifier_confidence_score_mean"],
        confidence_std=metrics["classifier_confidence_score_std"],
        seconds_per_image=seconds,
        num_samples=num_samples,
        samples_dir=str(samples_dir),
        grid=grid,
        seed=seed,
    )


def load_dump(samples_dir: Path) -> np.ndarray:
    from PIL import Image

    files = sorted(Path(samples_dir).glob("[0-9]*.png"))
    return np.stack([np.asarray(Image.open(file), dtype=np.float64) for file in files])


def paired_differences(rows: List[Row]) -> List[Dict]:
    """How much the start changes the output, sample by sample (the dumps share their seeds).

    For every DiNof PC dump with a control dump of the same model and N: the mean absolute pixel difference (grey
    levels, 0 to 255) between sample i of the two dumps, and the fraction of samples that are identical. Both run the
    same steps with the same noise, only x(t*) differs; the reverse SDE can forget where it started, and then both end
    in (nearly) the same image. (The baseline draws other noise at the same steps, so it is not compared this way.)
    """
    by_key = {(row.model, row.prior, row.sampler, row.n, row.seed): row for row in rows}
    results = []
    for (model, prior, sampler, n, seed), row in by_key.items():
        control = by_key.get((model, "gaussian", sampler, n, seed))
        if prior != "flow" or control is None:
            continue
        dinof, images = load_dump(row.samples_dir), load_dump(control.samples_dir)
        count = min(len(images), len(dinof))
        difference = np.abs(dinof[:count] - images[:count]).reshape(count, -1)
        results.append(
            {
                "model": model,
                "n": n,
                "mean_abs_difference": float(difference.mean()),
                "identical_fraction": float((difference.max(axis=1) == 0).mean()),
            }
        )
    return results


def sampler_label(row: Row) -> str:
    if row.sampler == "pc":
        return "PC"
    if row.sampler == "heun":
        return "ODE heun"
    return "ODE rk45"


def markdown_table(rows: List[Row], header: str) -> str:
    lines = [
        header,
        "",
        "| model | prior | sampler | N | steps | NFE | FID | KID | confidence | s/img |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        data = row.prior == "data"
        prior = "data" if data else f"{row.prior} ({PRIORS[row.prior]})"
        n = str(row.n) if row.sampler == "pc" else "-"
        steps = "-" if data else ("adaptive" if row.sampler == "rk45" else str(row.steps))
        nfe = "-" if data else f"{row.nfe:.0f}"
        seconds = "-" if row.seconds_per_image is None else f"{row.seconds_per_image:.3f}"
        lines.append(
            f"| {row.model} | {prior} | {'-' if data else sampler_label(row)} | {n} | {steps} | {nfe} | "
            f"{row.fid:.2f} | {row.kid:.4f} ± {row.kid_std:.4f} | {row.confidence:.2f} | {seconds} |"
        )
    return "\n".join(lines) + "\n"


def spread(rows: List[Row]) -> Dict:
    """The noise of the quality numbers: the data rows over their draws, and every row repeated with other seeds."""
    floor = [row for row in rows if row.prior == "data"]
    result = {"data": {}, "repeats": []}
    if floor:
        for key in ("fid", "kid", "confidence"):
            values = np.array([getattr(row, key) for row in floor])
            sd = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
            result["data"][key] = {"mean": float(values.mean()), "sd": sd, "min": float(values.min()),
                                   "max": float(values.max()), "draws": len(values)}  # fmt: skip
    by_key = {}
    for row in rows:
        if row.prior != "data":
            by_key.setdefault((row.model, row.prior, row.sampler, row.n), []).append(row)
    for (model, prior, sampler, n), group in by_key.items():
        if len(group) > 1:
            group = sorted(group, key=lambda row: row.seed)
            result["repeats"].append(
                {"model": model, "prior": prior, "sampler": sampler, "n": n, "seeds": [row.seed for row in group],
                 "fid": [row.fid for row in group], "confidence": [row.confidence for row in group]}
            )  # fmt: skip
    return result


def spread_text(noise: Dict) -> str:
    lines = []
    data = noise["data"]
    if data:
        fid, confidence = data["fid"], data["confidence"]
        lines += [
            f"Noise. `data` over {fid['draws']} random draws of real training digits (the same count as a dump): FID "
            f"{fid['mean']:.2f} ± {fid['sd']:.2f} (sd; {fid['min']:.2f} to {fid['max']:.2f}), confidence "
            f"{confidence['mean']:.2f} ± {confidence['sd']:.2f}.",
            "",
        ]
    if noise["repeats"]:
        lines += ["Rows repeated with other sampling seeds (same weights):", "", "| model | prior | sampler | N | "
                  "seed: FID | seed: confidence |", "|---|---|---|---:|---|---|"]  # fmt: skip
        for repeat in noise["repeats"]:
            fids = ", ".join(f"{seed}: {value:.2f}" for seed, value in zip(repeat["seeds"], repeat["fid"]))
            confidences = ", ".join(
                f"{seed}: {value:.2f}" for seed, value in zip(repeat["seeds"], repeat["confidence"])
            )
            lines.append(
                f"| {repeat['model']} | {repeat['prior']} | {repeat['sampler'].upper()} | {repeat['n']} | {fids} | "
                f"{confidences} |"
            )
    return "\n".join(lines) + ("\n" if lines else "")


def likelihood_text(likelihoods: Dict[str, Dict]) -> str:
    if not likelihoods:
        return ""
    first = next(iter(likelihoods.values()))
    settings = first["settings"]
    lines = [
        f"Bits per dimension of the first {first['num_images']} held-out test digits (8-bit, dequantized, Hutchinson "
        f"({settings['trace_estimator']}) traces, rk45 at rtol = atol = {settings['rtol']:g}, batches of "
        f"{first['batch_size']}): mean ± standard error over images; the difference is paired image by image (the "
        "same dequantization noise and probes for both priors). Lower is better.",
        "",
        "| model | DiNof (flow at t*) | baseline (SDE prior at T) | DiNof - baseline | NFE DiNof / baseline | "
        "s/img DiNof / baseline |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for model, result in likelihoods.items():
        flow, sde, diff = result["priors"]["flow"], result["priors"]["sde"], result["difference"]
        lines.append(
            f"| {model} | {flow['bits_per_dim']:.4f} ± {flow['bits_per_dim_se']:.4f} | {sde['bits_per_dim']:.4f} ± "
            f"{sde['bits_per_dim_se']:.4f} | {diff['bits_per_dim']:+.4f} ± {diff['bits_per_dim_se']:.4f} | "
            f"{result['nfe']['flow']:.0f} / {result['nfe']['sde']:.0f} | {result['seconds_per_image']['flow']:.3f} / "
            f"{result['seconds_per_image']['sde']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def plot_quality(rows: List[Row], path: Path) -> None:
    """FID, KID and confidence against NFE, one row of panels per model: colour = prior, line = sampler (PC solid,
    Heun dashed, rk45 a star), the data floor (mean ± sd over its draws) as a grey band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    models = sorted({row.model for row in rows if row.prior != "data"})
    panels = (("fid", "FID (digit-classifier features)"), ("kid", "KID"), ("confidence", "classifier confidence"))
    figure, axes = plt.subplots(len(models), 3, figsize=(15, 4.2 * len(models)), squeeze=False)
    colors = {"sde": "tab:blue", "flow": "tab:red", "gaussian": "tab:green"}
    styles = {"pc": ("o", "-"), "heun": ("^", "--"), "rk45": ("*", "none")}
    floor = [row for row in rows if row.prior == "data"]
    for model, model_axes in zip(models, axes):
        selected_rows = [row for row in rows if row.model == model and row.seed == 0]
        for axis, (key, label) in zip(model_axes, panels):
            for prior in PRIORS:
                for sampler in SAMPLERS:
                    selected = sorted(
                        (row for row in selected_rows if (row.prior, row.sampler) == (prior, sampler)),
                        key=lambda row: row.nfe,
                    )
                    if not selected:
                        continue
                    marker, line = styles[sampler]
                    axis.errorbar(
                        [row.nfe for row in selected],
                        [getattr(row, key) for row in selected],
                        yerr=[row.kid_std for row in selected] if key == "kid" else None,  # over KID's subsets
                        marker=marker,
                        linestyle=line,
                        color=colors[prior],
                        markersize=12 if sampler == "rk45" else 6,
                        capsize=3,
                        label=f"{prior} ({PRIORS[prior]}) {sampler_label(selected[0])}",
                    )
            if floor:
                values = np.array([getattr(row, key) for row in floor])
                low, high = values.mean() - values.std(), values.mean() + values.std()
                axis.axhspan(low, high, color="grey", alpha=0.25, label=f"real digits (n = {floor[0].num_samples})")
            axis.set_xscale("log")
            axis.xaxis.set_major_formatter(ScalarFormatter())
            axis.xaxis.set_minor_formatter(NullFormatter())
            axis.set_xlabel("NFE per sample (score-network evaluations)")
            axis.set_ylabel(label)
            axis.set_title(f"{model.upper()}: {label}", fontsize=10)
            axis.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    figure.suptitle("Quality against NFE on the digits 16x16: priors (colour) and samplers (line), same weights")
    figure.tight_layout()
    try:
        with atomic_write_path(path) as temporary_path:
            figure.savefig(temporary_path, dpi=100)
    finally:
        plt.close(figure)


def write_report(rows: List[Row], likelihoods: Dict[str, Dict], meta: Dict, output_dir: Path) -> Dict:
    header = "\n".join(
        [
            "# DiNof on the digits: quality against network evaluations",
            "",
            f"{meta['num_samples']} samples per row, seed {meta['seed']} (the same seeds for every row); models "
            f"trained for {meta['max_train_steps']} joint steps on the 1,500 training digits (tiny preset, 16x16x1). "
            "Metrics: torch-fidelity with the offline `dinof-digits` extractor against the 297 held-out test digits; "
            "FID and KID on the digit classifier's features, confidence = the Inception score computed with the "
            "digit classifier (1 to 10, higher is better). With this few samples (and a reference of 297 images) "
            "FID is biased upwards: compare rows with each other and with the `data` row (real training digits, "
            "same count), not with published numbers.",
            "",
            "Priors: `sde` (baseline) = the SDE prior at T; `flow` (DiNof) = the flow sample of x(t*), t* = 0.6 (NFE "
            "excludes the one flow pass); `gaussian` (control) = the moment-matched diagonal Gaussian of x(t*) (per "
            "pixel mean mean_coeff * mu, variance mean_coeff^2 * var + std^2 of the training digits). Samplers: PC "
            "= reverse diffusion + 1 Langevin step, N noise scales (N steps from T, int(0.6 N) from t*); ODE heun = "
            "the probability-flow ODE, Heun steps on EDM's rho = 7 noise-level grid, NFE 2 steps - 1; ODE rk45 = "
            f"adaptive Dormand-Prince at rtol = atol = {meta['rk45_tolerance']:g}. s/img is wall-clock time per "
            "image.",
        ]
    )
    main_rows = [row for row in rows if row.seed == 0]
    pairs = paired_differences(main_rows)
    noise = spread(rows)
    text = markdown_table(main_rows, header) + "\n" + spread_text(noise)
    if likelihoods:
        text += "\n" + likelihood_text(likelihoods)
    if pairs:
        lines = [
            "",
            "`flow` vs `gaussian` with PC, sample by sample: the same steps and the same noise, only x(t*) differs. "
            "Mean absolute difference of sample i of the two dumps (grey levels, 0 to 255) and the fraction of "
            "identical samples. A small difference means the reverse SDE from t* forgets its start (with common "
            "noise, trajectories from different starts converge): there, the flow cannot matter.",
            "",
            "| model | N | mean abs difference | identical |",
            "|---|---:|---:|---:|",
        ]
        for pair in pairs:
            lines.append(
                f"| {pair['model']} | {pair['n']} | {pair['mean_abs_difference']:.3f} | "
                f"{pair['identical_fraction']:.2f} |"
            )
        text += "\n".join(lines) + "\n"
    write_text_atomically(text, output_dir / "results.md")
    report = {"meta": meta, "rows": [asdict(row) for row in rows], "spread": noise, "likelihood": likelihoods,
              "paired_differences": pairs}  # fmt: skip
    write_json_atomically(report, output_dir / "results.json")
    if any(row.prior != "data" for row in rows):
        plot_quality(rows, output_dir / "quality_vs_nfe.png")
    return report
