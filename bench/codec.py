"""Benchmark of the update codec (issue 3): sizes, speed, cost per epoch and a fuzz pass.

Run from the repository root::

    python -m bench.codec            # full run (10^5 fuzz inputs)
    python -m bench.codec --quick    # shorter timings and 10^4 fuzz inputs

It prints, for a 105,506-parameter update at several densities, the message size, the index cost
next to the information floor log2(C(n, k)) / k, and encode/decode throughput, for every value
coding and for a plain msgpack baseline (int32 indices + float32 values). Then it times one local
epoch of the paper's CNN and reports encode+decode of a 10% update as a share of it, and finally
feeds malformed messages to the decoder. The exit code is non-zero if an acceptance figure fails.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
from dssgd.shared.errors import DssgdError, WireError
from dssgd.shared.wire import (
    Update,
    ValueCoding,
    decode,
    describe,
    encode,
    encoded_index_bits,
    log2_binomial,
)

N_PARAMS = 105_506
THETAS = (0.001, 0.01, 0.1, 1.0)
ACCEPT_INDEX_RATIO = 1.15  # index bits may exceed the floor by at most 15% ...
ACCEPT_INDEX_THETAS = (0.01, 0.1)  # ... at these densities
ACCEPT_BASELINE_RATIO = 0.75
ACCEPT_EPOCH_SHARE = 0.02
KEY = b"bench-key"


def plain_baseline(update: Update) -> bytes:
    """The naive message this codec is measured against: msgpack of raw int32 indices, raw
    float32 values and the same scalar fields."""
    return msgpack.packb(
        {
            "r": update.run_id,
            "p": update.participant,
            "s": update.seq,
            "b": update.base_version,
            "n": update.n,
            "i": update.indices.astype("<i4").tobytes(),
            "v": update.values.astype("<f4").tobytes(),
        },
        use_bin_type=True,
    )


def plain_decode(body: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Baseline decoder (no validation at all, so it is a lower bound on decode cost)."""
    obj = msgpack.unpackb(body, raw=False)
    return (
        np.frombuffer(obj["i"], "<i4").astype(np.int64),
        np.frombuffer(obj["v"], "<f4").astype(np.float32),
    )


def random_update(n: int, k: int, rng: np.random.Generator, participant: int = 1) -> Update:
    idx = np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)
    values = rng.normal(0.0, 1e-3, size=k).astype(np.float32)
    return Update("bench-run", participant, 1, 0, n, idx, values)


def seconds_per_call(fn: Callable[[], object], budget: float) -> float:
    """Median over 5 batches of the time per call; batches sized to fill ``budget`` seconds."""
    fn()  # warm caches and lazy imports
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-7)
    number = max(1, int(budget / 5 / once))
    batches = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        batches.append((time.perf_counter() - start) / number)
    return statistics.median(batches)


# --- sizes and throughput ---------------------------------------------------------------------


def _ratio(num: float, den: float) -> str:
    return f"{num / den:.3f}" if den else "-"


def _row(
    theta: float,
    name: str,
    k: int,
    size: int,
    plain: int,
    bits: float,
    floor: float,
    enc: float,
    dec: float,
    note: str,
) -> str:
    return (
        f"{theta:>7} {name:>6} {k:>7} {size:>10} {size / k:>8.3f} {bits:>10.3f} {floor:>8.3f} "
        f"{_ratio(bits, floor):>9} {size / plain:>8.3f} {k / enc / 1e6:>9.1f} "
        f"{k / dec / 1e6:>9.1f}  {note}"
    )


