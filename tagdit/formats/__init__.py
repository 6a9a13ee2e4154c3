"""On-disk formats, one module each: the only places that read or write them.

`image_shards` (the shard stage's WebDataset tars), `latent_shards` (the encode stage's tars and
`stats.json`), `checkpoints` (numbered training checkpoint folders: safetensors weights + config,
optimiser/RNG state, `latest`, pins) and `trained_models` (a DiT or VAE rebuilt from one),
`eval_metrics` (the evaluation's `metrics.json`), `selected_tags` (the WD tagger's
`selected_tags.csv`) and `wd_image` (the WD 1.4 image recipe the crops and the tagger share). The
DiT vocabulary (`vocab.json`) lives in `tagdit.data.vocab`.
"""
