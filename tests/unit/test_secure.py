"""The pure parts of --secure two-server: fixed point, PRG shares, sealing, the wire kind, and the
share-server apply (both servers decide alike, shares sum to the plaintext state)."""

from __future__ import annotations

import numpy as np
import pytest
from dssgd.aggregator.share_batch import Refused, admit, apply_stream, initial_state
from dssgd.shared import secure, wire
from dssgd.shared.amqp_names import AmqpNames
from dssgd.shared.config import RunConfig
from dssgd.shared.errors import ConfigError
from dssgd.shared.rules import UpdateRule
from dssgd.shared.stream import StreamDelivery

KEYS = {role: secure.new_keypair() for role in secure.ROLES}
N = 1000


def _cfg(**kw: object) -> RunConfig:
    return RunConfig(run_id="unit-sec", secure="two-server", participants=3, theta_u=0.05, **kw)  # type: ignore[arg-type]


def _message(cfg: RunConfig, pid: int, seq: int, rng: np.random.Generator, k: int = 40):
    idx = np.sort(rng.choice(N, size=k, replace=False)).astype(np.int64)
    vals = rng.uniform(-cfg.effective_gamma, cfg.effective_gamma, size=k).astype(np.float32)
    box_a, box_b = secure.seal_update(
        vals, cfg.run_id, pid, seq, KEYS["a"][1], KEYS["b"][1], rng.bytes(32)
    )
    body = wire.encode_secure(wire.SecureUpdate(cfg.run_id, pid, seq, 0, N, idx, box_a, box_b))
    return body, vals


def test_fixed_point_and_shares_are_exact() -> None:
    rng = np.random.default_rng(1)
    v = rng.uniform(-0.05, 0.05, 5000).astype(np.float32)
    q = secure.encode_values(v)
    assert np.abs(q.view(np.int64) / 2.0**24 - v).max() <= 2.0**-25
    seed = rng.bytes(32)
    share_a = secure.split(q, seed)
    assert secure.join(share_a, seed).tobytes() == q.tobytes()
    # Each share alone is uniform: about half the top bits set, no correlation with v.
    top = (share_a >> np.uint64(63)).astype(np.float64)
    assert 0.45 < top.mean() < 0.55
    assert abs(np.corrcoef(share_a.view(np.int64).astype(np.float64), v)[0, 1]) < 5 / np.sqrt(
        v.size
    )


def test_weights_and_state_decode() -> None:
    assert secure.encode_weight(1.0) == 2**16
    assert secure.encode_weight(1 / 3) == round(2**16 / 3)
    with pytest.raises(secure.ShareError):
        secure.encode_weight(float("nan"))
    with pytest.raises(secure.ShareError):
        secure.encode_values(np.array([np.inf], np.float32))
    w0 = np.ones(3, np.float32)
    ring = np.array([2**40, -(2**39), 0], np.int64)
    assert secure.decode_state(w0, ring).tolist() == [2.0, 0.5, 1.0]
    with pytest.raises(secure.ShareError):  # a torn read lands anywhere in the ring: refused
        secure.decode_state(w0, np.array([2**63 - 1], np.int64))
    za, zb = secure.zero_shares("r", 10)
    assert (za + zb).tobytes() == np.zeros(10, np.uint64).tobytes() and za.any()


def test_sealed_boxes_open_only_for_their_server_and_message() -> None:
    rng = np.random.default_rng(2)
    cfg = _cfg()
    body, vals = _message(cfg, 1, 7, rng)
    upd = wire.decode_secure(body, expected_run=cfg.run_id, expected_n=N)
    sa = secure.open_share("a", KEYS["a"][0], upd.box_a, cfg.run_id, 1, 7, upd.count)
    sb = secure.open_share("b", KEYS["b"][0], upd.box_b, cfg.run_id, 1, 7, upd.count)
    assert sa is not None and sb is not None
    assert (sa + sb).tobytes() == secure.encode_values(vals).tobytes()
    # Negative controls: the wrong key, the other server's box, a box moved to another seq.
    assert secure.open_share("a", KEYS["b"][0], upd.box_a, cfg.run_id, 1, 7, upd.count) is None
    assert secure.open_share("b", KEYS["b"][0], upd.box_a, cfg.run_id, 1, 7, upd.count) is None
    assert secure.open_share("a", KEYS["a"][0], upd.box_a, cfg.run_id, 1, 8, upd.count) is None


