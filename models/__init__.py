"""Pure-torch models: KL-VAE, perceptual loss, discriminator, DiT, diffusion and sampling."""
