"""Typed errors. Every message says what went wrong and what to do next.

Each error carries the exit code the ``postroom`` command ends with when it is not
handled: 2 for bad usage (a value postroom cannot use), 3 for everything that could not
be reached, found or done.
"""

from __future__ import annotations

from typing import ClassVar

#: Exit code of bad usage: an option, argument or setting postroom cannot use.
EXIT_USAGE = 2
#: Exit code of an operation that failed: something unreachable, not found or refused by it.
EXIT_FAILED = 3


class PostroomError(Exception):
    """Base class of every error postroom raises on purpose."""

    #: The exit code of the ``postroom`` command that ends with this error.
    exit_code: ClassVar[int] = EXIT_FAILED


class InvalidMessageError(PostroomError, ValueError):
    """A message could not be built from what was given (topic, key, headers or payload)."""

    exit_code = EXIT_USAGE


class PayloadTooLargeError(InvalidMessageError):
    """The encoded payload plus its headers is larger than the configured limit."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"payload and headers are {size} bytes, over the limit of {limit} bytes; send a "
            "reference (for example an object-store key) instead of the data, or raise "
            "max_payload_bytes (POSTROOM_MAX_PAYLOAD_BYTES) if your broker accepts larger messages"
        )
        self.size = size
        self.limit = limit


class PayloadTooDeepError(InvalidMessageError):
    """The payload nests lists and objects deeper than postroom accepts."""


class UnencodableTextError(InvalidMessageError):
    """A text part of the message (payload, key, topic, header, content type) is not UTF-8."""


class InvalidDelayError(InvalidMessageError):
    """The delay is not a finite duration between zero and the maximum."""


class InvalidContentTypeError(InvalidMessageError):
    """The content type is not a short printable media type."""


class InvalidHeaderError(InvalidMessageError):
    """A header name or value, or the number of headers, is not usable."""


class InvalidKeyError(InvalidMessageError):
    """The ordering key is not a short string PostgreSQL and the brokers can carry."""


class InvalidTopicError(InvalidMessageError):
    """The topic is not a name that both Kafka and RabbitMQ accept."""


class ConfigurationError(PostroomError, ValueError):
    """A setting has a value postroom cannot use."""

    exit_code = EXIT_USAGE


class RefusedSettingError(ConfigurationError):
    """A well-formed setting that is refused where it is used: a broker that refuses the
    consumer's login or virtual host, a metrics port another process holds.

    Not bad usage but an operation that could not be done, so its exit code is 3.
    """

    exit_code = EXIT_FAILED


class InvalidIdentifierError(ConfigurationError):
    """A schema or table name is not a plain SQL identifier."""


class NotInTransactionError(PostroomError):
    """enqueue() was given a connection that would commit each statement on its own."""


class UnsupportedTargetError(PostroomError, TypeError):
    """enqueue() was given something that is not a session or connection it can write to."""


class TargetNotFoundError(ConfigurationError):
    """The module or object a command was told to load (``module:attribute``) does not exist."""

    exit_code = EXIT_FAILED


class TargetImportError(PostroomError):
    """The module a command was told to load exists, but importing it raised an exception."""


class DatabaseError(PostroomError):
    """The database could not be reached or refused what was asked of it."""


class SchemaMissingError(DatabaseError):
    """postroom's tables are not in the database (or are behind the installed version)."""


class SnapshotWentBackError(DatabaseError):
    """A new tick's snapshot lies below the previous tick's: transaction ids went back.

    It happens when the outbox was restored from a dump into another cluster (transaction
    ids do not survive that). Reading on would skip or repeat rows, so no tick is written;
    ``postroom outbox rebase`` (relays stopped) carries the unpublished rows over.
    """


class MissingRightsError(DatabaseError):
    """The database role lacks a privilege this process needs on postroom's tables.

    Raised at start-up, so a relay or consumer never runs with rights it will miss later;
    ``postroom db grants`` prints what each process needs.
    """


class MissingExtraError(PostroomError, ImportError):
    """An optional dependency (a broker client) is not installed."""

    def __init__(self, package: str, extra: str) -> None:
        super().__init__(
            f"{package} is not installed; install it with: pip install 'postroom[{extra}]'"
        )
        self.package = package
        self.extra = extra


class BrokerUnavailableError(PostroomError):
    """The broker cannot be reached or dropped the connection; the message is not at fault."""


class BrokerRefusedError(BrokerUnavailableError):
    """The broker answers but refuses this client: wrong user name or password, an unknown
    virtual host, missing permissions, a failed SASL handshake.

    Not an outage: retrying with the same settings cannot help. The relay gives up its
    partitions and exits; fix the broker URL or the broker's users and permissions.
    """


class DeliveryLostError(BrokerUnavailableError):
    """A delivery can no longer be settled: the channel it came on is closed (RabbitMQ).

    The broker hands the message out again by itself, so nothing is published for it.
    """


class HandlerCancelledError(PostroomError):
    """A handler raised CancelledError while its consumer was not being cancelled.

    It counts as a failed attempt like any other exception of the handler.
    """


class AbortedTransactionError(PostroomError):
    """A handler returned normally although PostgreSQL had aborted its transaction.

    It caught a database error and carried on: nothing it wrote can commit, so the attempt
    fails (and is retried) instead of being acknowledged without its effect.
    """


class UndecodableMessageError(PostroomError):
    """A received message has no usable id or a payload that cannot be decoded.

    The consumer dead-letters such a message with this error as the reason instead of
    retrying it: fix the producer (or the consumer's ``consumer_id_source``) and replay it.
    """


class HandlerRegistrationError(ConfigurationError):
    """A consumer handler was registered in a way postroom cannot run."""
