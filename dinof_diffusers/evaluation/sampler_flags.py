"""The sampler flags that `training_scripts/sample.py` and `training_scripts/evaluate.py` share, in one place.

Two independent choices (docs/DESIGN.md, issue 11's names): the *prior* that starts the reverse process, `--prior
flow` (the pipeline's `flow_prior` at t*: DiNof) or `--prior sde` (the SDE prior at T: the baseline), and the
*sampler* that runs it, `--sampler pc` (the predictor-corrector sampler of the reverse SDE) or `--sampler ode` (the
probability-flow ODE, with `--ode_solver`, `--timestep_spacing`, `--rtol`, `--atol`). The flags become the keywords of
`DiNofPipeline.__call__`; a flag that the chosen prior or sampler would ignore is an error, not a silent no-op.

evaluate.py's older `--sampler dinof|baseline` stays accepted (`accept_deprecated=True`): it warns once and means
`--prior flow|sde --sampler pc`.
"""

import argparse
import warnings
from typing import Any, Dict, Optional

from ..pipelines.dinof.pipeline_dinof import SAMPLERS
from ..schedulers.ode_solvers import ODE_SOLVERS, TIMESTEP_SPACINGS
from ..validation import check_number
from .errors import EvaluationError
from .likelihood import LIKELIHOOD_PRIORS

PRIORS = LIKELIHOOD_PRIORS  # ("flow", "sde")
# evaluate.py's spelling before the ODE sampler existed -> the prior it meant (with the PC sampler)
DEPRECATED_SAMPLERS = {"dinof": "flow", "baseline": "sde"}
DEFAULT_ODE_SOLVER = "heun"  # DiNofPipeline.__call__'s
DEFAULT_TOLERANCE = 1e-5  # rk45's rtol and atol, as published and as the pipeline's defaults
ODE_FLAGS = ("ode_solver", "timestep_spacing")
TOLERANCE_FLAGS = ("rtol", "atol")


class _SamplerAction(argparse.Action):
    """`--sampler pc|ode`; with `accept_deprecated`, also `dinof` / `baseline`, which warn and set the prior."""

    def __init__(self, option_strings, dest, accept_deprecated: bool = False, **kwargs):
        self.accept_deprecated = accept_deprecated
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, value, option_string=None):
        if self.accept_deprecated and value in DEPRECATED_SAMPLERS:
            namespace.deprecated_sampler = value  # `check_sampler_arguments` warns, once
            value = "pc"
        elif value not in SAMPLERS:
            old = f" (deprecated: {', '.join(DEPRECATED_SAMPLERS)})" if self.accept_deprecated else ""
            raise argparse.ArgumentError(self, f"must be one of {list(SAMPLERS)}{old}, got {value!r}.")
        setattr(namespace, self.dest, value)


def add_sampler_arguments(parser: argparse.ArgumentParser, accept_deprecated: bool = False) -> None:
    """Adds `--prior`, `--sampler`, `--ode_solver`, `--timestep_spacing`, `--rtol`, `--atol`, `--flow_temperature`."""
    group = parser.add_argument_group("prior and sampler")
    group.add_argument(
        "--prior",
        default=None,
        choices=PRIORS,
        help="The start of the reverse process: flow = a sample of the pipeline's flow prior at t* (DiNof), sde = the "
        "SDE prior at T (the baseline). Default: flow when the pipeline has a flow prior, else sde.",
    )
    group.add_argument(
        "--sampler",
        default="pc",
        action=_SamplerAction,
        accept_deprecated=accept_deprecated,
        metavar="{pc,ode}",
        help="pc: the predictor-corrector sampler of the reverse SDE (default); ode: the probability-flow ODE "
        "(continuous-time models), deterministic given the prior's sample."
        + (" The old values dinof / baseline mean --prior flow / sde --sampler pc (deprecated)." * accept_deprecated),
    )
    group.add_argument(
        "--ode_solver",
        default=None,
        choices=ODE_SOLVERS,
        help="--sampler ode: heun (2nd order, NFE 2n - 1 for n steps; default), euler (NFE n) or rk45 (adaptive "
        "Dormand-Prince; --rtol / --atol, no --num_inference_steps).",
    )
    group.add_argument(
        "--timestep_spacing",
        default=None,
        choices=TIMESTEP_SPACINGS,
        help="--ode_solver heun / euler: the grid, uniform in t (the PC sampler's, default) or karras (EDM's rho = 7 "
        "spacing of the noise level: better with few steps).",
    )
    for flag in TOLERANCE_FLAGS:
        group.add_argument(
            f"--{flag}",
            type=float,
            default=None,
            help=f"rk45's {'relative' if flag == 'rtol' else 'absolute'} tolerance (--ode_solver rk45, and evaluate.py's "
            f"--likelihood); default {DEFAULT_TOLERANCE:g} as published.",
        )
    group.add_argument(
        "--flow_temperature", type=float, default=None, help="Temperature of the flow prior (--prior flow; default 1)."
    )


