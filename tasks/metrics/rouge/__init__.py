"""The `evaluate` module folder for ROUGE-1/2/L (load with ``evaluate.load(<this folder>)``)."""