def codec_table(budget: float, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """Printable table rows and a list of failed acceptance checks."""
    failures: list[str] = []
    header = (
        f"{'theta_u':>7} {'coding':>6} {'k':>7} {'bytes/msg':>10} {'B/entry':>8} "
        f"{'idx bits/e':>10} {'floor/e':>8} {'idx/floor':>9} {'vs plain':>8} "
        f"{'enc Me/s':>9} {'dec Me/s':>9}  index coding"
    )
    lines = [header, "-" * len(header)]
    q8_rng = np.random.default_rng(1)
    for theta in THETAS:
        k = round(theta * N_PARAMS)
        update = random_update(N_PARAMS, k, rng)
        plain = plain_baseline(update)
        floor = log2_binomial(N_PARAMS, k) / k
        for coding in (ValueCoding.F32, ValueCoding.F16, ValueCoding.Q8):
            body = encode(update, values=coding, rng=q8_rng)
            info = describe(body)
            bits = encoded_index_bits(body) / k
            enc = seconds_per_call(
                lambda u=update, c=coding: encode(u, values=c, rng=q8_rng), budget
            )
            dec = seconds_per_call(lambda b=body: decode(b, expected_n=N_PARAMS), budget)
            note = str(info["index_coding"])
            if note.endswith("ef"):
                note += f" L={info['index_low_bits']}"
            lines.append(
                _row(theta, coding.value, k, len(body), len(plain), bits, floor, enc, dec, note)
            )
            if coding is not ValueCoding.F32:
                continue
            if theta in ACCEPT_INDEX_THETAS and bits > ACCEPT_INDEX_RATIO * floor:
                failures.append(f"index cost {bits:.3f} > 1.15 x {floor:.3f} bits at {theta}")
            if theta in ACCEPT_INDEX_THETAS and len(body) > ACCEPT_BASELINE_RATIO * len(plain):
                failures.append(f"message {len(body)} B > 0.75 x plain {len(plain)} B at {theta}")
            if k == N_PARAMS and encoded_index_bits(body) != 0:
                failures.append("index section not empty at k = n")
        enc = seconds_per_call(lambda u=update: plain_baseline(u), budget)
        dec = seconds_per_call(lambda b=plain: plain_decode(b), budget)
        lines.append(
            _row(
                theta,
                "plain",
                k,
                len(plain),
                len(plain),
                32.0,
                floor,
                enc,
                dec,
                "raw int32 (no validation)",
            )
        )
    return lines, failures


# --- one local epoch of the paper's CNN -------------------------------------------------------


def build_cnn() -> tuple[Any, str]:
    """The paper's CNN: shared.models if it exists and matches, else an inline copy."""
    import torch
    from torch import nn

    try:
        from dssgd.shared.models import build_model  # type: ignore[import-not-found,unused-ignore]
    except ImportError:  # not written yet: use the inline copy below
        build_model = None
    if build_model is not None:
        try:
            model = build_model("cnn")
        except (TypeError, DssgdError):  # another signature or model name: use the inline copy
            model = None
        if model is not None and sum(p.numel() for p in model.parameters()) == N_PARAMS:
            return model, 'dssgd.shared.models.build_model("cnn")'

    class PaperCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 32, 5),
                nn.Tanh(),
                nn.MaxPool2d(3, 3),
                nn.Conv2d(32, 64, 5),
                nn.Tanh(),
                nn.MaxPool2d(2, 2),
            )
            self.classifier = nn.Sequential(nn.Linear(256, 200), nn.Tanh(), nn.Linear(200, 10))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.classifier(torch.flatten(self.features(x), 1))
            return torch.log_softmax(out, dim=1)

    model = PaperCNN()
    assert sum(p.numel() for p in model.parameters()) == N_PARAMS
    return model, "inline PaperCNN"


