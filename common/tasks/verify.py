"""Freivalds' check of a block of rows of a matrix product, ``C_rows = A_rows @ B``, in O(rows·(k + n)).

For a random vector ``r`` (secret to the providers), ``C_rows @ r`` must equal ``A_rows @ (B @ r)``. ``B @ r``
is computed once per job (``Freivalds.of``), then each block costs two matrix-vector products and one
pass for the row norms of ``A_rows``: a few passes over memory against the block's 2·rows·k·n flops.

The two sides differ by rounding, and a legitimate result must never fail. For a row ``i``, with
``e = C - A B`` the provider's rounding error, the computed difference is ``e_i · r`` plus the check's own
float64 rounding. ``r`` is drawn independently of ``e`` (the provider never sees it), its entries are
``±[0.5, 1]``, so by Hoeffding ``|e_i · r| <= TAU · ||e_i||`` but with probability ``2·exp(-TAU²/2)``
(~5e-18). The rounding model of a provider's dot product of length ``k`` in unit roundoff ``u`` is
``|e_ij| <= C_ROUND · u · sqrt(k) · |A_i|·|B_j|`` (measured: a sequential float32 sum of positive data, the
worst common order, reaches ~1; OpenBLAS ~0.1), so ``||e_i|| <= C_ROUND · u · sqrt(k) · ||A_i|| · ||B||_F``
(Cauchy-Schwarz); past ``k·u > 0.01`` (float32, k > ~1.7e5), where sums may stagnate, the rigorous
``k·u/(1 - k·u)`` is used instead. The check's own float64 rounding is bounded rigorously. Every bound is
``||A_i||`` times a per-job scalar, so the tolerance costs one pass over ``A_rows``.

What is not verified (counted, never refused): entries in columns of ``B`` holding NaN or Inf (``r`` is
zero there), rows of ``A`` holding NaN or Inf, and rows whose product may overflow the dtype: their true
value is non-finite or at the dtype's limit, where no tolerance is meaningful.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..arrays import dtype_name

__all__ = ["C_ROUND", "EXACT_MAX_TERMS", "TAU", "BlockCheck", "Freivalds", "exact_check"]

#: Hoeffding's multiple of ||e_i||: a correct row fails with probability 2·exp(-TAU²/2), about 5e-18
TAU = 9.0
#: the rounding model's constant (see the module's docstring)
C_ROUND = 4.0
#: past k·u of this, the provider's rounding is bounded by the rigorous k·u/(1 - k·u), not sqrt(k)·u
SQRT_MODEL_LIMIT = 0.01
#: arrays are read by chunks of rows of about this many bytes (cast to float64 when float32, reused in cache)
CHUNK_BYTES = 1 << 20
#: a block of at most this many multiply-adds (rows·k·n) is checked exactly (``exact_check``): recomputing it costs
#: less than the vectors of Freivalds' check (a 4x4 product: ~9 µs against ~42 µs, most of a tiny job's check)
EXACT_MAX_TERMS = 32_768
#: squared norms outside this range are recomputed with a power-of-two scale (no overflow, no underflow)
_SAFE_SQ = (1e-250, 1e250)
_U64 = float(np.finfo(np.float64).eps) / 2
_TINY64 = float(np.finfo(np.float64).tiny)
#: the check's float64 sums must stay far from overflow
_SUM_LIMIT = 1e300
#: dtype -> (unit roundoff, smallest normal, largest finite)
_LIMITS = {name: (float(np.finfo(name).eps) / 2, float(np.finfo(name).tiny), float(np.finfo(name).max))
           for name in ("float32", "float64")}
_NONE, _NONE_F = np.zeros(0, dtype=np.int64), np.zeros(0)


def _gamma(length: int, u: float) -> float:
    """Rigorous bound of the relative rounding error of a dot product of ``length`` terms."""
    nu = length * u
    return math.inf if nu >= 1 else nu / (1 - nu)


def _provider_gamma(k: int, u: float) -> float:
    """The rounding model of a provider's dot product of length ``k`` (module docstring)."""
    if k * u > SQRT_MODEL_LIMIT:
        return _gamma(k, u)
    return min(_gamma(k, u), C_ROUND * u * math.sqrt(k))


