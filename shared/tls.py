"""TLS for RabbitMQ (``amqps://``) and Redis (``rediss://``): one way to name the certificates.

Both URLs take the query parameters of RabbitMQ's own URI spec (the ones its shovel and
federation plug-ins read), so one habit works for both servers::

    amqps://user:pw@broker:5671/%2F?cacertfile=/tls/ca.pem&certfile=/tls/p3.pem&keyfile=/tls/p3-key.pem
    rediss://user:pw@redis:6380/0?cacertfile=/tls/ca.pem&certfile=/tls/p3.pem&keyfile=/tls/p3-key.pem

``cacertfile`` is the CA that signed the server's certificate (default: the system's trust
store), ``certfile``/``keyfile`` the client certificate for a server that requires one,
``server_name_indication`` the name to check the server's certificate against when it is not
the URL's host. The environment gives defaults for every URL (DSSGD_TLS_CA, DSSGD_TLS_CERT,
DSSGD_TLS_KEY). The server's certificate is always verified, hostname included: a TLS
connection that accepts any certificate would only look safe. ``dssgd provision --tls-dir``
creates a CA and the certificates (shared/provision.py).

Nothing here opens a connection; ``shared.broker.connect`` and ``shared.store.connect`` call
``amqp_tls`` / ``redis_tls`` and ``explain`` turns a TLS failure into one line a person can act on.
"""

from __future__ import annotations

import os
import ssl
import urllib.parse
from dataclasses import dataclass
from typing import Any

from dssgd.shared.errors import ConfigError

PARAMS = ("cacertfile", "certfile", "keyfile", "server_name_indication")
ENV = {"cacertfile": "DSSGD_TLS_CA", "certfile": "DSSGD_TLS_CERT", "keyfile": "DSSGD_TLS_KEY"}
TLS_SCHEMES = ("amqps", "rediss")


@dataclass(frozen=True)
class TlsFiles:
    """What one TLS client needs: whom to trust, what to show, which name to check."""

    ca: str | None
    cert: str | None
    key: str | None
    server_name: str | None

    def context(self) -> ssl.SSLContext:
        """A client context: TLS >= 1.2, the server's certificate and host name verified."""
        for label, path in (("cacertfile", self.ca), ("certfile", self.cert),
                            ("keyfile", self.key)):
            if path is not None and not os.path.isfile(path):
                raise ConfigError(f"TLS {label} {path} does not exist (see `dssgd provision "
                                  "--tls-dir`)")
        if (self.cert is None) != (self.key is None):
            raise ConfigError("TLS needs both certfile and keyfile for a client certificate")
        try:
            ctx = ssl.create_default_context(cafile=self.ca)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            if self.cert is not None:
                ctx.load_cert_chain(self.cert, self.key)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"cannot load the TLS files ({self.describe()}): {exc}") from exc
        return ctx

    def describe(self) -> str:
        parts = [f"cacertfile={self.ca or 'system trust store'}"]
        if self.cert:
            parts.append(f"certfile={self.cert}")
        return ", ".join(parts)


