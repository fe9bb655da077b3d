"""The score-network options of the seven published DiNof configs, as `NCSNppModel` config dicts.

Read from MohsenZand/DiNof `configs/` (commit 3a6bb4a) and yang-song/score_sde_pytorch `configs/` (commit cb1f359),
whose `model` and `data` options agree for these seven. `dropout` and `sigma_max` come from the files' defaults
(`default_cifar10.py`: dropout 0.1, sigma_max 50; `default_celeba.py`: dropout 0.1; the CelebA-HQ config sets
sigma_max 348); `centered` is `data.centered` (False by default, True in the VP and sub-VP configs).

`NCSNPP_PUBLISHED_PARAMETER_COUNTS` are the published networks' `sum(p.numel() for p in model.parameters())`,
counted once by building score_sde_pytorch's `NCSNpp` with each config; "trainable" leaves out the Gaussian Fourier
features' `W` (a parameter with `requires_grad=False`, so also absent from the published EMA's `shadow_params`).
`NCSNppModel` built with each config has exactly these counts (tests/test_ncsnpp.py checks them on the meta device).
"""

from typing import Any, Dict

_COMMON: Dict[str, Any] = {
    "in_channels": 3,
    "nf": 128,
    "ch_mult": (1, 2, 2, 2),
    "num_res_blocks": 4,
    "attn_resolutions": (16,),
    "dropout": 0.1,
    "resamp_with_conv": True,
    "conditional": True,
    "fir_kernel": (1, 3, 3, 1),
    "skip_rescale": True,
    "resblock_type": "biggan",
    "progressive_combine": "sum",
    "fourier_scale": 16.0,
    "init_scale": 0.0,
    "sigma_min": 0.01,
    "sigma_max": 50.0,
    "num_scales": 1000,
    "normalization": "GroupNorm",
    "nonlinearity": "swish",
    "attention_type": "ddpm",
    "conv_size": 3,
}

# NCSN++ on CIFAR-10 (VE): FIR resampling, residual input pyramid, Fourier features of sigma, output divided by sigma.
_NCSNPP_CIFAR10 = dict(
    _COMMON,
    sample_size=32,
    fir=True,
    progressive="none",
    progressive_input="residual",
    embedding_type="fourier",
    scale_by_sigma=True,
    centered=False,
)
# DDPM++ on CIFAR-10 (VP, sub-VP): no FIR, no pyramids, positional embedding of 999 t or t (N - 1), outputs noise.
_DDPMPP_CIFAR10 = dict(
    _COMMON,
    sample_size=32,
    fir=False,
    progressive="none",
    progressive_input="none",
    embedding_type="positional",
    scale_by_sigma=False,
    centered=True,
)

NCSNPP_PUBLISHED_CONFIGS: Dict[str, Dict[str, Any]] = {
    # configs/ve/cifar10_ncsnpp_continuous.py
    "ncsnpp-cifar10-ve": dict(_NCSNPP_CIFAR10),
    # configs/ve/cifar10_ncsnpp_deep_continuous.py
    "ncsnpp-deep-cifar10-ve": dict(_NCSNPP_CIFAR10, num_res_blocks=8),
    # configs/ve/cifar10_ncsnpp.py (SMLD: discrete noise levels, conditioned on the level's label)
    "ncsnpp-cifar10-ve-discrete": dict(_NCSNPP_CIFAR10, embedding_type="positional"),
    # configs/vp/cifar10_ddpmpp_continuous.py
    "ddpmpp-cifar10-vp": dict(_DDPMPP_CIFAR10),
    # configs/vp/cifar10_ddpmpp.py (DDPM: discrete)
    "ddpmpp-cifar10-vp-discrete": dict(_DDPMPP_CIFAR10),
    # configs/subvp/cifar10_ddpmpp_continuous.py
    "ddpmpp-cifar10-subvp": dict(_DDPMPP_CIFAR10),
    # configs/ve/celebahq_256_ncsnpp_continuous.py (with configs/default_celeba.py)
    "ncsnpp-celebahq256-ve": dict(
        _NCSNPP_CIFAR10,
        sample_size=256,
        ch_mult=(1, 1, 2, 2, 2, 2, 2),
        num_res_blocks=2,
        progressive="output_skip",
        progressive_input="input_skip",
        sigma_max=348.0,
    ),
}

NCSNPP_PUBLISHED_PARAMETER_COUNTS: Dict[str, Dict[str, int]] = {
    "ncsnpp-cifar10-ve": {"total": 62_758_915, "trainable": 62_758_787},
    "ncsnpp-deep-cifar10-ve": {"total": 107_587_075, "trainable": 107_586_947},
    "ncsnpp-cifar10-ve-discrete": {"total": 62_693_251, "trainable": 62_693_251},
    "ddpmpp-cifar10-vp": {"total": 61_804_419, "trainable": 61_804_419},
    "ddpmpp-cifar10-vp-discrete": {"total": 61_804_419, "trainable": 61_804_419},
    "ddpmpp-cifar10-subvp": {"total": 61_804_419, "trainable": 61_804_419},
    "ncsnpp-celebahq256-ve": {"total": 65_574_549, "trainable": 65_574_421},
}
