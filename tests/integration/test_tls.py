"""TLS end to end: a private RabbitMQ and Redis that speak only TLS and require a client
certificate (made by shared.provision, as `dssgd provision --tls-dir` makes them).

A run over amqps:// and rediss:// completes (with the validation defence on, which must leave
its honest updates alone); a plaintext client, a client whose certificate
another CA signed, a client with no certificate and a client that does not trust the server's
CA are all refused, each with a line that says what to change. The servers start once for the
module (RabbitMQ's boot is the slow part).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from dssgd.shared.broker import connect as amqp_connect
from dssgd.shared.errors import BrokerError, ConfigError, StoreError
from dssgd.shared.keys import Keys
from dssgd.shared.provision import TlsBundle, _Endpoints
from dssgd.shared.store import connect as redis_connect
from dssgd.shared.tls import split

from dssgd.admin import check_amqp, check_redis
from testing.runs import ROOT
from testing.tls_servers import TlsServers

pytestmark = pytest.mark.timeout(480)


@pytest.fixture(scope="module")
def servers() -> Iterator[TlsServers]:
    base = Path(tempfile.mkdtemp(prefix="dssgd-tls-"))
    s = TlsServers(base)
    try:
        s.start()
    except Exception as exc:  # no rabbitmq-server / redis-server with TLS on this machine
        s.stop()
        shutil.rmtree(base, ignore_errors=True)
        if os.environ.get("CI"):
            pytest.fail(f"cannot start the private TLS servers: {exc}")
        pytest.skip(f"cannot start the private TLS servers: {exc}")
    yield s
    s.stop()
    shutil.rmtree(base, ignore_errors=True)


def test_run_over_tls_completes(servers: TlsServers, tmp_path: Path) -> None:
    run_id = f"tls-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "DSSGD_AMQP_URL": servers.amqp_url(),
           "DSSGD_REDIS_URL": servers.redis_url(), "PYTHONUNBUFFERED": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "dssgd", "run", "--run-id", run_id, "--participants", "3",
         "--epochs", "4", "--runs-dir", str(tmp_path), "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    s = json.loads(res.stdout)
    assert s["updates_applied"] + s["updates_rejected"] == 12, s
    # The servers have no plaintext listener: every update went through TLS into this Redis.
    version = int(redis_connect(servers.redis_url()).get(Keys(run_id).version) or 0)
    assert version == s["updates_applied"], s
    # The model learns over TLS: 12 asynchronous updates land between 0.68 and 0.86 by their
    # interleaving (chance is 0.1). The validation defence is not mixed in here: it refuses
    # some honest updates (about 18 %, docs/RELIABILITY.md row 28).
    assert s["updates_rejected"] == 0 and s["accuracy"] >= 0.5, s


def test_plaintext_clients_are_refused(servers: TlsServers) -> None:
    with pytest.raises(BrokerError, match=r"use amqps://"):
        check_amqp(f"amqp://guest:guest@127.0.0.1:{servers.rabbit.port}/%2F", "tls-test")
    with pytest.raises(StoreError, match=r"use rediss://"):
        check_redis(f"redis://127.0.0.1:{servers.redis.port}/0")


@pytest.mark.parametrize("who", ["other CA", "no certificate"])
def test_untrusted_clients_are_refused(servers: TlsServers, who: str) -> None:
    kw: dict[str, object] = ({"bundle": servers.other, "ca": servers.good} if who == "other CA"
                             else {"client": False})
    with pytest.raises(BrokerError, match=r"refused our client certificate"):
        check_amqp(servers.amqp_url(**kw), "tls-test")
    with pytest.raises(StoreError, match=r"refused our (TLS )?client certificate"):
        check_redis(servers.redis_url(**kw))
    with pytest.raises(BrokerError):  # the library path too, not only the pre-flight check
        amqp_connect(servers.amqp_url(**kw), "tls-test", heartbeat=0)
    # Negative control: the deployment's own client certificate gets in.
    check_amqp(servers.amqp_url(), "tls-test")
    check_redis(servers.redis_url())


def test_a_server_we_do_not_trust_is_refused(servers: TlsServers) -> None:
    with pytest.raises(BrokerError, match=r"not trusted .*give the CA"):
        check_amqp(servers.amqp_url(ca=servers.other), "tls-test")
    with pytest.raises(StoreError, match=r"not trusted .*give the CA"):
        check_redis(servers.redis_url(ca=servers.other))


def test_credential_urls_name_the_certificates(servers: TlsServers) -> None:
    # What provision writes for a participant: amqps/rediss with its own client certificate.
    at = _Endpoints.parse(servers.amqp_url(), servers.redis_url(), servers.good)
    bundle: TlsBundle = servers.good
    url = at.amqp_url("admin", "guest")
    _, files = split(url)
    assert url.startswith("amqps://") and files is not None
    assert files.cert == str(bundle.cert("client-admin").resolve())
    assert at.redis_url("admin", "x").startswith("rediss://")
    with pytest.raises(ConfigError, match=r"use amqps://"):
        split(f"amqp://h:5672/?cacertfile={bundle.ca}")
    with pytest.raises(ConfigError, match=r"does not exist"):
        check_amqp(f"amqps://h:5671/?cacertfile={bundle.dir / 'nope.pem'}", "tls-test")
