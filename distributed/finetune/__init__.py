"""Fine-tuning a package: the plan (pick or add a head, rescale it, refit its references, freeze), forgetting
on the parent's data, and the from-scratch comparison.

plan.py runs inside the loop (the Trainer applies a FinetunePlan); forgetting.py and scratch.py run on the driver.
"""
