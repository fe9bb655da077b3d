"""The sampler settings of the seven published DiNof configs, as `DiNofScheduler` configs (keyed like the networks'
`NCSNPP_PUBLISHED_CONFIGS`).

Read from MohsenZand/DiNof `configs/` (commit 3a6bb4a): `training.sde`, `training.continuous`, `sampling.predictor`,
`sampling.corrector`, `sampling.snr`, `sampling.n_steps_each`, `model.sigma_min` / `sigma_max` / `beta_min` /
`beta_max` / `num_scales` and `flow.start_step`, with the defaults of `default_cifar10.py` / `default_celeba.py`
where a config leaves them out. The prediction type and the conditioning are those of the published `get_score_fn`:
VE networks output the score, VP / sub-VP networks the noise (score = -output / std), discrete networks take the
published labels (`model_conditioning="score_sde"`). `sampling_eps` is left at the scheduler's default, the
published 1e-5 (VE) / 1e-3 (VP, sub-VP).

The paper says one Langevin corrector step for every run; the VP, sub-VP and discrete VP configs set
`sampling.corrector = 'none'` (Euler-Maruyama, or the ancestral predictor, alone). The configs produced the published
numbers, so they win here. `snr` is kept at the default 0.16 where no corrector reads it.
"""

from typing import Any, Dict

_COMMON: Dict[str, Any] = {
    "num_train_timesteps": 1000,
    "flow_start": 0.6,
    "correct_steps": 1,
    "langevin_norm": "batch",
    "model_conditioning": "score_sde",
    "snr": 0.16,
}
# the predictor-corrector samplers of the VE configs and of the continuous VP / sub-VP configs
_PC = {"continuous": True, "predictor": "reverse_diffusion", "corrector": "langevin"}
_EM = {"continuous": True, "predictor": "euler_maruyama", "corrector": "none"}
_VE = dict(_COMMON, **_PC, sde_type="ve", prediction_type="score", sigma_min=0.01, sigma_max=50.0)
_VP = dict(_COMMON, **_EM, sde_type="vp", prediction_type="epsilon", beta_min=0.1, beta_max=20.0)

DINOF_PUBLISHED_SCHEDULER_CONFIGS: Dict[str, Dict[str, Any]] = {
    # configs/ve/cifar10_ncsnpp_continuous.py
    "ncsnpp-cifar10-ve": dict(_VE),
    # configs/ve/cifar10_ncsnpp_deep_continuous.py
    "ncsnpp-deep-cifar10-ve": dict(_VE),
    # configs/ve/cifar10_ncsnpp.py (SMLD)
    "ncsnpp-cifar10-ve-discrete": dict(_VE, continuous=False),
    # configs/vp/cifar10_ddpmpp_continuous.py
    "ddpmpp-cifar10-vp": dict(_VP),
    # configs/vp/cifar10_ddpmpp.py (DDPM: `ancestral_sampling`, no corrector)
    "ddpmpp-cifar10-vp-discrete": dict(_VP, continuous=False, predictor="ancestral"),
    # configs/subvp/cifar10_ddpmpp_continuous.py
    "ddpmpp-cifar10-subvp": dict(_VP, sde_type="subvp"),
    # configs/ve/celebahq_256_ncsnpp_continuous.py (default_celeba.py: snr 0.17)
    "ncsnpp-celebahq256-ve": dict(_VE, sigma_max=348.0, snr=0.17),
}
