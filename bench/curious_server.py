"""A curious share server: everything one server can read, held against the truth.

A real secure training run (MNIST MLP, real workers recording what they sent) on two private
Redis servers; then, for each server alone, every message it can decrypt (its share, and the
weighted share its apply adds), every key of its Redis read as int64, uint64 and float64, all
compared with the true Δw and the true w: |Pearson r| must be ≤ 5/√k and the sign agreement of
the signed readings within 0.49–0.51. The positive control gives the same script both servers'
data: it must reconstruct every Δw and w exactly (r = 1).

    python -m bench.curious_server [--participants 4] [--epochs 5] [--theta-u 0.1]

Exit code 0 when every criterion holds. Figures: docs/SECURE.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from dssgd.shared import secure, wire
from dssgd.shared.config import Connections
from dssgd.shared.keys import ShareKeys
from dssgd.shared.rules import UpdateRule
from dssgd.shared.store import connect as redis_connect
from dssgd.shared.stream import StreamConsumer

from testing.runs import ROOT
from testing.secure import RedisServer, SecureRig, secure_config


def readings(x: np.ndarray) -> dict[str, np.ndarray]:
    """Every numeric reading of 64-bit words (uint64 in), as float64 arrays."""
    f = x.view(np.float64)
    finite = np.where(np.isfinite(f), f, 0.0)
    return {
        "int64": x.view(np.int64).astype(np.float64),
        "uint64": x.astype(np.float64),
        "float64 (signed log)": np.sign(finite) * np.log1p(np.abs(finite)),
        "int64 / 2^24 (fixed point)": x.view(np.int64).astype(np.float64) / 2.0**24,
    }


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    if a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def run_training(rig: SecureRig, record: Path, participants: int) -> None:
    """Workers as a real process (training, recording every sent update), until they finish."""
    c = rig.conns
    cmd = [sys.executable, "-m", "dssgd", "worker", "--run-id", rig.cfg.run_id, "--slot", "0/1"]
    cmd += ["--record-dir", str(record), "--amqp-url", c.amqp_url, "--redis-url", c.redis_url]
    log = (record / "worker.log").open("w")
    subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True, timeout=900)


def truth(record: Path, participants: int) -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]:
    out = {}
    for pid in range(participants):
        for line in (record / f"confirmed-{pid}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if rec["state"] == "sent":
                out[(pid, rec["seq"])] = (
                    np.array(rec["indices"], np.int64),
                    np.array(rec["values"], np.float32),
                )
    return out


def stream_messages(rig: SecureRig, count: int) -> list[wire.SecureUpdate]:
    """What a server receives: every message of the run's stream, in order."""
    consumer = StreamConsumer(rig.conns.amqp_url, rig.names, "curious", 0, 1000)
    got = []
    deadline = time.monotonic() + 60
    while len(got) < count and time.monotonic() < deadline:
        batch = consumer.deliveries(0.5, 1000)
        got += [wire.decode_secure(d.body) for d in batch]
        if batch:
            consumer.ack_through(batch[-1].tag)
    consumer.close()
    return got


def server_view(rig: SecureRig, role: str, msgs: list[wire.SecureUpdate]) -> dict:
    """Everything ``role`` can read: its opened shares, the weighted shares it applies, and
    every 8n-byte value in its Redis (state, snapshots)."""
    i = secure.ROLES.index(role)
    r = redis_connect(rig.urls[i])
    keys = ShareKeys(rig.cfg.run_id, role)
    private = bytes.fromhex(r.get(keys.private_key).decode())
    rule = UpdateRule(rig.cfg.effective_rule, rig.cfg.staleness_exponent, rig.cfg.participants)
    shares, weighted, seen, version = {}, {}, set(), 0
    for u in msgs:
        if (u.participant, u.seq) in seen:
            continue
        seen.add((u.participant, u.seq))
        share = secure.open_share(
            role, private, u.box(role), u.run_id, u.participant, u.seq, u.count
        )
        assert share is not None, "a server must open its own box"
        w = secure.encode_weight(rule.weight(version - u.base_version))
        shares[(u.participant, u.seq)] = share
        weighted[(u.participant, u.seq)] = share * np.uint64(w)
        version += 1
    blobs = {}
    for name in r.scan_iter(match=keys.all_patterns()[0]):
        kind = r.type(name).decode()
        values = (
            [r.get(name)]
            if kind == "string"
            else list(r.hgetall(name).values())
            if kind == "hash"
            else []
        )
        for j, v in enumerate(values):
            if isinstance(v, bytes) and len(v) == 8 * rig.n:
                blobs[f"{name.decode().split(':', 3)[-1]}#{j}"] = np.frombuffer(v, "<u8").astype(
                    np.uint64
                )
    return {"shares": shares, "weighted": weighted, "blobs": blobs}


