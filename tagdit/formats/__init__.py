"""On-disk formats, one module each, holding its schema, its writer and its reader; everyone else calls those.

`chunks` (the crop and tag stages' per-chunk parquet under `work/`), `image_shards` (the shard
stage's WebDataset tars), `dataset_tables` (`manifest.parquet`, `rejects.parquet`, `tags.parquet`),
`latent_shards` (the encode stage's tars and `stats.json`), `checkpoints` (numbered training
checkpoint folders: safetensors weights + config, optimiser/RNG state, `latest`, pins) and
`trained_models` (a DiT or VAE rebuilt from one), `exported_model` (an exported model folder),
`eval_metrics` (the evaluation's `metrics.json`), `selected_tags` (the WD tagger's
`selected_tags.csv`) and `wd_image` (the WD 1.4 image recipe the crops and the tagger share). The
DiT vocabulary (`vocab.json`) lives in `tagdit.data.vocab`.
"""
