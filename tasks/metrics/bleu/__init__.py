"""The `evaluate` module folder for sentence BLEU (load with ``evaluate.load(<this folder>)``)."""
