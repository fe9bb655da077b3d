"""DiNof: diffusion models with deterministic normalizing flow priors, for Hugging Face diffusers."""

__version__ = "0.1.0"
