"""Prefect glue (may import the whole library, never tasks/ or flows/): stage cache keys and stamps
(`stage`), resume markers (`markers`), `run_stage` (`runner`), folder locks (`locks`), parallel units
(`chunks`), the command line (`cli`) and the zombie-run automation (`zombies`)."""
