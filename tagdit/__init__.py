"""tagdit: a Prefect pipeline that trains a tag-conditioned latent Diffusion Transformer."""

import logging

__version__ = "0.1.0"

# The project's modules log progress at INFO; Prefect's default root level is WARNING.
for _name in ("tagdit", "tasks", "models", "flows"):
    if logging.getLogger(_name).level == logging.NOTSET:
        logging.getLogger(_name).setLevel(logging.INFO)
