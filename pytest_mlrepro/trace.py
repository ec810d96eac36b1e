"""Per-step fingerprints of every trained tensor: kept for its imports; the tracer lives in ``tracing/``."""
from .tracing import (  # noqa: F401
    NAMING_STEPS,
    SAMPLES_PER_TENSOR,
    ReplayDone,
    TraceRecord,
    Tracer,
    sample_indices,
)
