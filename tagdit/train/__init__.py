"""Training machinery shared by the VAE and the DiT, one idea per module; import from the module:

optim (AdamW, warm-up + cosine, EMA) · stream, tar_samples, loader_workers (exactly resumable
WebDataset batches) · launch (torchrun / DDP) · loop (`fit`) · samples (grids while training).
Checkpoint folders are an on-disk format: `tagdit.formats.checkpoints`; devices: `tagdit.devices`.
"""
