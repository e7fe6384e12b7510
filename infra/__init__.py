"""What the training loop and the evaluation both stand on: host-side collectives (comm.py), the fail-soft
MLflow tracker (tracking.py), and where runs and packages live (resolve.py).

A lower room: it imports only data_shards and models, never distributed, evaluation or launch.
"""
