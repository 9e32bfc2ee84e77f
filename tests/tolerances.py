"""Float32 rounding bounds for the tests' tolerances (derived from the arithmetic, not tuned).

A float32 operation rounds with relative error at most ``u = 2^-24``; a sum of
``n`` terms computed in any order is within ``gamma_n * sum |terms|`` of the
exact sum (Higham, "Accuracy and Stability of Numerical Algorithms", 2002,
Sec. 3.1), so two float32 orders differ by at most twice that.
"""

from __future__ import annotations

import numpy as np

U32 = 2.0**-24  # unit roundoff of float32


def gamma_n(n: int) -> float:
    """``gamma_n = n u / (1 - n u)``: a float32 sum of ``n`` terms (in any order) is within
    ``gamma_n * sum |terms|`` of the exact sum (Higham, "Accuracy and Stability of Numerical
    Algorithms", Sec. 3.1); also the relative bound of ``n`` roundings in sequence."""
    return n * U32 / (1 - n * U32)


def assert_within(actual, expected, bound, what=""):
    """``|actual - expected| <= bound`` elementwise (float64 arithmetic), with the worst offender in the message."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    bound = np.broadcast_to(np.asarray(bound, np.float64), actual.shape)
    err = np.abs(actual - expected)
    bad = err > bound
    if np.any(bad):
        i = np.unravel_index(np.argmax(err - bound), err.shape)
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.size} beyond the bound; worst at {i}: "
            f"|{actual[i]} - {expected[i]}| = {err[i]:.3g} > {bound[i]:.3g}"
        )