def _chunks(rows: int, row_bytes: int) -> Iterator[slice]:
    step = max(1, CHUNK_BYTES // max(1, row_bytes))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def _f64(x: np.ndarray) -> np.ndarray:
    return x if x.dtype == np.float64 else x.astype(np.float64)


def _scaled_norms(x: np.ndarray) -> np.ndarray:
    """Row norms without overflow or underflow: each row scaled by a power of two near its largest entry;
    NaN for a row holding NaN or Inf."""
    x = _f64(x)
    big = np.max(np.abs(x), axis=1) if x.shape[1] else np.zeros(x.shape[0])
    out = np.full(x.shape[0], np.nan)
    ok = np.isfinite(big)
    out[ok & (big == 0)] = 0.0
    live = np.flatnonzero(ok & (big > 0))
    if live.size:
        scaled = x[live] * np.ldexp(1.0, -np.frexp(big[live])[1])[:, None]
        out[live] = np.sqrt(np.vecdot(scaled, scaled)) * np.ldexp(1.0, np.frexp(big[live])[1])
    return out


def _finish_norms(sq: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Square roots of the squared row norms ``sq`` of ``x``; rows whose square left the safe range (NaN,
    Inf, overflow, underflow) are computed again, scaled."""
    out: np.ndarray = np.sqrt(sq)
    if sq.size and _SAFE_SQ[0] <= sq.min() and sq.max() <= _SAFE_SQ[1]:  # NaN fails too
        return out
    redo = np.flatnonzero(~((sq >= _SAFE_SQ[0]) & (sq <= _SAFE_SQ[1])))  # 0 too: it may have underflowed
    if redo.size:
        out[redo] = _scaled_norms(x[redo])
    return out


def _square_sums(x: np.ndarray) -> np.ndarray:
    """Sum of squares of every row of ``x``, in float64 (a float32 ``x`` cast a chunk at a time)."""
    if x.dtype == np.float64:
        return np.asarray(np.vecdot(x, x))
    out = np.empty(x.shape[0])
    for s in _chunks(x.shape[0], x.shape[1] * 8):
        xs = x[s].astype(np.float64)
        out[s] = np.vecdot(xs, xs)
    return out


def row_norms_and_product(a: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Euclidean norm of every row of ``a``, ``a @ v``), both float64; norm NaN: the row holds NaN or Inf.
    float32 is cast a chunk at a time, used twice while it is in cache."""
    if a.dtype == np.float64:
        return _finish_norms(np.asarray(np.vecdot(a, a)), a), np.asarray(a @ v)
    sq, prod = np.empty(a.shape[0]), np.empty(a.shape[0])
    for s in _chunks(a.shape[0], a.shape[1] * 8):
        x = a[s].astype(np.float64)
        sq[s] = np.vecdot(x, x)
        prod[s] = x @ v
    return _finish_norms(sq, a), prod


def matvec(x: np.ndarray, v: np.ndarray, cols: np.ndarray | None = None) -> np.ndarray:
    """``x[:, cols] @ v`` in float64 (all columns for None); float32 or a choice of columns a chunk of rows
    at a time."""
    if x.dtype == np.float64 and cols is None:
        return np.asarray(x @ v)
    out = np.empty(x.shape[0])
    for s in _chunks(x.shape[0], x.shape[1] * 8):
        out[s] = _f64(x[s] if cols is None else x[s][:, cols]) @ v
    return out


def column_norms(b: np.ndarray) -> np.ndarray:
    """Euclidean norm of every column of ``b``, in float64; NaN for a column holding NaN or Inf."""
    sq = np.zeros(b.shape[1])
    for s in _chunks(b.shape[0], b.shape[1] * 8):
        x = _f64(b[s])
        sq += np.einsum("ij,ij->j", x, x)
    redo = np.flatnonzero(~((sq >= _SAFE_SQ[0]) & (sq <= _SAFE_SQ[1])))  # 0 too: it may have underflowed
    out: np.ndarray = np.sqrt(sq)
    if redo.size:
        out[redo] = _scaled_norms(np.ascontiguousarray(b[:, redo].T))
    return out


def _columns(b: np.ndarray) -> tuple[np.ndarray | None, float, float]:
    """(the columns of ``b`` to verify, None for all; their Frobenius norm; a bound of their largest norm). One
    pass over ``b`` when it is finite and its norm safe; else column by column (NaN/Inf columns left out)."""
    total = float(np.sum(_square_sums(b)))
    if _SAFE_SQ[0] <= total <= _SAFE_SQ[1]:  # finite, no overflow, no underflow that matters
        return None, math.sqrt(total), math.sqrt(total)
    col = column_norms(b)
    finite = np.isfinite(col)
    biggest = float(col[finite].max(initial=0.0))
    b_fro = biggest * float(np.sqrt(np.sum(np.square(col[finite] / biggest)))) if biggest > 0 else 0.0
    return (None if finite.all() else np.flatnonzero(finite)), b_fro, biggest


@dataclass(frozen=True)
class BlockCheck:
    """What the check of one block found: ``bad`` rows (offsets in the block) with their error and tolerance."""

    rows: int
    bad: np.ndarray  # int64 offsets of the rows that failed
    error: np.ndarray  # |C_i·r - A_i·(B r)| of those rows
    tolerance: np.ndarray  # their tolerances
    unverified: int  # rows not (wholly) verified (NaN/Inf in the row of A, or a product that may overflow)

    @property
    def ok(self) -> bool:
        return self.bad.size == 0

    def describe(self, row0: int, limit: int = 3) -> str:
        """The failed rows, in the job's numbering: 'row 17 off by 3.2e+01 (tolerance 1.1e-05), ...'."""
        shown = ", ".join(f"row {row0 + int(i)} off by {e:.3g} (tolerance {t:.3g})"
                          for i, e, t in zip(self.bad[:limit], self.error[:limit], self.tolerance[:limit], strict=True))
        more = f", and {self.bad.size - limit} more" if self.bad.size > limit else ""
        return f"{self.bad.size} of {self.rows} rows wrong: {shown}{more}"


@dataclass(frozen=True)
class Freivalds:
    """One job's check: ``r``, ``B r`` and the per-job factors of the tolerance. Build it with ``of``."""

    r: np.ndarray  # float64, over the verified columns of B (``cols``)
    cols: np.ndarray | None  # indices of the columns of B verified; None: all of them
    y: np.ndarray  # B[:, cols] @ r, float64, length k
    slope: float  # tolerance of row i: ||A_i|| * slope + offset
    offset: float
    row_limit: float  # rows with ||A_i|| above it are not verified (the product may overflow)

    @classmethod
    def of(cls, b: np.ndarray, rng: np.random.Generator) -> Freivalds:
        """The check of products ``A @ b`` (``b``: float32 or float64, k x n), with ``r`` drawn from ``rng``."""
        with np.errstate(all="ignore"):  # NaN and Inf are expected (and handled) here
            return cls._of(b, rng)

    @classmethod
    def _of(cls, b: np.ndarray, rng: np.random.Generator) -> Freivalds:
        k, n = b.shape
        cols, b_fro, biggest = _columns(b)
        nv = n if cols is None else int(cols.size)
        x = rng.uniform(-1.0, 1.0, nv)
        r = np.copysign(0.5 + 0.5 * np.abs(x), x)  # |r_j| in [0.5, 1], either sign
        y = matvec(b, r, cols)
        u, tiny, most = _LIMITS[dtype_name(b.dtype)]
        y_norm, r_norm = math.sqrt(float(y @ y)), math.sqrt(float(r @ r))
        slope = (TAU * _provider_gamma(k, u) * b_fro  # the provider's rounding, over the secret r
                 + _gamma(k, _U64) * y_norm  # A_i · y in float64
                 + 2 * _gamma(nv, _U64) * b_fro * r_norm)  # B r, and C_i · r, in float64
        offset = TAU * math.sqrt(nv) * k * tiny + 4 * (k + nv) * _TINY64  # underflow (flushed to 0)
        overflow = most / 4 / max(biggest, _TINY64)  # |C_ij| <= ||A_i|| ||B_j||: stays below max/4
        sums = _SUM_LIMIT / max(y_norm + b_fro * r_norm, _TINY64)
        return cls(r, cols, y, slope * (1 + 1e-6), offset, min(overflow, sums))

    def check(self, a_rows: np.ndarray, c_rows: np.ndarray) -> BlockCheck:
        """Check ``c_rows == a_rows @ b`` (``a_rows``: rows x k, ``c_rows``: rows x n, of the job's dtype)."""
        with np.errstate(all="ignore"):  # NaN and Inf are expected (and handled) here
            return self._check(a_rows, c_rows)

    def _check(self, a_rows: np.ndarray, c_rows: np.ndarray) -> BlockCheck:
        norms, ay = row_norms_and_product(a_rows, self.y)
        diff = np.abs(matvec(c_rows, self.r, self.cols) - ay)
        tol = norms * self.slope + self.offset
        checked = norms <= self.row_limit  # False for NaN: the row of A holds NaN or Inf
        if checked.all() and (diff <= tol).all():  # the usual case, in few steps (NaN in C fails)
            return BlockCheck(int(a_rows.shape[0]), _NONE, _NONE_F, _NONE_F, 0)
        bad = np.flatnonzero(checked & ~(diff <= tol))
        return BlockCheck(int(a_rows.shape[0]), bad, diff[bad], tol[bad], int(a_rows.shape[0] - checked.sum()))


def exact_check(a_rows: np.ndarray, b: np.ndarray, c_rows: np.ndarray) -> BlockCheck:
    """Check ``c_rows == a_rows @ b`` entry by entry, for small blocks (``EXACT_MAX_TERMS``): the head computes
    the product in float64 and bounds, rigorously for any summation order, the rounding of both sides: the
    provider's ``|C_ij - (AB)_ij| <= gamma_k(u) (|A||B|)_ij`` in the job's dtype, and its own in float64 (plus
    underflow: ``k`` times the dtype's smallest normal). No randomness and no false refusal; entries whose
    ``(|A||B|)_ij`` is not finite or may overflow are not verified (their rows counted), as in Freivalds'."""
    with np.errstate(all="ignore"):  # NaN and Inf are expected (and handled) here
        a64, b64 = _f64(a_rows), _f64(b)
        k = int(b.shape[0])
        u, tiny, most = _LIMITS[dtype_name(c_rows.dtype)]
        scale = np.abs(a64) @ np.abs(b64)
        slack = (_gamma(k, u) + 2 * _gamma(k, _U64)) * (1 + 1e-6)
        tol = scale * slack + 2 * k * (tiny + _TINY64)
        diff = np.abs(_f64(c_rows) - a64 @ b64)
        checked = scale <= most / 4  # False for NaN and Inf: A or B holds them
        fine = diff <= tol  # False for NaN: a NaN in C where the product is finite fails
        rows = int(a_rows.shape[0])
        if checked.all() and fine.all():
            return BlockCheck(rows, _NONE, _NONE_F, _NONE_F, 0)
        wrong = checked & ~fine
        bad = np.flatnonzero(wrong.any(axis=1))
        worst = np.argmax(np.where(wrong[bad], np.nan_to_num(diff[bad], nan=np.inf), -1.0), axis=1)
        return BlockCheck(rows, bad, diff[bad, worst], tol[bad, worst], int((~checked.all(axis=1)).sum()))
