"""tagdit: a Prefect pipeline that trains a tag-conditioned latent Diffusion Transformer."""

__version__ = "0.1.0"
