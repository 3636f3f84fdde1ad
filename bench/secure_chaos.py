"""kill -9 of either share server at random points, with duplicate publishes.

Each trial publishes updates (every fifth one twice: a lost confirm), lets each server SIGKILL
itself at a random batch, before its commit or between commit and ack, up to ``--kills`` times
per server, restarting it after each kill, and then checks: the reconstructed state equals the
fault-free reference bit for bit, and `applied` equals the number of unique updates on both.

    python -m bench.secure_chaos [--trials 5] [--messages 60] [--kills 3]

Figures: docs/SECURE.md.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

import numpy as np
from dssgd.shared import secure
from dssgd.shared.config import Connections

from testing.secure import RedisServer, SecureRig, secure_config


def trial(seed: int, messages: int, kills: int) -> dict:
    rnd = random.Random(seed)
    rng = np.random.default_rng(seed)
    a, b = RedisServer(), RedisServer()
    rig = SecureRig(Connections.from_env(), secure_config(snapshot_every=4, snapshot_ring=8),
                    (a.url, b.url))  # fmt: skip
    try:
        rig.start_thread("a")
        rig.start_thread("b")
        rig.connect_sender()
        rig.stop_servers()
        unique = 0
        for i in range(messages):
            sent = rig.send(i % 4, i // 4 + 1, k=150, rng=rng, base=max(0, i - 8))
            unique += 1
            if rnd.random() < 0.2:
                rig.publish(sent.body, sent.participant, sent.seq, sent.values)
        done = {"a": 0, "b": 0}
        points = []
        last = len(rig.sent) - 1
        while True:
            for role in "ab":
                if role in rig.procs and rig.procs[role].is_alive():
                    continue
                rig.procs.pop(role, None)
                crash = ""
                if done[role] < kills:
                    crash = f"{rnd.choice(['before-commit', 'after-commit'])}:{rnd.randint(1, 4)}"
                    done[role] += 1
                    points.append(f"{role} {crash}")
                rig.start_process(role, crash=crash)
            if rig.offsets() == (last, last):
                break
            time.sleep(0.05)
        sa, sb = rig.server_state("a"), rig.server_state("b")
        ref, _ = rig.reference()
        exact = secure.reconstruct(sa.state, sb.state).tobytes() == ref.state.tobytes()
        applied = [rig.counters(r).get("applied", 0) for r in "ab"]
        return {"seed": seed, "kills": points, "exact": exact, "applied": applied,
                "unique": unique, "published": len(rig.sent)}  # fmt: skip
    finally:
        rig.close()
        a.stop()
        b.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--messages", type=int, default=60)
    p.add_argument("--kills", type=int, default=3, help="kills per server per trial")
    args = p.parse_args(argv)
    ok = True
    for seed in range(args.trials):
        r = trial(seed, args.messages, args.kills)
        good = r["exact"] and r["applied"] == [r["unique"]] * 2
        ok = ok and good
        print(("ok  " if good else "BAD ") + json.dumps(r), flush=True)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
