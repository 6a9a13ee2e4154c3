"""tagdit: a Prefect pipeline that trains a tag-conditioned latent Diffusion Transformer.

The library, in layers that import only downward: orchestrate/ (Prefect glue) · evaluation/, web/ ·
train/ · sampling/ · demo/ · data/ · formats/ · config, files, devices. It never imports tasks/ or
flows/; models/ (pure torch) is below all of it (docs/design.md §1).
"""

import logging

__version__ = "0.1.0"

# The project's modules log progress at INFO; Prefect's default root level is WARNING.
for _name in ("tagdit", "tasks", "models", "flows"):
    if logging.getLogger(_name).level == logging.NOTSET:
        logging.getLogger(_name).setLevel(logging.INFO)
