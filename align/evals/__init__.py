"""Alignment diagnostics: perplexity, KL to the reference, verbosity, reward-hacking probes.

`compare.run` is the `align_eval` task (configs/align_eval.py); the other modules are its
metrics, each usable on its own.
"""
