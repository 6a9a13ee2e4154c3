"""Drawing from a trained run (imports data/, formats/, models/): `painter` (DiT + VAE + vocabulary),
`prompts` (captions and default prompts from a dataset) and `grid` (captioned image grids)."""
