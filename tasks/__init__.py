"""One module per pipeline stage: plain functions, a `Stage` cache contract and a Prefect task."""
