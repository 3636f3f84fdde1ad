"""Wire format of sparse gradient updates: the only module that encodes or decodes messages.

A participant sends the aggregator an :class:`Update`: ``k`` (index, value) pairs out of a model of
``n`` parameters. The message is built to be small, cheap to code and safe to decode from an
untrusted peer.

Layout of schema version 2 (all integers little-endian)::

    offset  size  field
    0       1     version      SCHEMA_VERSION (=2); decoders dispatch on it first
    1       1     flags        bit 0: an HMAC tag is appended; other bits must be 0
    2       4     participant  uint32, readable without decoding the rest (peek_participant)
    6       ...   payload      one msgpack map, exactly these keys:
                    "r"  str   run id (<= 64 characters)
                    "s"  int   seq, 1 <= seq < 2**63
                    "b"  int   base_version, 0 <= base_version < 2**63
                    "n"  int   model size, 1 <= n < 2**32
                    "k"  int   number of entries, 0 <= k <= n
                    "ic" int   index coding (see below)
                    "il" int   Elias-Fano low-bit width L (0..32; 0 for the other codings)
                    "ix" bin   index section
                    "vc" int   value coding: 0 = f32, 1 = f16, 2 = q8
                    "vx" bin   value section
                    "t"  int   sender's wall clock at encoding, ms since the epoch (v2 only):
                               the rate limit is charged on it, so a backlog never looks
                               like a flood
    end-32  32    HMAC-SHA256(key, every preceding byte), only when flags bit 0 is set

Version 1 is the same without "t"; it still decodes (``sent_at`` is then None). Versions are
dispatched on the first byte, so an unknown one is refused with a clear message.

Version 3 (issue 15: range shards, large updates) adds to version 2's map:

                    "bs" bin   the base version of every range shard, S little-endian uint64
                               (empty: every shard at "b"); "b" is then their minimum
                    "p"  int   -1 for a whole update; else the range shard this message is the
                               part of (an update too large for one message is split per shard)
                    "lo" int   first entry of the part's range (0 for a whole update)
                    "m"  int   entries in the part's range (n for a whole update); the indices
                               of a part are coded over [0, m) and offset by lo
                    "kt" int   entries of the whole update (its parts together)

An encoder writes version 3 only for what version 2 cannot say (several shards' bases, or a
part), so single-shard messages are byte for byte what they were; the decoder reads 1, 2 and 3.

Index codings (the encoder computes the exact size of each candidate and keeps the smallest):

    0 EMPTY    k == 0; no bytes
    1 ALL      k == n; no bytes (every parameter is present, in order)
    2 EF       Elias-Fano of the k indices with L low bits each: a bit stream of the k*L low
               bits (MSB first, entry after entry) followed by the high-part bitmap of
               ((n-1) >> L) + k bits in which entry i sets bit (index >> L) + i; zero-padded to
               whole bytes. Costs about 2 + log2(n/k) bits per entry, within a few percent to
               ~12% of the floor log2(C(n, k)) / k for 1e-3 <= k/n <= 0.1.
    3 BITMAP   n bits, bit j set iff j is an index (np.packbits order); cheapest when dense
    4 COMP_EF  EF (as above, with its own L) of the n - k indices that are NOT present;
               cheapest when only a few parameters are missing

Value codings (one decoder accepts all; decoded values are always float32):

    f32  k * 4 bytes, raw little-endian float32; exact (bit for bit)
    f16  k * 2 bytes, little-endian float16; see :class:`ValueCoding` for the error bound and
         how ``encode(..., bound=γ)`` keeps a value within ±γ inside ±γ
    q8   4 bytes float32 scale, then k int8; unbiased stochastic rounding

Decoding is defensive: the size limit is checked before anything else, the MAC (when the caller
has keys) before msgpack sees a byte, msgpack runs with explicit limits and no extension types,
the schema is exact, and every claimed count is checked against the bytes actually present before
an array is allocated, and the number of set bits of a bitmap is counted (in place) before the
positions are materialised. So no decoded array is much larger than the message itself: peak
memory of a decode, outputs included, stays within about 20x the body size
(``tests/unit/test_wire.py::test_forged_counts_allocate_little`` measures it), and within a few MB
when ``expected_n`` pins the model size.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import hmac
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
from dssgd.shared.errors import AuthenticationError, WireError

__all__ = [
    "MAX_MESSAGE_BYTES",
    "SCHEMA_VERSION",
    "SECURE_KIND",
    "AuthenticationError",
    "SecureUpdate",
    "Update",
    "ValueCoding",
    "WireError",  # re-exported so callers can write `except wire.WireError`
    "decode",
    "decode_secure",
    "describe",
    "encode",
    "encode_parts",
    "encode_secure",
    "encoded_index_bits",
    "log2_binomial",
    "message_limit",
    "peek_participant",
]

SCHEMA_VERSION: int = 3  # the newest this build writes (2 when 3 adds nothing; see above)
MAX_MESSAGE_BYTES: int = 8 * 1024 * 1024
# A message larger than this is split into one part per range shard (``encode_parts``): every
# broker set-up here takes it (RabbitMQ's max_message_size is 128 MiB by default, 9 MiB in the
# private clusters of testing/, set for MAX_MESSAGE_BYTES plus headers).
SPLIT_BYTES: int = MAX_MESSAGE_BYTES


def message_limit(n: int) -> int:
    """The size limit for an update of a model of n entries: MAX_MESSAGE_BYTES, or more when the
    model needs it, so no valid update is ever refused for its size. An entry costs at most 4
    bytes of value and, over a whole update, 2 bits of Elias-Fano index; 5 bytes an entry and
    1 MiB for the rest bound every coding."""
    return max(MAX_MESSAGE_BYTES, (1 << 20) + 5 * n)


MAX_RUN_ID_CHARS = 64
_MAX_PARTICIPANT = 2**32
_MAX_SEQ = 2**63
_MAX_N = 2**32
_MAX_PARTS = 4096  # range shards of one run at most (shared/config.py)

_FLAG_MAC = 0x01
_KNOWN_FLAGS = _FLAG_MAC
_HEADER_V1 = 6  # version, flags, uint32 participant
_MAC_BYTES = hashlib.sha256().digest_size
_MAX_EF_LOW_BITS = 32  # n < 2**32, so a wider low part never helps
_EF_DECODE_CHUNK = 1 << 16  # entries per step when decoding low bits (bounds temporary memory)

# Index coding identifiers (stored in the message; never renumber, only append).
_IX_EMPTY = 0
_IX_ALL = 1
_IX_EF = 2
_IX_BITMAP = 3
_IX_COMP_EF = 4
_IX_NAMES = {
    _IX_EMPTY: "empty",
    _IX_ALL: "all",
    _IX_EF: "ef",
    _IX_BITMAP: "bitmap",
    _IX_COMP_EF: "complement-ef",
}


class ValueCoding(enum.StrEnum):
    """How the values of an update travel.

    * ``F32``: raw float32, exact.
    * ``F16``: float16, round to nearest, except that with ``encode(..., bound=b)`` a value
      with ``|v| <= b`` whose nearest float16 lies beyond ``b`` is moved one float16 step toward
      zero (so clipped values at exactly ±γ stay within ±γ; the error is then below one step,
      ``2**-10`` relative). For ``2**-14 <= |v| <= 65504`` (float16's normal
      range) the relative error is at most ``2**-11``; below that range the absolute error is at
      most ``2**-25``. A value that rounds beyond float16's range (``|v| >= 65520``) makes
      :func:`encode` raise :class:`WireError` instead of silently becoming infinite.
    * ``Q8``: one float32 ``scale = max|v| / 127`` (rounded up so that no ``|v| / scale`` exceeds
      127) and one int8 per entry, ``q = floor(v / scale + u)`` with ``u ~ U[0, 1)``, clipped to
      ``[-127, 127]``. Decoded ``q * scale`` satisfies ``|decoded - v| < scale`` (plus one float32
      rounding of the product) and ``E[decoded] == v``: the rounding is unbiased.
    """

    F32 = "f32"
    F16 = "f16"
    Q8 = "q8"


# Value coding identifiers on the wire (never renumber, only append).
_VC_IDS = {ValueCoding.F32: 0, ValueCoding.F16: 1, ValueCoding.Q8: 2}
_VC_BY_ID = {v: k for k, v in _VC_IDS.items()}
_Q8_SCALE_BYTES = 4


@dataclass(frozen=True, eq=False)
class Update:
    """A sparse gradient update: ``values[i]`` belongs to parameter ``indices[i]``.

    ``indices`` is int64, strictly increasing, all in ``[0, n)``; ``values`` is float32 of the
    same length. :func:`encode` checks these; the constructor does not, to stay cheap.
    """

    run_id: str
    participant: int
    seq: int
    base_version: int
    n: int
    indices: np.ndarray
    values: np.ndarray
    # max |value|, filled in by decode (which has the extremes at hand from its finiteness check)
    # so the aggregator's γ check costs no second pass; None when unknown.
    peak: float | None = field(default=None, repr=False)
    # Sender's wall clock (seconds) when it encoded the message; carried and authenticated from
    # schema 2 on (encode fills in time.time() when None), None when decoded from version 1.
    sent_at: float | None = field(default=None, repr=False)
    # Range shards (schema 3): the base version of every shard (None: every shard at
    # base_version), and for a part of a split update its shard, range [lo, hi) and the
    # entries of the whole update. A whole update has part None.
    bases: tuple[int, ...] | None = field(default=None, repr=False)
    part: int | None = field(default=None, repr=False)
    span: tuple[int, int] | None = field(default=None, repr=False)
    total: int | None = field(default=None, repr=False)

    @property
    def count(self) -> int:
        """Number of (index, value) entries."""
        return int(self.indices.shape[0])

    @property
    def whole_count(self) -> int:
        """Entries of the whole update (a part's siblings included)."""
        return self.count if self.total is None else self.total

    def base_of(self, shard: int) -> int:
        """The version of ``shard`` this update was computed from."""
        if self.bases is None:
            return self.base_version
        return self.bases[shard] if shard < len(self.bases) else self.base_version

    def _scalars(self) -> tuple[str, int, int, int, int]:
        return (self.run_id, self.participant, self.seq, self.base_version, self.n)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Update):
            return NotImplemented
        if self._scalars() != other._scalars():
            return False
        if not np.array_equal(self.indices, other.indices):
            return False
        a = np.ascontiguousarray(self.values, dtype=np.float32)
        b = np.ascontiguousarray(other.values, dtype=np.float32)
        # Bit comparison: NaN payloads and -0.0 must survive a round trip, and == would say no.
        return a.shape == b.shape and bool(np.array_equal(a.view(np.uint32), b.view(np.uint32)))

    __hash__ = None  # type: ignore[assignment]  # holds mutable arrays


