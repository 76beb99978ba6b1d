"""GRPOTrainer with one addition: reward-function failures are logged, never silent.

Overrides only `Trainer.log`, the documented hook for adding to the logged metrics.
"""

from __future__ import annotations

from trl import GRPOTrainer


class PostrainGRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer; also logs `rewards/<name>/errors`, the completions each reward failed to score since
    the last log (the reward error policy `score` scores them as failed instead of stopping the run)."""

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        for fn in self.reward_funcs:
            if hasattr(fn, "pop_error_count"):
                logs[f"rewards/{fn.name}/errors"] = float(fn.pop_error_count())
        super().log(logs, start_time)