def judge(label: str, data: np.ndarray, target: np.ndarray, rows: list, signed: bool) -> bool:
    ok = True
    for name, x in readings(data).items():
        k = x.size
        r = pearson(x, target.astype(np.float64))
        bound = 5 / np.sqrt(k)
        row = {"what": label, "reading": name, "k": k, "r": r, "bound": bound}
        ok_r = abs(r) <= bound
        if signed and name != "uint64":
            nz = target != 0
            agree = float(np.mean(np.sign(x[nz]) == np.sign(target[nz])))
            row["sign_agreement"] = agree
            ok_r = ok_r and 0.49 <= agree <= 0.51
        row["ok"] = bool(ok_r)
        ok = ok and bool(ok_r)
        rows.append(row)
    return ok


def analyse(rig: SecureRig, truth_: dict, w_true: np.ndarray, views: dict) -> tuple[bool, list]:
    rows: list = []
    ok = True
    order = sorted(truth_)
    dq = np.concatenate([secure.encode_values(truth_[key][1]).view(np.int64) for key in order])
    dw_at = np.concatenate([w_true[truth_[key][0]] for key in order])
    for role, v in views.items():
        sh = np.concatenate([v["shares"][key] for key in order])
        wt = np.concatenate([v["weighted"][key] for key in order])
        ok &= judge(f"{role}: decrypted shares vs Δw", sh, dq.astype(np.float64), rows, True)
        ok &= judge(f"{role}: decrypted shares vs w", sh, dw_at, rows, True)
        ok &= judge(f"{role}: applied W·share vs Δw", wt, dq.astype(np.float64), rows, True)
        for name, blob in v["blobs"].items():
            ok &= judge(f"{role}: redis {name} vs w", blob, w_true, rows, True)
            ok &= judge(f"{role}: redis {name} vs w - w0", blob, w_true - rig.w0, rows, True)
    return ok, rows


def positive_control(rig: SecureRig, truth_: dict, w_true: np.ndarray, views: dict) -> dict:
    """Both servers' data together: every Δw and w exactly."""
    order = sorted(truth_)
    joined = np.concatenate([views["a"]["shares"][k] + views["b"]["shares"][k] for k in order])
    dq = np.concatenate([secure.encode_values(truth_[k][1]) for k in order])
    state = secure.reconstruct(views["a"]["blobs"]["state#0"], views["b"]["blobs"]["state#0"])
    w = secure.decode_state(rig.w0, state)
    return {
        "updates_exact": bool(joined.tobytes() == dq.tobytes()),
        "r_updates": pearson(
            joined.view(np.int64).astype(np.float64), dq.view(np.int64).astype(np.float64)
        ),
        "w_exact": bool(w.tobytes() == w_true.tobytes()),
        "r_w": pearson(w.astype(np.float64), w_true.astype(np.float64)),
    }


def main(argv: list[str] | None = None) -> int:  # long: one bench, read top to bottom
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--participants", type=int, default=4)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--theta-u", type=float, default=0.1)
    p.add_argument("--json", type=Path, help="write the rows here")
    args = p.parse_args(argv)
    a, b = RedisServer(), RedisServer()
    cfg = secure_config(participants=args.participants, epochs=args.epochs, theta_u=args.theta_u)
    rig = SecureRig(Connections.from_env(), cfg, (a.url, b.url))
    try:
        rig.start_thread("a")
        rig.start_thread("b")
        with tempfile.TemporaryDirectory() as tmp:
            record = Path(tmp)
            run_training(rig, record, args.participants)
            truth_ = truth(record, args.participants)
        msgs = stream_messages(rig, len(truth_))
        last = len(msgs) - 1
        while rig.offsets() != (last, last):
            time.sleep(0.1)
        _, w_true, _ = rig.connect_sender().read_params()
        views = {role: server_view(rig, role, msgs) for role in secure.ROLES}
        ok, rows = analyse(rig, truth_, w_true, views)
        control = positive_control(rig, truth_, w_true, views)
    finally:
        rig.close()
        a.stop()
        b.stop()
    print(f"{len(truth_)} updates, {sum(t[0].size for t in truth_.values())} entries, n = {rig.n}")
    for row in rows:
        sign = f"  sign {row['sign_agreement']:.4f}" if "sign_agreement" in row else ""
        flag = "ok " if row["ok"] else "BAD"
        r = f"r {row['r']:+.4f} (≤ {row['bound']:.4f})"
        print(f"{flag} {row['what']:<44} {row['reading']:<27} {r}{sign}")
    print("positive control (both servers):", control)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "control": control}, indent=1))
    good = ok and control["updates_exact"] and control["w_exact"] and control["r_w"] > 0.999999
    print("PASS" if good else "FAIL")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
