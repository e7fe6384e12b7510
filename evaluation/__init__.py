"""Evaluation of a trained package: errors per fidelity, plots, PES scans, the linear baseline, the MLflow report."""
