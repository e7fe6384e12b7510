"""The driver: resolve the config into a resolved copy, hold the output folder's lock, open the MLflow run, start
Ray Train workers (worker.py is each one's entry point), and write the summary. Runs once per command, on the
machine where the user typed it; the loop runs in the workers.
"""
