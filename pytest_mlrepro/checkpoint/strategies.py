"""Hypothesis strategies for metric sequences and early-stopping specs, exported for users.

Values are multiples of 1/4 with small magnitude and ``min_delta`` is a power of two (or 0), so
every sum and comparison is exact in float32 and float64: a framework that computes
``current + min_delta < best`` and one that computes ``best - current > min_delta`` see the same
boundary cases, and a reported counterexample is never a rounding artefact. Sequences walk in
steps of exactly ``0``, ``+-min_delta`` and ``+-2*min_delta`` often, so plateaus, exact ties and
values exactly at the ``min_delta`` boundary are common; NaN, +inf and -inf appear when allowed.

    from pytest_mlrepro.checkpoint.strategies import stop_specs, specs_and_sequences  # or pytest_mlrepro.strategies
"""
from __future__ import annotations

import math

from hypothesis import strategies as st

from pytest_mlrepro.checkpoint.oracle import NAN_POLICIES, StopSpec

__all__ = ["quarters", "metric_values", "stop_specs", "metric_sequences", "specs_and_sequences", "MIN_DELTAS"]

MIN_DELTAS = (0.0, 0.25, 0.5, 1.0, 2.0)


def quarters(max_abs: int = 64) -> st.SearchStrategy:
    """Multiples of 0.25 in [-max_abs, max_abs]: exactly representable, shrink toward 0."""
    return st.integers(-4 * max_abs, 4 * max_abs).map(lambda k: k / 4.0)


def metric_values(*, allow_nan: bool = True, allow_inf: bool = True, max_abs: int = 64) -> st.SearchStrategy:
    """One monitored value: mostly exact quarters, sometimes NaN / +-inf."""
    specials = []
    if allow_nan:
        specials.append(math.nan)
    if allow_inf:
        specials += [math.inf, -math.inf]
    base = quarters(max_abs)
    return st.one_of(base, st.sampled_from(specials)) if specials else base


def stop_specs(
    *,
    modes=("min", "max"),
    max_patience: int = 4,
    min_deltas=MIN_DELTAS,
    baseline: bool = True,
    start_from_epoch: bool = True,
    nan_policies=("stop", "ignore"),
) -> st.SearchStrategy:
    """StopSpecs; switch off features a framework lacks (``baseline=False``, ...)."""
    for p in nan_policies:
        if p not in NAN_POLICIES:
            raise ValueError(f"unknown nan_policy {p!r}; known: {NAN_POLICIES}")
    return st.builds(
        StopSpec,
        mode=st.sampled_from(tuple(modes)),
        patience=st.integers(0, max_patience),
        min_delta=st.sampled_from(tuple(min_deltas)),
        baseline=st.one_of(st.none(), quarters(16)) if baseline else st.none(),
        start_from_epoch=st.integers(0, 3) if start_from_epoch else st.just(0),
        nan_policy=st.sampled_from(tuple(nan_policies)),
    )


@st.composite
def metric_sequences(
    draw,
    *,
    min_delta: float = 0.0,
    anchor: float | None = None,
    min_size: int = 0,
    max_size: int = 12,
    allow_nan: bool = True,
    allow_inf: bool = True,
):
    """A sequence of monitored values: a random walk with plateaus, ties and boundary steps.

    ``anchor`` (e.g. the baseline) is a value the walk may start from or jump back to, so values
    exactly at ``anchor +- min_delta`` occur.
    """
    n = draw(st.integers(min_size, max_size))
    d = float(min_delta)
    boundary_steps = sorted({0.0, d, -d, 2 * d, -2 * d}, key=lambda x: (abs(x), x))
    step = st.one_of(st.sampled_from(boundary_steps), quarters(4))
    kinds = ["step", "step", "step", "jump"]
    if anchor is not None:
        kinds.append("anchor")
    if allow_nan or allow_inf:
        kinds.append("special")
    specials = ([math.nan] if allow_nan else []) + ([math.inf, -math.inf] if allow_inf else [])
    current = anchor if (anchor is not None and draw(st.booleans())) else draw(quarters(16))
    out = []
    for _ in range(n):
        kind = draw(st.sampled_from(kinds))
        if kind == "special":
            out.append(draw(st.sampled_from(specials)))
            continue
        if kind == "jump":
            current = draw(quarters(16))
        elif kind == "anchor":
            current = anchor + draw(st.sampled_from(boundary_steps))
        else:
            current = current + draw(step)
        out.append(float(current))
    return out


@st.composite
def specs_and_sequences(draw, specs: st.SearchStrategy | None = None, *, min_size: int = 0, max_size: int = 12,
                        allow_nan: bool = True, allow_inf: bool = True):
    """``(StopSpec, values)`` with the walk tuned to the spec's ``min_delta`` and ``baseline``."""
    spec = draw(specs if specs is not None else stop_specs())
    values = draw(metric_sequences(min_delta=spec.min_delta, anchor=spec.baseline, min_size=min_size,
                                   max_size=max_size, allow_nan=allow_nan, allow_inf=allow_inf))
    return spec, values
