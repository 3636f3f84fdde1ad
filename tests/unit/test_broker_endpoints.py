"""A broker setting naming several RabbitMQ nodes: one URL per node, no password shown."""

from __future__ import annotations

from dssgd.shared.amqp_names import AmqpNames
from dssgd.shared.broker import _redact, endpoints


def test_one_url_stays_one_url() -> None:
    url = "amqp://u:p@h:5672/%2F?heartbeat=5"
    assert endpoints(url) == [url]


def test_comma_separated_hosts_share_credentials_vhost_and_options() -> None:
    got = endpoints("amqps://u:p%2C@a:1,b:2 , c/v?x=1")
    assert got == ["amqps://u:p%2C@a:1/v?x=1", "amqps://u:p%2C@b:2/v?x=1", "amqps://u:p%2C@c/v?x=1"]


def test_a_list_of_whole_urls_is_taken_as_it_is() -> None:
    assert endpoints("amqp://a@h1/%2F,amqp://b@h2:5673/%2F") == [
        "amqp://a@h1/%2F",
        "amqp://b@h2:5673/%2F",
    ]


def test_no_password_of_any_node_reaches_a_message() -> None:
    shown = _redact("amqp://user:secret@a:1,b:2/%2F")
    assert "secret" not in shown and "user" not in shown
    assert shown == "amqp://***@a:1/%2F,amqp://***@b:2/%2F"


def test_replicas_only_when_asked_for() -> None:
    # 0 keeps the arguments of every queue declared before the setting existed: RabbitMQ refuses
    # a re-declaration with another x-quorum-initial-group-size (PRECONDITION_FAILED).
    base = AmqpNames.queue_arguments(10, "dx", 100)
    assert "x-quorum-initial-group-size" not in base and base["x-queue-type"] == "quorum"
    three = AmqpNames.queue_arguments(10, "dx", 100, replicas=3)
    assert three == {**base, "x-quorum-initial-group-size": 3}
    assert AmqpNames.queue_arguments(10, None, 100, 3) == {
        "x-queue-type": "quorum",
        "x-quorum-initial-group-size": 3,
    }
