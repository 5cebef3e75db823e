"""qtuning: Q-Tuning (dynamic sample and token pruning on the Error-Uncertainty plane) for supervised fine-tuning.

The library: config, data, scoring, triage, rules, pruning, the training loop, evaluation helpers. It imports no
Prefect or MLflow; the pipeline around it lives in tasks/ and flows/, the command line in commands/.
"""

__version__ = "0.1.0"
