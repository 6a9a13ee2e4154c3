"""The demo: a synthetic world of drawn characters with known tags and a WD-interface tagger for it."""
