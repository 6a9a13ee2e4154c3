"""Data library (imports formats/, config, files, devices and models/ only): the data stages' work —
`crop` (source files -> crop chunks), `tag` (crop chunk -> tag chunk), `shard` (chunks -> image
shards, tables, vocabulary), `encode` (image shards -> latent shards, the scale factor) — the WD
tagger (`tagger`, `onnx_session`), the DiT vocabulary (`vocab`), read-ahead (`prefetch`), image
metrics (`metrics`) and the shard preview (`preview`)."""