# ---------------------------------------------------------------------------------------------
# Index coding


def _ef_bits(n: int, k: int, low: int) -> int:
    """Exact bit count of an Elias-Fano coding of k of n indices with ``low`` low bits."""
    return k * low + ((n - 1) >> low) + k


def _best_ef(n: int, k: int) -> tuple[int, int]:
    """(bytes, L) of the Elias-Fano coding of k of n indices with the fewest bits.

    The size is convex in L: going from L to L+1 adds k low bits and saves ceil(a/2) high bits,
    a = (n-1) >> L, which only shrinks as L grows. So the first L where the saving no longer
    beats the cost is the exact optimum.
    """
    low = 0
    while low < _MAX_EF_LOW_BITS and ((((n - 1) >> low) + 1) >> 1) > k:
        low += 1
    return (_ef_bits(n, k, low) + 7) // 8, low


def _ef_encode(idx: np.ndarray, n: int, low: int) -> bytes:
    k = idx.shape[0]
    lo_bits = k * low
    bits = np.zeros(lo_bits + ((n - 1) >> low) + k, dtype=np.uint8)
    if low:
        # One vectorised pass per bit plane (<= 32 planes, each over all k entries): measured
        # faster than unpacking whole integers and slicing columns.
        planes = bits[:lo_bits].reshape(k, low)
        for j in range(low):
            planes[:, j] = (idx >> (low - 1 - j)) & 1
    bits[lo_bits + (idx >> low) + np.arange(k)] = 1
    return np.packbits(bits).tobytes()


