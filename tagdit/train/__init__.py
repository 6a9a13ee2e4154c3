"""Training the VAE and the DiT, one idea per module; import from the module:

vae, dit (each model's data, loss, validation and `train_vae` / `train_dit`) · loop (`fit`, the
loop both share) · ranks (a rank's device, seed and shard stream) · optim (AdamW, warm-up + cosine,
EMA) · stream, tar_samples, loader_workers (exactly resumable WebDataset batches) · launch
(torchrun / DDP) · stop (a cancelled run stops at a step, with a checkpoint) · disk (will the checkpoints fit?) · samples, reports (grids and progress while
training). Checkpoint folders are an on-disk format: `tagdit.formats.checkpoints`; devices: `tagdit.devices`.
"""
