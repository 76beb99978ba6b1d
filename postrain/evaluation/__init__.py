"""Evaluation: the metrics of an eval set (pass@k, maj@k, mean@n with confidence intervals), an eval recipe's
per-set settings, results.json read back (results) and the lm-eval backend. The eval job (postrain.jobs.evaluate)
owns the run directory; generation itself is postrain.models.generation's.

    from postrain.evaluation.metrics import per_prompt_metrics, summarize
    values = per_prompt_metrics(scores, answers, pass_at=[1, 4], maj_at=[4], equivalent=verifier.equivalent)
    summarize(values, seed=42)  # {"mean@4": {"value": ..., "ci": [lo, hi]}, "pass@1": ..., "maj@4": ...}
"""