def epoch_seconds(repeats: int) -> tuple[float, str]:
    """Median wall time of one local epoch: 600 random 32x32 images, batch 32, SGD lr 0.05."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, source = build_cnn()
    images = torch.randn(600, 1, 32, 32)
    labels = torch.randint(0, 10, (600,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def one_epoch() -> None:
        model.train()
        for start in range(0, 600, 32):
            opt.zero_grad()
            loss = F.nll_loss(model(images[start : start + 32]), labels[start : start + 32])
            loss.backward()
            opt.step()

    one_epoch()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        one_epoch()
        times.append(time.perf_counter() - start)
    return statistics.median(times), source


# --- fuzz -------------------------------------------------------------------------------------


def _corpus(rng: np.random.Generator) -> list[tuple[bytes, bool]]:
    """Valid messages of every index coding x value coding, with and without a MAC."""
    shapes = [
        (500, 0),
        (500, 500),
        (3000, 30),
        (2000, 1500),
        (2000, 1998),
        (300, 150),
        (N_PARAMS, round(0.01 * N_PARAMS)),
    ]
    out = []
    for n, k in shapes:
        update = random_update(n, k, rng, participant=7)
        for coding in ValueCoding:
            for keyed in (False, True):
                out.append(
                    (encode(update, values=coding, key=KEY if keyed else None, rng=rng), keyed)
                )
    return out


def _mutate(body: bytes, rng: np.random.Generator) -> bytes:
    buf = bytearray(body)
    kind = int(rng.integers(6))
    pos = int(rng.integers(len(buf)))
    if kind == 0:
        buf[pos] ^= 1 << int(rng.integers(8))
    elif kind == 1:
        del buf[pos:]
    elif kind == 2:
        buf[pos] = int(rng.integers(256))
    elif kind == 3:
        buf[pos:pos] = rng.bytes(int(rng.integers(1, 9)))
    elif kind == 4:
        del buf[pos : pos + int(rng.integers(1, 9))]
    else:
        span = int(rng.integers(1, 17))
        buf[pos : pos + span] = rng.bytes(min(span, len(buf) - pos))
    return bytes(buf)


_HEADER = bytes([2, 0, 7, 0, 0, 0])  # schema 2 (what a one-shard update is), no MAC, participant 7


def _mutate_section(fields: dict[str, Any], rng: np.random.Generator) -> bytes:
    """Keep the msgpack structure valid but corrupt the index/value bits or the counts, so the
    section decoders (not msgpack) are what gets exercised."""
    choice = int(rng.integers(4))
    if choice < 2:
        name = "ix" if choice == 0 or not fields["vx"] else "vx"
        data = bytearray(fields[name])
        for _ in range(int(rng.integers(1, 4)) if data else 0):
            data[int(rng.integers(len(data)))] ^= 1 << int(rng.integers(8))
        fields[name] = bytes(data)
    elif choice == 2:
        name = ("k", "n", "il", "ic", "vc")[int(rng.integers(5))]
        fields[name] = max(0, fields[name] + int(rng.integers(-2, 3)))
    else:
        fields["ix"] = rng.bytes(len(fields["ix"]))
    return _HEADER + msgpack.packb(fields, use_bin_type=True)


def _random_field_value(rng: np.random.Generator) -> object:
    choice = int(rng.integers(8))
    if choice == 0:
        return None
    if choice == 1:
        return bool(rng.integers(2))
    if choice == 2:
        return int(rng.integers(-(2**63), 2**63 - 1))
    if choice == 3:
        return int(rng.integers(0, 40))
    if choice == 4:
        return float(rng.normal())
    if choice == 5:
        return rng.bytes(int(rng.integers(0, 64)))
    if choice == 6:
        return "x" * int(rng.integers(0, 80))
    return [1, 2] if rng.integers(2) else {"a": 1}


def fuzz(total: int, rng: np.random.Generator) -> dict[str, Counter[str]]:
    """Feed ``total`` malformed inputs to decode; count outcomes per input family."""
    corpus = _corpus(rng)
    plain_fields = [msgpack.unpackb(body[6:], raw=False) for body, keyed in corpus if not keyed]
    families = {
        "random bytes": 0.20,
        "random after header": 0.10,
        "mutated valid": 0.45,
        "mutated section": 0.15,
        "forged field": 0.10,
    }
    results: dict[str, Counter[str]] = {}
    for family, share in families.items():
        counts: Counter[str] = Counter()
        for i in range(int(total * share)):
            kwargs: dict[str, Any] = {}
            if family == "random bytes":
                body = rng.bytes(int(rng.integers(0, 1 << int(rng.integers(1, 12)))))
            elif family == "random after header":
                size = int(rng.integers(0, 600))
                body = bytes([1, int(rng.integers(2))]) + rng.bytes(4) + rng.bytes(size)
            elif family == "mutated valid":
                base, keyed = corpus[i % len(corpus)]
                body = _mutate(base, rng)
                if keyed and i % 2:
                    kwargs["key_for"] = lambda p: KEY if p == 7 else None
            elif family == "mutated section":
                body = _mutate_section(dict(plain_fields[i % len(plain_fields)]), rng)
            else:
                fields = dict(plain_fields[i % len(plain_fields)])
                name = list(fields)[int(rng.integers(len(fields)))]
                if rng.integers(4) == 0:
                    del fields[name]
                else:
                    fields[name] = _random_field_value(rng)
                body = _HEADER + msgpack.packb(fields, use_bin_type=True)
            if i % 5 == 0:
                kwargs["expected_n"] = N_PARAMS
            try:
                decode(body, **kwargs)
                counts["accepted"] += 1
            except WireError:
                counts["WireError"] += 1
            except Exception as exc:
                counts[f"OTHER {type(exc).__name__}"] += 1
        results[family] = counts
    return results


# --- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.codec", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="shorter timings, 10^4 fuzz inputs")
    parser.add_argument("--fuzz", type=int, default=None, help="number of fuzz inputs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    budget = 0.1 if args.quick else 0.5
    failures: list[str] = []

    print(f"Codec: n = {N_PARAMS} parameters, values ~ N(0, 1e-3) float32, random index sets")
    print("floor/e = log2(C(n,k))/k; idx/floor is the index cost over that floor; vs plain is")
    print("bytes/msg over the plain msgpack baseline (int32 indices + float32 values).")
    print("Me/s = million entries per second, median of 5 batches, one thread.\n")
    lines, table_failures = codec_table(budget, rng)
    print("\n".join(lines))
    failures += table_failures

    epoch, source = epoch_seconds(3 if args.quick else 5)
    update = random_update(N_PARAMS, round(0.1 * N_PARAMS), rng)
    body = encode(update)
    enc = seconds_per_call(lambda: encode(update), budget)
    dec = seconds_per_call(lambda: decode(body, expected_n=N_PARAMS), budget)
    keyed = encode(update, key=KEY)
    enc_mac = seconds_per_call(lambda: encode(update, key=KEY), budget)
    dec_mac = seconds_per_call(
        lambda: decode(keyed, key_for=lambda p: KEY, expected_n=N_PARAMS), budget
    )
    share = (enc + dec) / epoch
    share_mac = (enc_mac + dec_mac) / epoch
    print(
        f"\nLocal epoch ({source}, 600 images, batch 32, SGD lr 0.05, 1 thread): "
        f"{epoch * 1e3:.1f} ms (median)"
    )
    print(
        f"theta_u = 0.1 f32 message: encode {enc * 1e6:.0f} us + decode {dec * 1e6:.0f} us = "
        f"{(enc + dec) * 1e3:.3f} ms = {100 * share:.2f}% of an epoch"
    )
    print(
        f"  with HMAC:               encode {enc_mac * 1e6:.0f} us + decode "
        f"{dec_mac * 1e6:.0f} us = {(enc_mac + dec_mac) * 1e3:.3f} ms = "
        f"{100 * share_mac:.2f}% of an epoch"
    )
    if share > ACCEPT_EPOCH_SHARE:
        failures.append(f"encode+decode is {100 * share:.2f}% of an epoch (> 2%)")

    total = args.fuzz if args.fuzz is not None else (10_000 if args.quick else 100_000)
    start = time.perf_counter()
    results = fuzz(total, rng)
    elapsed = time.perf_counter() - start
    grand: Counter[str] = Counter()
    print(
        f"\nFuzz: {sum(sum(c.values()) for c in results.values())} inputs through decode "
        f"in {elapsed:.1f} s"
    )
    for family, counts in results.items():
        grand.update(counts)
        detail = ", ".join(f"{name} {count}" for name, count in sorted(counts.items()))
        print(f"  {family:<20} {detail}")
    others = sum(count for name, count in grand.items() if name.startswith("OTHER"))
    print(
        f"  {'total':<20} WireError {grand['WireError']}, accepted {grand['accepted']}, "
        f"other exceptions {others}"
    )
    if others:
        failures.append(f"{others} fuzz inputs raised something other than WireError")

    print()
    if failures:
        for failure in failures:
            print(f"ACCEPTANCE FAILED: {failure}")
        return 1
    print("All acceptance figures met.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