def check_sampler_arguments(args: argparse.Namespace, uses_tolerances: bool = False) -> None:
    """Checks the sampler flags against each other (no pipeline needed) and fills in the defaults of the chosen sampler.

    Args:
        args: the parsed flags, with `num_inference_steps`.
        uses_tolerances: whether something other than the sampler uses `--rtol` / `--atol` (evaluate.py's
            `--likelihood`).

    Raises:
        ValueError: naming the flag, for a flag the chosen prior or sampler would ignore and for bad values.
    """
    deprecated = getattr(args, "deprecated_sampler", None)
    if deprecated is not None:
        prior = DEPRECATED_SAMPLERS[deprecated]
        if args.prior not in (None, prior):
            raise ValueError(f"--sampler {deprecated} means --prior {prior}; it contradicts --prior {args.prior}.")
        warnings.warn(
            f"--sampler {deprecated} is deprecated: it means --prior {prior} --sampler pc (the prior and the sampler "
            "are now chosen separately); use those flags.",
            FutureWarning,
            stacklevel=3,
        )
        args.prior, args.deprecated_sampler = prior, None
    for flag in TOLERANCE_FLAGS + ("flow_temperature",):
        check_number(getattr(args, flag), f"--{flag}", minimum=0.0, exclusive_minimum=True, allow_none=True)
    if args.prior == "sde" and args.flow_temperature is not None:
        raise ValueError("--flow_temperature has no effect with --prior sde (the SDE prior at T has no flow).")
    if args.sampler == "pc":
        given = [f"--{flag}" for flag in ODE_FLAGS if getattr(args, flag) is not None]
        if given:
            raise ValueError(
                f"{' and '.join(given)}: only with --sampler ode (the PC sampler is chosen: --sampler pc)."
            )
    else:
        args.ode_solver = args.ode_solver or DEFAULT_ODE_SOLVER
        if args.ode_solver == "rk45":
            for flag, value in (
                ("--num_inference_steps", args.num_inference_steps),
                ("--timestep_spacing", args.timestep_spacing),
            ):
                if value is not None:
                    raise ValueError(
                        f"{flag} does not apply to --ode_solver rk45, which chooses its own steps from --rtol and "
                        "--atol (or use --ode_solver heun / euler)."
                    )
        else:
            args.timestep_spacing = args.timestep_spacing or "uniform"
    uses_tolerances = uses_tolerances or args.ode_solver == "rk45"
    given = [f"--{flag}" for flag in TOLERANCE_FLAGS if getattr(args, flag) is not None]
    if given and not uses_tolerances:
        raise ValueError(
            f"{' and '.join(given)}: rk45's tolerances, only with --sampler ode --ode_solver rk45"
            + (" or --likelihood" if hasattr(args, "likelihood") else "")
            + "."
        )
    for flag in TOLERANCE_FLAGS:
        setattr(args, flag, DEFAULT_TOLERANCE if getattr(args, flag) is None else getattr(args, flag))


def check_pipeline_sampler(args: argparse.Namespace, pipeline) -> None:
    """Checks the sampler flags against a loaded pipeline, before any sample; sets `args.prior` when it was left to
    the pipeline (flow when it has a flow prior, else sde).

    Raises:
        EvaluationError: `--prior flow` without a flow prior, `--flow_temperature` without one, or the pipeline's own
            error (`DiNofPipeline.check_inputs`), e.g. for `--sampler ode` on a discrete-time model.
    """
    has_flow = getattr(pipeline, "flow_prior", None) is not None
    if args.prior is None:
        args.prior = "flow" if has_flow else "sde"
        if args.prior == "sde" and args.flow_temperature is not None:
            raise EvaluationError(
                "--flow_temperature has no effect: this pipeline has no flow prior, so it samples from the SDE prior "
                "(--prior sde)."
            )
    if args.prior == "flow" and not has_flow:
        raise EvaluationError(
            "--prior flow needs a pipeline with a flow prior (its `flow_prior` component); this one has none: use "
            "--prior sde (the SDE prior at T)."
        )
    if hasattr(pipeline, "check_inputs"):
        try:  # the pipeline's own checks (a discrete-time model has no probability-flow ODE, a prior must fit, ...)
            keywords = sampler_keywords(args)
            steps, temperature = keywords.pop("num_inference_steps", None), keywords.pop("flow_temperature", 1.0)
            pipeline.check_inputs(
                1, steps, None, None, None, temperature, keywords.pop("use_flow_prior"), "pt", None, [], **keywords
            )
        except ValueError as error:
            raise EvaluationError(f"--prior {args.prior} --sampler {args.sampler}: {error}") from None


def sampler_keywords(
    args: argparse.Namespace, prior: Optional[str] = None, num_inference_steps: Optional[int] = None
) -> Dict[str, Any]:
    """The `DiNofPipeline.__call__` keywords of the flags: `use_flow_prior`, `num_inference_steps` when set,
    `flow_temperature` with the flow prior, and `sampler` with its solver settings for the ODE.

    A PC sampler's keywords are exactly those evaluate.py recorded before the ODE existed, so that the sample dumps it
    made still match their manifests.

    Args:
        args: the checked flags (`check_sampler_arguments`, and `args.prior` set).
        prior: "flow" or "sde" instead of `args.prior` (sample.py's `--compare_baseline`).
        num_inference_steps: instead of `args.num_inference_steps` (DiNof's share of them in `--compare_baseline`).
    """
    prior = args.prior if prior is None else prior
    steps = args.num_inference_steps if num_inference_steps is None else num_inference_steps
    keywords: Dict[str, Any] = {"use_flow_prior": prior == "flow"}
    if steps is not None:
        keywords["num_inference_steps"] = steps
    if prior == "flow":
        keywords["flow_temperature"] = 1.0 if args.flow_temperature is None else args.flow_temperature
    if args.sampler == "ode":
        keywords.update(sampler="ode", ode_solver=args.ode_solver)
        if args.ode_solver == "rk45":
            keywords.update(rtol=args.rtol, atol=args.atol)
        else:
            keywords["timestep_spacing"] = args.timestep_spacing
    return keywords


def sampler_record(args: argparse.Namespace, keywords: Dict[str, Any], prior: Optional[str] = None) -> Dict[str, Any]:
    """What metrics.json / sampling.json say about a sampler: prior, sampler, its solver settings, the keywords."""
    return {"prior": args.prior if prior is None else prior, "sampler": args.sampler, **keywords}
