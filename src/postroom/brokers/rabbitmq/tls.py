"""TLS for RabbitMQ: CA, client certificate and key files from the environment, and no
connection that skips the server's certificate check unless explicitly allowed.

aio-pika reads ``cafile``, ``certfile``, ``keyfile`` and ``no_verify_ssl`` from an
``amqps://`` URL's query; :func:`connection_url` adds the files named by
``POSTROOM_AMQP_CA_FILE``, ``POSTROOM_AMQP_CERT_FILE`` and ``POSTROOM_AMQP_KEY_FILE`` (a
value in the URL wins) and refuses ``no_verify_ssl``.
"""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Mapping
from typing import Final
from urllib.parse import parse_qsl, urlencode, urlsplit

from postroom.errors import ConfigurationError
from postroom.urls import refuse_insecure

#: Environment variables naming TLS files, by the URL query parameter each sets.
TLS_FILE_ENV: Final = {
    "cafile": "POSTROOM_AMQP_CA_FILE",
    "certfile": "POSTROOM_AMQP_CERT_FILE",
    "keyfile": "POSTROOM_AMQP_KEY_FILE",
}


def connection_url(url: str, environ: Mapping[str, str] | None = None) -> str:
    """``url`` as aio-pika should connect to it: TLS files from the environment added to
    an ``amqps://`` URL, each file checked to be readable, verification kept on."""
    env = os.environ if environ is None else environ
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    if query.get("no_verify_ssl", "0") != "0":
        refuse_insecure(
            "no_verify_ssl", "turns off the check of RabbitMQ's TLS certificate", environ
        )
    tls = parts.scheme.lower() == "amqps"
    for parameter, variable in TLS_FILE_ENV.items():
        if tls and parameter not in query and env.get(variable):
            query[parameter] = env[variable]
        if parameter in query and not os.access(query[parameter], os.R_OK):
            raise ConfigurationError(
                f"the RabbitMQ TLS file {parameter}={query[parameter]!r} ({variable} or the "
                "URL's query) cannot be read; point it at a readable PEM file"
            )
    if not tls:
        return url
    return parts._replace(query=urlencode(query)).geturl()


_VERIFY_FAILED: Final = re.compile(r"certificate verify failed: ([^(\]\n]+)", re.IGNORECASE)


def untrusted_certificate(exc: BaseException) -> str | None:
    """Why the broker's certificate was not trusted, if that is what ``exc`` (a connection
    failure, which aiormq wraps in its own error) says; None otherwise."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return exc.verify_message or "certificate verify failed"
    found = _VERIFY_FAILED.search(str(exc))
    return f"certificate verify failed: {found.group(1).strip()}" if found else None
