"""Evaluation: the metrics of an eval set (pass@k, maj@k, mean@n with confidence intervals) and an eval recipe's
per-set settings. The eval job (postrain.jobs.evaluate) generates and scores; these modules hold no I/O.

    from postrain.evaluation.metrics import per_prompt_metrics, summarize
    values = per_prompt_metrics(scores, answers, pass_at=[1, 4], maj_at=[4], equivalent=verifier.equivalent)
    summarize(values, seed=42)  # {"mean@4": {"value": ..., "ci": [lo, hi]}, "pass@1": ..., "maj@4": ...}
"""
