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
FRAMEWORK_DIRECTION = "framework.direction"  # a framework callback compares its monitored metric the right way round
FRAMEWORK_BEST = "framework.best"  # the epoch a framework callback kept as best is the arg-best it logged
FRAMEWORK_NAN = "framework.nan"  # a NaN of the monitored metric made a framework callback keep the wrong best
FRAMEWORK_MONITORS = "framework.monitors"  # checkpointing and early stopping of one run watch the same metric
DDP_PARAMS = "ddp.params_in_sync"  # nproc > 1: every rank holds the same parameters after each traced step
DDP_SHARDS = "ddp.data_shards"  # nproc > 1: the ranks did not all train on the same batches
DDP_RNG = "ddp.rng_per_rank"  # nproc > 1 (a warning): generators the training draws from differ per rank
INVARIANCE = "invariance"  # --mlrepro-invariant: the result is unchanged when one axis (threads, ...) changes

ALL = (RELOAD, HISTORY, REPRODUCIBLE, METADATA, CONFORMANCE, DIRECTION, METRICS, FINAL_WEIGHTS, BASELINE, COMMITS,
       FRAMEWORK_DIRECTION, FRAMEWORK_BEST, FRAMEWORK_NAN, FRAMEWORK_MONITORS, DDP_PARAMS, DDP_SHARDS, DDP_RNG,
       INVARIANCE)
