"""The sampling page: a small FastAPI app over a trained run (`python -m flows.serve`)."""