# Powers of two, most significant first, per low-bit width: float32 is exact up to 24 bits.
_EF_WEIGHTS = {
    low: np.exp2(np.arange(low - 1, -1, -1)).astype(np.float32 if low <= 24 else np.float64)
    for low in range(1, _MAX_EF_LOW_BITS + 1)
}


def _count_set(bits: np.ndarray, k: int, what: str) -> None:
    """Refuse a forged section before its positions are materialised (8 bytes per set bit)."""
    found = int(np.count_nonzero(bits))
    if found != k:
        raise WireError(f"{what} holds {found} entries but the message declares {k}")


def _ef_decode(data: bytes, n: int, k: int, low: int) -> np.ndarray:
    """Inverse of :func:`_ef_encode`; the caller has checked len(data) against (n, k, low).

    Written for few NumPy calls: at θu = 0.01 each call's fixed cost outweighs its work, and
    this runs once per update on the aggregator's critical path.
    """
    lo_bits = k * low
    total = _ef_bits(n, k, low)
    pad = 8 * len(data) - total
    if pad and data[-1] & ((1 << pad) - 1):
        raise WireError("index section has non-zero padding bits")
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=total)
    high = bits[lo_bits:].view(bool)
    _count_set(high, k, "index section")
    # nonzero() on a bool view is several times faster than on uint8; it yields int64 (intp).
    out = np.flatnonzero(high)
    out -= np.arange(k, dtype=out.dtype)
    if not low:
        return out
    # Bits times powers of two through BLAS (measured several times faster than packbits along
    # an axis): exact because every partial sum is an integer below 2**low, which float32 holds
    # exactly up to 24 bits and float64 up to 53. Chunks cap the float copy of the bit matrix,
    # so a large forged message cannot make it huge.
    out <<= low
    planes = bits[:lo_bits].reshape(k, low)
    weights = _EF_WEIGHTS[low]
    ftype = weights.dtype
    for start in range(0, k, _EF_DECODE_CHUNK):
        stop = start + _EF_DECODE_CHUNK
        out[start:stop] |= (planes[start:stop].astype(ftype) @ weights).astype(out.dtype)
    return out


