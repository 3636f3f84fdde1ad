"""Docs and help that state a number or a behaviour say what the code does."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from dssgd.shared.broker import DELIVERY_LIMIT
from dssgd.shared.provision import Management

from dssgd.admin import EXIT_DENIED
from dssgd.cli import build_parser
from testing.runs import ROOT, RunHandle

DOCS = ["docs/ARCHITECTURE.md", "docs/OPERATIONS.md", "docs/RELIABILITY.md"]


def test_every_stated_delivery_limit_is_the_code_s() -> None:
    stated = []
    for doc in DOCS:
        # An experiment "with `x-delivery-limit` 3" is a measurement, not a statement of ours.
        text = "\n".join(
            line
            for line in (ROOT / doc).read_text().splitlines()
            if "with `x-delivery-limit`" not in line
        )
        stated += [int(n) for n in re.findall(r"`x-delivery-limit` (\d+)", text)]
        stated += [int(n) for n in re.findall(r"after (\d+) redeliveries", text)]
    assert stated and set(stated) == {DELIVERY_LIMIT}, stated


@pytest.mark.integration
def test_the_declared_queue_has_the_documented_delivery_limit(
    make_run: Callable[..., RunHandle],
) -> None:
    h = make_run()
    queue = Management.from_amqp_url(h.conns.amqp_url).call(
        "GET", f"/api/queues/%2F/{h.names.queue}"
    )
    assert queue["arguments"]["x-delivery-limit"] == DELIVERY_LIMIT


def test_run_help_names_the_launcher_it_uses() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    run = sub.choices["run"]  # type: ignore[attr-defined]
    text = run.format_help() + parser.format_help()
    assert "participants under supervisor" not in text
    assert "forked" in run.format_help()


def test_app_id_and_exit_codes_are_documented_as_they_are() -> None:
    readme = " ".join((ROOT / "README.md").read_text().split())  # line breaks do not matter
    assert "compacted (`3`, `0-4,7`), as `app_id`" in readme
    ops = (ROOT / "docs/OPERATIONS.md").read_text()
    assert f"{EXIT_DENIED} a password or right refused" in ops
