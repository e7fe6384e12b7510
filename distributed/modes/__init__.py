"""Training modes: what one step does. registry.py names them; multifidelity.py is the multi-fidelity step and
what every step gets (StepContext, StreamSpec); losses.py its masked loss; reptile.py meta-learning (S3);
replay.py mixes pretraining structures into fine-tuning batches. Nothing here imports the driver or the loop.
"""
