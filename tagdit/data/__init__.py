"""Data library (imports formats/ only): the WD tagger (`tagger`), the DiT vocabulary (`vocab`),
read-ahead (`prefetch`) and image metrics (`metrics`)."""