def test_wire_kind_sizes_and_refusals() -> None:
    rng = np.random.default_rng(3)
    cfg = _cfg()
    body, vals = _message(cfg, 0, 1, rng, k=50)
    plain = wire.encode(wire.Update(cfg.run_id, 0, 1, 0, N, wire.decode_secure(body).indices, vals))
    for n, theta in ((105_506, 0.1), (105_506, 0.01)):  # the MLP; sizes as sent, measured
        k = int(n * theta)
        idx = np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)
        v = rng.uniform(-0.05, 0.05, size=k).astype(np.float32)
        ba, bb = secure.seal_update(v, "r", 0, 1, KEYS["a"][1], KEYS["b"][1], rng.bytes(32))
        sec = wire.encode_secure(wire.SecureUpdate("r", 0, 1, 0, n, idx, ba, bb))
        ratio = len(sec) / len(wire.encode(wire.Update("r", 0, 1, 0, n, idx, v)))
        assert ratio <= 2.05, (theta, ratio)
    with pytest.raises(wire.WireError):
        wire.decode(body)  # the plaintext decoder refuses the secure kind
    with pytest.raises(wire.WireError):
        wire.decode_secure(plain)
    with pytest.raises(wire.WireError):
        wire.decode_secure(body[:-1])
    key = b"k" * 32
    signed = wire.encode_secure(wire.decode_secure(body), key=key)
    assert wire.decode_secure(signed, key_for={0: key}.get).seq == 1
    with pytest.raises(wire.AuthenticationError):
        wire.decode_secure(signed, key_for={0: b"x" * 32}.get)


def test_config_refuses_what_share_servers_cannot_do() -> None:
    for bad in ({"order": "round-robin"}, {"max_l2": 1.0}, {"rate_limit": 2.0}):
        with pytest.raises(ConfigError):
            _cfg(**bad)
    with pytest.raises(ConfigError):
        RunConfig(run_id="x", secure="three-server")


def test_both_servers_decide_alike_and_sum_to_the_plaintext() -> None:
    """Duplicates, a spoiled box and an undecodable message: both servers apply the same set,
    and their states sum to the plaintext state (a spoiled box spoils only its own update)."""
    cfg = _cfg()
    rng = np.random.default_rng(4)
    rule = UpdateRule("staleness", 1.0, 3)
    bodies, values = [], {}
    for seq in range(1, 6):
        for pid in range(3):
            body, vals = _message(cfg, pid, seq, rng)
            bodies.append(body)
            values[(pid, seq)] = vals
    bodies.insert(4, bodies[2])  # a duplicate
    bodies.append(b"\x10garbage")
    spoiled = wire.decode_secure(bodies[7])
    bodies[7] = wire.encode_secure(
        wire.SecureUpdate(
            cfg.run_id,
            spoiled.participant,
            spoiled.seq,
            0,
            N,
            spoiled.indices,
            spoiled.box_a,
            bytes(len(spoiled.box_b)),
        )
    )
    states = {}
    for role in ("a", "b", "plain"):
        s = initial_state(cfg.run_id, role, N)
        items = []
        for off, body in enumerate(bodies):
            d = StreamDelivery(off, off, body, AmqpNames.routing_key(body[2]), None)
            items.append((off, admit(d, cfg, N, None)))
        assert isinstance(items[-1][1], Refused)
        if role == "plain":
            # A spoiled box B is a share of zero: what is applied is A's share alone.
            alone = secure.open_share("a", KEYS["a"][0], spoiled.box_a, cfg.run_id,
                                      spoiled.participant, spoiled.seq, spoiled.count)  # fmt: skip
            values[(spoiled.participant, spoiled.seq)] = alone

            def opener(u: wire.SecureUpdate) -> np.ndarray:
                got = values[(u.participant, u.seq)]
                return got if got.dtype == np.uint64 else secure.encode_values(got)
        else:
            from dssgd.aggregator.share_batch import server_opener

            opener = server_opener(role, KEYS[role][0], cfg.run_id)
        out = apply_stream(s, items, cfg, rule, opener)
        assert out.counters["applied"] == 15 and out.counters["duplicates"] == 1
        assert out.counters["unopened"] == (1 if role == "b" else 0)
        states[role] = s
    a, b, p = states["a"], states["b"], states["plain"]
    assert secure.reconstruct(a.state, b.state).tobytes() == p.state.tobytes()
    assert a.stat.tobytes() == b.stat.tobytes() == p.stat.tobytes()
    assert a.version == b.version == p.version == 15