def _choose_index_coding(n: int, k: int) -> tuple[int, int, int]:
    """(coding, L, bytes) of the smallest index coding for k of n."""
    if k == 0:
        return _IX_EMPTY, 0, 0
    if k == n:
        return _IX_ALL, 0, 0
    ef_bytes, ef_low = _best_ef(n, k)
    comp_bytes, comp_low = _best_ef(n, n - k)
    candidates = [
        (ef_bytes, _IX_EF, ef_low),
        ((n + 7) // 8, _IX_BITMAP, 0),
        (comp_bytes, _IX_COMP_EF, comp_low),
    ]
    size, coding, low = min(candidates)
    return coding, low, size


def _index_section_bytes(coding: int, n: int, k: int, low: int) -> int:
    """Exact byte length an index section must have, or raise if the combination is invalid."""
    if coding == _IX_EMPTY:
        if k != 0:
            raise WireError(f"index coding 'empty' with {k} entries")
        return 0
    if coding == _IX_ALL:
        if k != n:
            raise WireError(f"index coding 'all' with {k} entries for a model of {n}")
        return 0
    if coding == _IX_BITMAP:
        return (n + 7) // 8
    if coding in (_IX_EF, _IX_COMP_EF):
        m = k if coding == _IX_EF else n - k
        if m < 1:
            raise WireError(f"index coding '{_IX_NAMES[coding]}' with no entries to code")
        if not 0 <= low <= _MAX_EF_LOW_BITS:
            raise WireError(f"Elias-Fano low-bit width {low} is out of range 0..32")
        return (_ef_bits(n, m, low) + 7) // 8
    raise WireError(f"unknown index coding {coding}")


def _encode_indices(idx: np.ndarray, n: int) -> tuple[int, int, bytes]:
    k = idx.shape[0]
    coding, low, _ = _choose_index_coding(n, k)
    if coding in (_IX_EMPTY, _IX_ALL):
        return coding, 0, b""
    if coding == _IX_EF:
        return coding, low, _ef_encode(idx, n, low)
    mask = np.zeros(n, dtype=np.uint8)
    mask[idx] = 1
    if coding == _IX_BITMAP:
        return coding, 0, np.packbits(mask).tobytes()
    return coding, low, _ef_encode(np.flatnonzero(mask == 0), n, low)


def _decode_indices(coding: int, data: bytes, n: int, k: int, low: int) -> np.ndarray:
    """Decode an index section whose length has already been checked."""
    if coding == _IX_EMPTY:
        return np.zeros(0, dtype=np.int64)
    if coding == _IX_ALL:
        return np.arange(n, dtype=np.int64)
    if coding == _IX_BITMAP:
        bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
        if bits[n:].any():
            raise WireError("index bitmap has non-zero padding bits")
        _count_set(bits[:n], k, "index bitmap")
        return np.flatnonzero(bits[:n].view(bool)).astype(np.int64, copy=False)
    m = k if coding == _IX_EF else n - k
    coded = _ef_decode(data, n, m, low)
    # EF yields non-decreasing values by construction; equal neighbours or a last value past n
    # can only come from a forged section.
    if m > 1 and not (coded[1:] > coded[:-1]).all():
        raise WireError("indices are not strictly increasing")
    if coded[-1] >= n:
        raise WireError(f"index {int(coded[-1])} is out of range for a model of {n}")
    if coding == _IX_EF:
        return coded
    mask = np.ones(n, dtype=bool)
    mask[coded] = False
    return np.flatnonzero(mask).astype(np.int64, copy=False)


# ---------------------------------------------------------------------------------------------
# Value coding


def _encode_values(
    values: np.ndarray,
    coding: ValueCoding,
    rng: np.random.Generator | None,
    bound: float | None = None,
) -> bytes:
    if coding is ValueCoding.F32:
        return values.astype("<f4", copy=False).tobytes()
    if coding is ValueCoding.F16:
        with np.errstate(over="ignore"):  # overflow is reported below as a WireError
            half = values.astype("<f2")
        if not bool(np.isfinite(half).all()):
            bad = float(values[~np.isfinite(half)][0])
            raise WireError(f"value {bad!r} is beyond float16 range (|v| < 65520); use f32 or q8")
        if bound is not None:
            # Round to nearest may land above a bound that is not a float16 number (half of all
            # γ): step those entries toward zero, which puts them back within |v| <= bound.
            # Only values within the bound move: a larger one (a buffer sent whole) keeps its
            # nearest float16.
            over = (np.abs(half.astype(np.float64)) > bound) & (np.abs(values) <= bound)
            if over.any():
                half[over] = np.nextafter(half[over], np.float16(0))
        return half.tobytes()
    # Q8
    wide = values.astype(np.float64)
    max_abs = float(np.abs(wide).max()) if wide.shape[0] else 0.0
    scale = np.float32(max_abs / 127.0)
    if float(scale) * 127.0 < max_abs:
        # Round the scale up so |v| / scale <= 127: clipping would otherwise bias the top entry.
        scale = np.nextafter(scale, np.float32(np.inf))
    if max_abs == 0.0:
        q = np.zeros(wide.shape[0], dtype=np.int8)
    else:
        gen = rng if rng is not None else np.random.default_rng()
        noisy = np.floor(wide / float(scale) + gen.random(wide.shape[0]))
        q = np.clip(noisy, -127, 127).astype(np.int8)
    return np.asarray(scale, dtype="<f4").tobytes() + q.tobytes()


def _value_section_bytes(coding: ValueCoding, k: int) -> int:
    if coding is ValueCoding.F32:
        return 4 * k
    if coding is ValueCoding.F16:
        return 2 * k
    return _Q8_SCALE_BYTES + k


def _decode_values(coding: ValueCoding, data: bytes, k: int) -> tuple[np.ndarray, float]:
    """Decode a value section whose length has already been checked: (float32 values, max |v|)."""
    if coding is ValueCoding.F32:
        out = np.frombuffer(data, dtype="<f4").astype(np.float32)
    elif coding is ValueCoding.F16:
        out = np.frombuffer(data, dtype="<f2").astype(np.float32)
    else:
        scale = np.frombuffer(data, dtype="<f4", count=1)[0]
        if not (np.isfinite(scale) and scale >= 0):
            raise WireError(f"q8 scale {float(scale)!r} is not a finite non-negative number")
        q = np.frombuffer(data, dtype=np.int8, offset=_Q8_SCALE_BYTES)
        if k and int(q.min()) < -127:
            raise WireError("q8 value -128 is outside the symmetric range [-127, 127]")
        with np.errstate(over="ignore"):  # a forged scale may overflow; refused just below
            out = q.astype(np.float32) * np.float32(scale)
    if not k:
        return out, 0.0
    # min and max are non-finite exactly when some value is (NaN propagates), and give max |v|.
    lo, hi = float(out.min()), float(out.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise WireError("message carries a non-finite value")
    return out, max(hi, -lo)


# ---------------------------------------------------------------------------------------------
# Encoding


def _check_int(name: str, value: object, lo: int, hi: int) -> int:
    # bool is an int subclass but never a meaningful count or id.
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise WireError(f"{name} must be an integer, got {type(value).__name__}")
    v = int(value)
    if not lo <= v < hi:
        raise WireError(f"{name} = {v} is out of range [{lo}, {hi})")
    return v


def _check_run_id(run_id: object) -> str:
    if not isinstance(run_id, str):
        raise WireError(f"run_id must be a str, got {type(run_id).__name__}")
    if len(run_id) > MAX_RUN_ID_CHARS:
        raise WireError(f"run_id is {len(run_id)} characters; at most {MAX_RUN_ID_CHARS} allowed")
    return run_id


def _checked_arrays(update: Update) -> tuple[np.ndarray, np.ndarray]:
    """Validated (int64 indices, float32 values) of an update about to be encoded."""
    idx, val, n = update.indices, update.values, update.n
    if not isinstance(idx, np.ndarray) or idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise WireError("indices must be a 1-D integer numpy array")
    if not isinstance(val, np.ndarray) or val.ndim != 1 or val.dtype != np.float32:
        raise WireError("values must be a 1-D float32 numpy array")
    k = idx.shape[0]
    if val.shape[0] != k:
        raise WireError(f"{k} indices but {val.shape[0]} values")
    if k > n:
        raise WireError(f"{k} entries for a model of only {n} parameters")
    if k:
        # Range first: it makes the int64 cast below lossless for unsigned input.
        if int(idx.min()) < 0 or int(idx.max()) >= n:
            lo, hi = int(idx.min()), int(idx.max())
            raise WireError(f"indices must lie in [0, {n}); got [{lo}, {hi}]")
        idx = idx.astype(np.int64, copy=False)
        if k > 1 and not bool(np.all(idx[1:] > idx[:-1])):
            raise WireError("indices must be strictly increasing (sorted, no duplicates)")
        if not bool(np.isfinite(val).all()):
            raise WireError("values must be finite (no NaN or infinity)")
    else:
        idx = idx.astype(np.int64, copy=False)
    return idx, val


def encode(
    update: Update,
    *,
    values: ValueCoding | str = ValueCoding.F32,
    key: bytes | None = None,
    rng: np.random.Generator | None = None,
    bound: float | None = None,
) -> bytes:
    """Encode ``update`` as one message body (schema :data:`SCHEMA_VERSION`).

    ``values`` picks the value coding (see :class:`ValueCoding`); the index coding is chosen
    automatically as the smallest for this update's density. With ``key`` (the participant's
    secret) an HMAC-SHA256 tag over all preceding bytes is appended. ``rng`` drives Q8's
    stochastic rounding only. ``bound`` (the run's γ) keeps values within ±bound inside ±bound
    through f16. ``update.sent_at`` (default: now) travels as the sender's clock. Raises
    :class:`WireError` if the update is invalid (ranges, unsorted/duplicate/out-of-range indices,
    lengths, non-finite values), does not fit the coding, or exceeds :data:`MAX_MESSAGE_BYTES`.
    """
    if not isinstance(update, Update):
        raise WireError(f"expected an Update, got {type(update).__name__}")
    try:
        coding = ValueCoding(values)
    except ValueError:
        raise WireError(f"unknown value coding {values!r}") from None
    run_id = _check_run_id(update.run_id)
    participant = _check_int("participant", update.participant, 0, _MAX_PARTICIPANT)
    seq = _check_int("seq", update.seq, 1, _MAX_SEQ)
    base = _check_int("base_version", update.base_version, 0, _MAX_SEQ)
    n = _check_int("n", update.n, 1, _MAX_N)
    sent_ms = _check_int("sent_at (ms)", round((update.sent_at or time.time()) * 1000), 0, _MAX_SEQ)
    idx, val = _checked_arrays(update)
    if key is not None and (not isinstance(key, bytes) or not key):
        raise WireError("key must be non-empty bytes")

    extra = _v3_fields(update, n, idx)
    lo = extra["lo"] if extra else 0
    m = extra["m"] if extra else n
    ic, low, ix = _encode_indices(idx - lo if lo else idx, m)
    payload = {
        "r": run_id,
        "s": seq,
        "b": base,
        "n": n,
        "k": idx.shape[0],
        "ic": ic,
        "il": low,
        "ix": ix,
        "vc": _VC_IDS[coding],
        "vx": _encode_values(val, coding, rng, bound),
        "t": sent_ms,
        **extra,
    }
    body = _pack(payload, 3 if extra else 2, participant, key)
    if len(body) > (limit := message_limit(m)):
        raise WireError(f"message would be {len(body)} bytes; the limit is {limit}")
    return body


def _pack(payload: dict[str, Any], version: int, participant: int, key: bytes | None) -> bytes:
    try:
        packed = msgpack.packb(payload, use_bin_type=True)
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. a run id with lone surrogates
        raise WireError(f"cannot encode update: {exc}") from exc
    flags = _FLAG_MAC if key is not None else 0
    body = bytes((version, flags)) + participant.to_bytes(4, "little") + packed
    if key is not None:
        body += hmac.digest(key, body, "sha256")
    return body


def _v3_fields(update: Update, n: int, idx: np.ndarray) -> dict[str, Any]:
    """Schema 3's fields, or {} when the update needs none (then it travels as schema 2)."""
    bases = update.bases
    if update.part is None and (bases is None or len(set(bases)) <= 1):
        return {}
    if bases is not None:
        for b in bases:
            _check_int("shard base version", b, 0, _MAX_SEQ)
        if bases and min(bases) != update.base_version:
            raise WireError("base_version must be the least of the shard bases")
    bs = np.asarray(bases or (), "<u8").tobytes()
    if update.part is None:
        return {"bs": bs, "p": -1, "lo": 0, "m": n, "kt": idx.shape[0]}
    part = _check_int("part", update.part, 0, _MAX_PARTS)
    if update.span is None:
        raise WireError("a part needs its range (span)")
    lo = _check_int("part start", update.span[0], 0, n)
    hi = _check_int("part end", update.span[1], lo + 1, n + 1)
    if idx.shape[0] and (int(idx[0]) < lo or int(idx[-1]) >= hi):
        raise WireError(f"part {part} holds entries outside its range [{lo}, {hi})")
    total = _check_int("total entries", update.whole_count, idx.shape[0], n + 1)
    return {"bs": bs, "p": part, "lo": lo, "m": hi - lo, "kt": total}


def encode_parts(
    update: Update,
    spans: list[tuple[int, int]],
    *,
    split_bytes: int | None = None,
    **options: Any,
) -> list[bytes]:
    """The message bodies that carry ``update``: one, or one part per range shard.

    ``spans`` are the shards' ranges [lo, hi) (``chunks.Layout.shard_span``). When the whole
    message would exceed ``split_bytes`` (default :data:`SPLIT_BYTES`) and there is more than one
    shard, the update is cut at the shard boundaries and each part sent as its own message
    (every part, even an empty one, so each shard sees the sequence number), shard 0's last:
    the aggregator deduplicates each on (participant, seq, shard) and applies each to its shard
    only. ``options`` are :func:`encode`'s keyword arguments.
    """
    limit = SPLIT_BYTES if split_bytes is None else split_bytes
    body = encode(update, **options)
    if len(body) <= limit or len(spans) <= 1:
        return [body]
    idx = update.indices.astype(np.int64, copy=False)
    cuts = np.searchsorted(idx, [lo for lo, _ in spans] + [spans[-1][1]])
    out = []
    for s in reversed(range(len(spans))):
        a, b = int(cuts[s]), int(cuts[s + 1])
        part = dataclasses.replace(
            update,
            indices=idx[a:b],
            values=update.values[a:b],
            part=s,
            span=spans[s],
            total=update.count,
            sent_at=update.sent_at or time.time(),
        )
        out.append(encode(part, **options))
    return out


# ---------------------------------------------------------------------------------------------
# Decoding


@dataclass(frozen=True)
class _Header:
    version: int
    flags: int
    participant: int
    size: int

    @property
    def has_mac(self) -> bool:
        return bool(self.flags & _FLAG_MAC)


def _header_v1(body: bytes) -> _Header:
    if len(body) < _HEADER_V1:
        raise WireError(f"message of {len(body)} bytes is shorter than a {_HEADER_V1}-byte header")
    flags = body[1]
    if flags & ~_KNOWN_FLAGS:
        raise WireError(f"unknown flag bits 0x{flags & ~_KNOWN_FLAGS:02x}")
    participant = int.from_bytes(body[2:6], "little")
    return _Header(body[0], flags, participant, _HEADER_V1)


def _is_bytes(body: object) -> bool:
    return isinstance(body, (bytes, bytearray))


def _as_body(body: object) -> bytes:
    if isinstance(body, bytes):
        return body
    if isinstance(body, (bytearray, memoryview)):
        return bytes(body)
    raise WireError(f"message body must be bytes, got {type(body).__name__}")


def _read_header(body: bytes) -> _Header:
    if not body:
        raise WireError("empty message")
    version = body[0]
    fmt = _FORMATS.get(version)
    if fmt is None:
        known = ", ".join(str(v) for v in sorted(_FORMATS))
        raise WireError(f"unsupported schema version {version} (this build reads {known})")
    header = fmt[0](body)
    if header.has_mac and len(body) < header.size + _MAC_BYTES:
        raise WireError("message is flagged as authenticated but is too short to hold a MAC")
    return header


def _reject_ext(code: int, data: bytes) -> object:
    raise WireError(f"msgpack extension type {code} is not allowed")


def _unique_map(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise WireError("duplicate key in message map")
    return out


_SCHEMA_V1: dict[str, type] = {  # v2 adds "t" (see _SCHEMA_V2)
    "r": str,
    "s": int,
    "b": int,
    "n": int,
    "k": int,
    "ic": int,
    "il": int,
    "ix": bytes,
    "vc": int,
    "vx": bytes,
}


_SCHEMA_V2: dict[str, type] = {**_SCHEMA_V1, "t": int}
_SCHEMA_V3: dict[str, type] = {**_SCHEMA_V2, "bs": bytes, "p": int, "lo": int, "m": int, "kt": int}
_SCHEMAS = {1: _SCHEMA_V1, 2: _SCHEMA_V2, 3: _SCHEMA_V3}


def _unpack(payload: bytes | memoryview, schema: dict[str, type]) -> dict[str, Any]:
    try:
        obj = msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=4 * MAX_RUN_ID_CHARS,
            max_bin_len=len(payload),
            max_array_len=0,
            max_map_len=len(schema),
            max_ext_len=0,
            ext_hook=_reject_ext,
            object_pairs_hook=_unique_map,
        )
    except WireError:
        raise
    except Exception as exc:  # msgpack raises a zoo of ValueError/StackError/ExtraData/...
        raise WireError(f"payload is not valid msgpack: {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, dict):
        raise WireError(f"payload must be a map, got {type(obj).__name__}")
    if set(obj) != set(schema):
        missing = sorted(set(schema) - set(obj))
        unknown = sorted(str(x) for x in set(obj) - set(schema))
        raise WireError(
            f"payload keys differ from the schema: missing {missing}, unknown {unknown}"
        )
    for name, typ in schema.items():
        # `type(...) is` so that bool (an int subclass) is refused where an int is expected.
        if type(obj[name]) is not typ:
            got = type(obj[name]).__name__
            raise WireError(f"field {name!r} must be {typ.__name__}, got {got}")
    return obj


def _decode_body(
    header: _Header,
    payload: memoryview,
    expected_run: str | None,
    expected_n: int | None,
) -> Update:
    obj = _unpack(payload, _SCHEMAS[header.version])
    sent_at = None
    if "t" in obj:
        sent_at = _check_int("sent_at (ms)", obj["t"], 0, _MAX_SEQ) / 1000.0
    run_id = _check_run_id(obj["r"])
    seq = _check_int("seq", obj["s"], 1, _MAX_SEQ)
    base = _check_int("base_version", obj["b"], 0, _MAX_SEQ)
    n = _check_int("n", obj["n"], 1, _MAX_N)
    if expected_run is not None and run_id != expected_run:
        raise WireError(
            f"message is for run {run_id!r} but this aggregator serves run {expected_run!r}"
        )
    if expected_n is not None and n != expected_n:
        raise WireError(
            f"message is for a model of {n} parameters but this run's model has {expected_n}"
        )
    shards = _shard_fields(obj, n) if header.version >= 3 else {}
    lo, m = shards.pop("lo", 0), shards.pop("m", n)
    k = _check_int("k", obj["k"], 0, m + 1)
    vcode = _VC_BY_ID.get(obj["vc"])
    if vcode is None:
        raise WireError(f"unknown value coding {obj['vc']}")
    ic, low = obj["ic"], obj["il"]
    if ic not in (_IX_EF, _IX_COMP_EF) and low != 0:
        raise WireError(f"low-bit width {low} given for index coding {ic}")
    # Every length is checked against what the declared (n, k) imply before anything is
    # allocated from it, so forged counts cannot make us allocate more than the body supports.
    want_vx = _value_section_bytes(vcode, k)
    if len(obj["vx"]) != want_vx:
        raise WireError(
            f"value section is {len(obj['vx'])} bytes; {k} {vcode.value} values need {want_vx}"
        )
    want_ix = _index_section_bytes(ic, m, k, low)
    if len(obj["ix"]) != want_ix:
        raise WireError(f"index section is {len(obj['ix'])} bytes; its coding needs {want_ix}")
    values, peak = _decode_values(vcode, obj["vx"], k)
    indices = _decode_indices(ic, obj["ix"], m, k, low)
    if lo:
        indices += lo
    if shards.get("total", k) < k:
        raise WireError(f"a part of {k} entries claims a whole update of {shards['total']}")
    return Update(
        run_id, header.participant, seq, base, n, indices, values, peak, sent_at, **shards
    )


def _shard_fields(obj: dict[str, Any], n: int) -> dict[str, Any]:
    """Schema 3's shard bases and part fields, checked (lo and m are popped by the caller)."""
    bs = obj["bs"]
    if len(bs) % 8 or len(bs) // 8 > _MAX_PARTS:
        raise WireError(f"shard base section of {len(bs)} bytes is not 8 per shard")
    bases = tuple(int(b) for b in np.frombuffer(bs, "<u8"))
    if any(b >= _MAX_SEQ for b in bases):
        raise WireError("a shard base version is out of range")
    if bases and min(bases) != obj["b"]:
        raise WireError(f"base version {obj['b']} is not the least shard base {min(bases)}")
    part = _check_int("part", obj["p"], -1, _MAX_PARTS)
    lo = _check_int("part start", obj["lo"], 0, n)
    m = _check_int("part range", obj["m"], 1, n - lo + 1)
    total = _check_int("total entries", obj["kt"], 0, n + 1)
    if part < 0:
        if lo != 0 or m != n:
            raise WireError("a whole update must cover [0, n)")
        return {"bases": bases or None, "lo": 0, "m": n}
    return {"bases": bases or None, "part": part, "span": (lo, lo + m), "total": total,
            "lo": lo, "m": m}  # fmt: skip


# Dispatch on the version byte: (header reader, body decoder). Keep old entries when adding a
# version so messages from older participants keep decoding.
_FORMATS: dict[
    int,
    tuple[
        Callable[[bytes], _Header],
        Callable[[_Header, memoryview, str | None, int | None], Update],
    ],
] = {v: (_header_v1, _decode_body) for v in (1, 2, 3)}  # one header, schema per version


def peek_participant(body: bytes) -> int:
    """Participant id from the fixed header, without decoding or verifying the rest.

    Lets the aggregator look up the participant's key before :func:`decode` verifies the MAC.
    The id is untrusted until that verification succeeds. Raises :class:`WireError` if the header
    is malformed or the version unknown.
    """
    return _read_header(_as_body(body)).participant


def decode(
    body: bytes,
    *,
    key_for: Callable[[int], bytes | None] | None = None,
    expected_run: str | None = None,
    expected_n: int | None = None,
    max_bytes: int = MAX_MESSAGE_BYTES,
) -> Update:
    """Decode and fully validate one message body; raises :class:`WireError` on any defect.

    With ``key_for``, the message must carry a MAC made with ``key_for(participant)``; it is
    checked in constant time before the payload is parsed (unknown participant, missing MAC and
    bad MAC are all WireError). Without ``key_for`` a MAC, if present, is ignored.
    ``expected_run`` / ``expected_n`` refuse messages for another run or model size. Exceptions
    raised by ``key_for`` itself propagate unchanged.
    """
    if expected_n is not None and max_bytes == MAX_MESSAGE_BYTES:
        max_bytes = message_limit(expected_n)  # the run's model may need more (never less)
    # Size first, before even copying a bytearray/memoryview into bytes.
    size = body.nbytes if isinstance(body, memoryview) else len(body) if _is_bytes(body) else 0
    if size > max_bytes:
        raise WireError(f"message of {size} bytes exceeds the {max_bytes}-byte limit")
    body = _as_body(body)
    header = _read_header(body)
    end = len(body) - _MAC_BYTES if header.has_mac else len(body)
    view = memoryview(body)
    if key_for is not None:
        key = key_for(header.participant)
        if key is None:
            raise AuthenticationError(f"unknown participant {header.participant}")
        if not isinstance(key, (bytes, bytearray)) or not key:
            raise WireError(f"key for participant {header.participant} is not non-empty bytes")
        if not header.has_mac:
            raise AuthenticationError(
                f"unauthenticated message from participant {header.participant}"
            )
        tag = hmac.digest(key, view[:end], "sha256")
        if not hmac.compare_digest(tag, body[end:]):
            raise AuthenticationError(f"bad mac on message from participant {header.participant}")
    payload = view[header.size : end]
    return _FORMATS[header.version][1](header, payload, expected_run, expected_n)


def describe(body: bytes) -> dict[str, int | str]:
    """Sizes and codings of a message's sections, for benchmarks and logs.

    Neither the MAC nor the index/value sections are checked: use :func:`decode` for that.
    """
    body = _as_body(body)
    header = _read_header(body)
    end = len(body) - _MAC_BYTES if header.has_mac else len(body)
    obj = _unpack(memoryview(body)[header.size : end], _SCHEMAS[header.version])
    return {
        "version": header.version,
        "participant": header.participant,
        "n": obj["n"],
        "k": obj["k"],
        "index_coding": _IX_NAMES.get(obj["ic"], str(obj["ic"])),
        "index_low_bits": obj["il"],
        "index_bytes": len(obj["ix"]),
        "value_coding": _VC_BY_ID[obj["vc"]].value if obj["vc"] in _VC_BY_ID else str(obj["vc"]),
        "value_bytes": len(obj["vx"]),
        "mac_bytes": _MAC_BYTES if header.has_mac else 0,
        "total_bytes": len(body),
    }


def encoded_index_bits(body: bytes) -> int:
    """Size in bits of the index section of a message (whole bytes, as sent)."""
    return 8 * int(describe(body)["index_bytes"])


def log2_binomial(n: int, k: int) -> float:
    """log2 C(n, k): the information floor in bits for coding k of n indices."""
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


# ---------------------------------------------------------------------------------------------
# Secret-shared updates (--secure two-server; shared/secure.py, docs/SECURE.md)
#
# Kind SECURE_KIND (first byte 16), same 6-byte header and optional HMAC as schema 2; the map
# holds "r", "s", "b", "n", "k", "ic", "il", "ix" and "t" exactly as schema 2, and instead of
# "vc"/"vx" two sealed boxes: "sa" for server A (its share of the values, 48 + 16 + 8k bytes)
# and "sb" for server B (a 32-byte PRG seed, 48 + 16 + 32 bytes). The lengths are public and
# exact, so both servers reach the same verdict on a message before opening their box.

SECURE_KIND: int = 16
_SCHEMA_SECURE: dict[str, type] = {
    **{k: v for k, v in _SCHEMA_V2.items() if k not in ("vc", "vx")},
    "sa": bytes,
    "sb": bytes,
}


@dataclass(frozen=True, eq=False)
class SecureUpdate:
    """A sparse update whose values travel as two sealed shares (indices stay in the clear)."""

    run_id: str
    participant: int
    seq: int
    base_version: int
    n: int
    indices: np.ndarray
    box_a: bytes
    box_b: bytes
    sent_at: float | None = field(default=None, repr=False)

    @property
    def count(self) -> int:
        return int(self.indices.shape[0])

    def box(self, role: str) -> bytes:
        return self.box_a if role == "a" else self.box_b

    def base_of(self, shard: int) -> int:  # the share servers keep one version (no shards)
        return self.base_version


def encode_secure(update: SecureUpdate, *, key: bytes | None = None) -> bytes:
    """One message body of kind :data:`SECURE_KIND` (checks as :func:`encode` does)."""
    from dssgd.shared.secure import BOX_B_BYTES, box_a_bytes

    run_id = _check_run_id(update.run_id)
    participant = _check_int("participant", update.participant, 0, _MAX_PARTICIPANT)
    seq = _check_int("seq", update.seq, 1, _MAX_SEQ)
    base = _check_int("base_version", update.base_version, 0, _MAX_SEQ)
    n = _check_int("n", update.n, 1, _MAX_N)
    sent_ms = _check_int("sent_at (ms)", round((update.sent_at or time.time()) * 1000), 0, _MAX_SEQ)
    placeholder = Update(run_id, participant, seq, base, n, update.indices,
                         np.zeros(update.indices.shape[0], np.float32))  # fmt: skip
    idx, _ = _checked_arrays(placeholder)
    k = idx.shape[0]
    if len(update.box_a) != box_a_bytes(k) or len(update.box_b) != BOX_B_BYTES:
        raise WireError("sealed shares do not have the sizes their entry count implies")
    ic, low, ix = _encode_indices(idx, n)
    payload = {"r": run_id, "s": seq, "b": base, "n": n, "k": k, "ic": ic, "il": low, "ix": ix,
               "sa": bytes(update.box_a), "sb": bytes(update.box_b), "t": sent_ms}  # fmt: skip
    body = bytes((SECURE_KIND, _FLAG_MAC if key is not None else 0))
    body += participant.to_bytes(4, "little") + msgpack.packb(payload, use_bin_type=True)
    if key is not None:
        body += hmac.digest(key, body, "sha256")
    if len(body) > MAX_MESSAGE_BYTES:
        raise WireError(f"message would be {len(body)} bytes; the limit is {MAX_MESSAGE_BYTES}")
    return body


def decode_secure(
    body: bytes,
    *,
    key_for: Callable[[int], bytes | None] | None = None,
    expected_run: str | None = None,
    expected_n: int | None = None,
    max_bytes: int = MAX_MESSAGE_BYTES,
) -> SecureUpdate:
    """Decode a :data:`SECURE_KIND` message (public parts only; the boxes stay sealed)."""
    from dssgd.shared.secure import BOX_B_BYTES, box_a_bytes

    size = len(body) if _is_bytes(body) else 0
    if size > max_bytes:
        raise WireError(f"message of {size} bytes exceeds the {max_bytes}-byte limit")
    body = _as_body(body)
    if not body or body[0] != SECURE_KIND:
        raise WireError(f"not a secret-shared update (kind {body[:1].hex() or 'empty'})")
    header = _header_v1(body)
    end = len(body) - _MAC_BYTES if header.has_mac else len(body)
    if key_for is not None:
        key = key_for(header.participant)
        if key is None:
            raise AuthenticationError(f"unknown participant {header.participant}")
        if not header.has_mac or end < header.size:
            raise AuthenticationError(
                f"unauthenticated message from participant {header.participant}"
            )
        if not hmac.compare_digest(hmac.digest(key, body[:end], "sha256"), body[end:]):
            raise AuthenticationError(f"bad mac on message from participant {header.participant}")
    obj = _unpack(memoryview(body)[header.size : end], _SCHEMA_SECURE)
    run_id = _check_run_id(obj["r"])
    n = _check_int("n", obj["n"], 1, _MAX_N)
    if expected_run is not None and run_id != expected_run:
        raise WireError(f"message is for run {run_id!r}, not {expected_run!r}")
    if expected_n is not None and n != expected_n:
        raise WireError(f"message is for a model of {n} parameters, not {expected_n}")
    k = _check_int("k", obj["k"], 0, n + 1)
    if len(obj["sa"]) != box_a_bytes(k) or len(obj["sb"]) != BOX_B_BYTES:
        raise WireError("sealed shares do not have the sizes their entry count implies")
    ic, low = obj["ic"], obj["il"]
    if ic not in (_IX_EF, _IX_COMP_EF) and low != 0:
        raise WireError(f"low-bit width {low} given for index coding {ic}")
    if len(obj["ix"]) != _index_section_bytes(ic, n, k, low):
        raise WireError("index section length does not match its coding")
    return SecureUpdate(
        run_id,
        header.participant,
        _check_int("seq", obj["s"], 1, _MAX_SEQ),
        _check_int("base_version", obj["b"], 0, _MAX_SEQ),
        n,
        _decode_indices(ic, obj["ix"], n, k, low),
        obj["sa"],
        obj["sb"],
        _check_int("sent_at (ms)", obj["t"], 0, _MAX_SEQ) / 1000.0,
    )
