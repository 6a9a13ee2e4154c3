"""Evaluation library: tag fidelity and KID of samples (`fidelity`) and how results are shown (`report`)."""