def split(url: str) -> tuple[str, TlsFiles | None]:
    """(the URL without our TLS parameters, the TLS files or None for a plaintext URL)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as exc:
        raise ConfigError(f"bad URL: {exc}") from None
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    ours = {k: v for k, v in query if k in PARAMS}
    rest = [(k, v) for k, v in query if k not in PARAMS]
    clean = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(rest)))
    if parts.scheme not in TLS_SCHEMES:
        if ours:
            tls_scheme = "amqps" if parts.scheme.startswith("amqp") else "rediss"
            raise ConfigError(f"{', '.join(sorted(ours))} given on a plaintext {parts.scheme}:// "
                              f"URL; use {tls_scheme}:// for TLS")
        return url, None
    for key, env in ENV.items():
        if key not in ours and os.environ.get(env):
            ours[key] = os.environ[env]
    return clean, TlsFiles(ours.get("cacertfile"), ours.get("certfile"), ours.get("keyfile"),
                           ours.get("server_name_indication"))


def amqp_tls(url: str) -> tuple[str, Any]:
    """(URL for pika, pika.SSLOptions or None)."""
    clean, files = split(url)
    if files is None:
        return clean, None
    import pika

    host = files.server_name or urllib.parse.urlsplit(clean).hostname
    return clean, pika.SSLOptions(files.context(), host)


def redis_tls(url: str) -> tuple[str, dict[str, Any]]:
    """(URL for redis-py, the keyword arguments of its SSL connection)."""
    clean, files = split(url)
    if files is None:
        return clean, {}
    files.context()  # the same checks (files exist, load) and errors as for RabbitMQ
    return clean, {
        "ssl_ca_certs": files.ca,
        "ssl_certfile": files.cert,
        "ssl_keyfile": files.key,
        "ssl_cert_reqs": "required",
        "ssl_check_hostname": files.server_name is None,
        "ssl_min_version": ssl.TLSVersion.TLSv1_2,
    }


def with_files(url: str, ca: str, cert: str | None = None, key: str | None = None) -> str:
    """The URL with these TLS files in its query (what provision writes to credential files)."""
    parts = urllib.parse.urlsplit(url)
    query = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query) if k not in PARAMS]
    query.append(("cacertfile", ca))
    if cert is not None and key is not None:
        query += [("certfile", cert), ("keyfile", key)]
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


def _chain(exc: BaseException | None) -> list[BaseException]:
    """Every exception inside ``exc``: causes, contexts and the arguments pika wraps them in."""
    seen: list[BaseException] = []
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or any(e is s for s in seen) or len(seen) > 50:
            continue
        seen.append(e)
        todo += [e.__cause__, e.__context__, *(a for a in e.args if isinstance(a, BaseException))]
    return seen


def explain(exc: BaseException, url: str) -> str | None:
    """One line on a TLS failure inside ``exc`` (None if it is not about TLS)."""
    scheme = urllib.parse.urlsplit(url).scheme
    _, files = split(url) if scheme in TLS_SCHEMES else (url, None)
    trusted = files.describe() if files else ""
    for e in _chain(exc):
        if isinstance(e, ssl.SSLCertVerificationError):
            return (f"the server's TLS certificate is not trusted ({e.verify_message}; "
                    f"{trusted}): give the CA that signed it as cacertfile")
        if isinstance(e, ssl.SSLEOFError | ssl.SSLZeroReturnError) and files is not None:
            return _closed_early(files)
        if isinstance(e, ssl.SSLError):
            text = f"{e.reason or ''} {e}".upper()
            if "WRONG_VERSION_NUMBER" in text or "RECORD_LAYER" in text:
                return "the server does not speak TLS on this port (use amqp:// or redis://)"
            if any(w in text for w in ("CERTIFICATE_REQUIRED", "UNKNOWN_CA", "BAD_CERTIFICATE",
                                       "CERTIFICATE_UNKNOWN", "HANDSHAKE_FAILURE")):
                shown = f"certfile={files.cert}" if files and files.cert else "none given"
                return (f"the server refused our TLS client certificate ({shown}): it needs one "
                        "signed by its CA (dssgd provision --tls-dir makes them)")
            return f"TLS handshake failed: {e}"
    if files is not None and any(type(e).__name__ in _CLOSED_EARLY for e in _chain(exc)):
        return _closed_early(files)
    return None


def _closed_early(files: TlsFiles) -> str:
    # TLS 1.3 sends the client certificate after the client's side of the handshake is done,
    # so a refusal arrives as the server closing the connection before the protocol starts.
    shown = f"certfile={files.cert}" if files.cert else "none given"
    return (f"the server closed the TLS connection before the protocol started: it most "
            f"likely refused our client certificate ({shown}); it needs one signed by its "
            "CA (dssgd provision --tls-dir makes them)")


_CLOSED_EARLY = ("IncompatibleProtocolError", "StreamLostError", "ConnectionResetError",
                 "SSLEOFError", "SSLZeroReturnError")


def plaintext_hint(url: str) -> str:
    """Said when a plaintext connection was dropped: the port may only speak TLS."""
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme in TLS_SCHEMES:
        return ""
    return f" (if the server only accepts TLS on this port, use {scheme}s://)"
