"""Training machinery shared by the VAE and the DiT, one idea per module; import from the module:

devices (device, TF32, autocast) · optim (AdamW, warm-up + cosine, EMA) · checkpoints (safetensors
weights, numbered checkpoint folders, RNG state) · stream (exactly resumable WebDataset batches) ·
launch (torchrun / DDP) · loop (`fit`).
"""
