"""The name of every check a ``Finding`` can carry, in one place: producers and publishers import
them from here, so a renamed check cannot leave a publisher matching the old string."""
from __future__ import annotations

RELOAD = "best_checkpoint.reload"  # the saved best reloads and re-evaluates to its recorded metrics
HISTORY = "best_checkpoint.history"  # the recorded best epoch is the arg-best of the logged history
REPRODUCIBLE = "best_checkpoint.reproducible"  # every replica saved the same best checkpoint
METADATA = "best_checkpoint.metadata"  # fastai WandbCallback: the model artifact carries the best epoch's metrics
CONFORMANCE = "early_stopping.conformance"  # a stopping callback stops where the oracle does
DIRECTION = "comparator.direction"  # a "best" comparator goes the way its metric improves
METRICS = "training.metrics"  # values logged through ctx.log that are no numbers
FINAL_WEIGHTS = "weights.finite"  # NaN or inf in the final weights
BASELINE = "baseline.regression"  # the audit matches its stored baseline (pytest --mlrepro-baseline)
COMMITS = "commits.compare"  # which commits `mlrepro compare --base` compared, and where they part

ALL = (RELOAD, HISTORY, REPRODUCIBLE, METADATA, CONFORMANCE, DIRECTION, METRICS, FINAL_WEIGHTS, BASELINE, COMMITS)
