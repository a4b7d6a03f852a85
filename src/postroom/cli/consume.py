"""``postroom consume module:attribute``: run a Consumer as a service until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
import traceback
from types import ModuleType
from typing import Annotated

import typer

from postroom.cli.common import (
    allow_insecure_tls,
    configure_service_logging,
    user_errors,
    with_settings,
)
from postroom.config import Settings
from postroom.consumer import Consumer
from postroom.consumer.decoding import IdSource
from postroom.consumer.runner import check_settings
from postroom.database import readable_errors
from postroom.errors import ConfigurationError, TargetImportError, TargetNotFoundError
from postroom.lifecycle import run_until_signalled
from postroom.log import get_logger
from postroom.schema.tables import tables_for

CONSUME_FIELDS = (
    "broker_url",
    "consumer_prefetch",
    "consumer_concurrency",
    "consumer_max_attempts",
    "consumer_backoff_initial",
    "consumer_backoff_max",
    "consumer_id_source",
    "consumer_max_message_bytes",
    "consumer_batch_size",
    "consumer_batch_linger",
    "inbox_retention",
    "metrics_port",
    "metrics_host",
    "health_timeout",
    "log_format",
    "allow_insecure_tls",
)


@with_settings(*CONSUME_FIELDS)
def consume(
    target: Annotated[
        str,
        typer.Argument(
            help="The Consumer to run, as module:attribute (e.g. myapp.billing:consumer)."
        ),
    ],
    *,
    settings: Settings,
) -> None:
    """Run a postroom Consumer: each message handled once, in a transaction with its inbox row.

    Messages are acknowledged only after the handler's transaction commits; failures are
    retried with backoff, then dead-lettered to NAME.dead-letter (NAME: the consumer's
    name). SIGTERM or Ctrl-C finishes the handlers in flight and exits. Serves /metrics,
    /healthz and /readyz on --metrics-port. The consumer uses this command's settings,
    not those it was built with.
    """
    with user_errors():
        check_settings(settings)
        IdSource.parse(settings.consumer_id_source)
        consumer = load_consumer(target)
        configure_service_logging(settings)
        allow_insecure_tls(settings)
        consumer.configure(settings)
        asyncio.run(_run(consumer, settings))


def load_consumer(target: str) -> Consumer:
    """Import ``module:attribute`` (the current directory is importable) and return the Consumer."""
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute or module_name.startswith("."):
        raise ConfigurationError(
            f"{target!r} is not module:attribute; name the module (in full, not relative) "
            "and the Consumer in it, e.g. myapp.billing:consumer"
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    module = _import(module_name)
    found: object = module
    for part in attribute.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise TargetNotFoundError(
                f"module {module_name!r} has no attribute {attribute!r}; name the Consumer "
                "object, e.g. consumer = postroom.Consumer('billing')"
            ) from None
    if not isinstance(found, Consumer):
        raise ConfigurationError(
            f"{target} is not a postroom.Consumer but a {type(found).__name__}; point at the "
            "Consumer object, e.g. consumer = postroom.Consumer('billing')"
        )
    return found


def _import(module_name: str) -> ModuleType:
    """The module; one sentence if it is not there, or if importing it raised."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(f"{exc.name}.")):
            raise TargetNotFoundError(
                f"cannot find module {module_name!r}; run from the directory that holds it "
                "or add that directory to PYTHONPATH"
            ) from None
        raise _import_failed(module_name, exc) from exc
    except Exception as exc:
        raise _import_failed(module_name, exc) from exc


def _import_failed(module_name: str, exc: Exception) -> TargetImportError:
    """The error of a module that was found but raised ``exc`` while it was imported."""
    if isinstance(exc, SyntaxError):
        where = f"{exc.filename}:{exc.lineno}"
        said = exc.msg
    else:
        frame = traceback.extract_tb(exc.__traceback__)[-1:] or None
        where = f"{frame[0].filename}:{frame[0].lineno}" if frame else "unknown place"
        said = str(exc)
    return TargetImportError(
        f"importing module {module_name!r} failed: {type(exc).__name__}: {said} ({where}); "
        "fix the module (run with --debug for the traceback)"
    )


async def _run(consumer: Consumer, settings: Settings) -> None:
    from postroom.brokers import subscriber_from_url
    from postroom.consumer import ConsumerService
    from postroom.schema import grants, migrate
    from postroom.schema.grants import Role

    with readable_errors(settings.database_url):
        # The rights first: without them the schema's revision cannot even be read.
        await asyncio.to_thread(
            grants.require_rights, settings.database_url, tables_for(settings), Role.CONSUMER
        )
        await asyncio.to_thread(
            migrate.require_current, settings.database_url, tables_for(settings), "consumer"
        )
    subscriber = subscriber_from_url(settings.broker_url, prefetch=settings.consumer_prefetch)
    if settings.broker_url.startswith("kafka:"):
        from postroom.brokers.kafka import KafkaSubscriber

        if isinstance(subscriber, KafkaSubscriber):
            # Its dead-letter producer must take a copy of the largest message it may get.
            subscriber.max_message_bytes = settings.consumer_max_message_bytes
    service = ConsumerService(consumer, subscriber, settings)
    get_logger("consumer").info(
        "consumer.configured",
        consumer=consumer.name,
        metrics_port=settings.metrics_port_for("consumer"),
        **settings.shown("broker_url", "database_url", "schema"),
    )
    await run_until_signalled(service)
