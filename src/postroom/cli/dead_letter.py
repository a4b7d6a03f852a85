"""``postroom dead-letter``: a consumer's dead letters on RabbitMQ or Kafka; see and requeue them.

A consumer dead-letters a message when its handler failed ``consumer_max_attempts`` times or
the message cannot be decoded: RabbitMQ puts the copy on the queue ``<consumer>.dead-letter``,
Kafka on the topic ``<consumer>.dead-letter``, with the headers ``postroom-error``,
``postroom-attempts``, ``postroom-topic``, ``postroom-consumer`` and
``postroom-dead-lettered-at``. How each broker reads and requeues them without losing
anything is the broker's business (:class:`postroom.brokers.DeadLetters`); this module has
the commands and their rendering.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import urlsplit

import typer

from postroom.brokers import (
    DeadLetter,
    DeadLetters,
    Found,
    Listing,
    Requeued,
    dead_letters_from_url,
)
from postroom.brokers.base import HEADER_CONSUMER, dead_letter_name
from postroom.brokers.dead_letters import CLI_GROUP_SUFFIX
from postroom.cli.changes import SAMPLE_ROWS, Done, Mode, Selection, Wording, run_change, with_mode
from postroom.cli.common import (
    EXIT_FAILED,
    console,
    fail,
    user_errors,
    with_settings,
)
from postroom.cli.ids import inbox_message_id
from postroom.cli.options import MAX_LIMIT
from postroom.cli.output import (
    EXIT_USAGE,
    NEWLINE,
    FittedTable,
    Json,
    age,
    failed,
    list_json,
    payload_view,
    print_json,
    printable,
    say,
    seconds_between,
    show_fields,
    show_headers_and_payload,
    table,
    timestamp,
)
from postroom.cli.progress import progress
from postroom.config import Settings
from postroom.log import configure_logging
from postroom.urls import redact_url

app = typer.Typer(
    help=(
        "See a consumer's dead letters (its NAME.dead-letter queue on RabbitMQ, or topic "
        "on Kafka) and requeue them to the consumer.\n\n"
        "The broker is --broker-url (POSTROOM_BROKER_URL). **requeue** takes **--dry-run**, "
        "says how many dead letters it will send back and asks first (**--yes** to skip "
        "the question; required without a terminal). Nothing to list or requeue is not an "
        "error (exit 0)."
    ),
    no_args_is_help=True,
    rich_markup_mode="markdown",
)

ConsumerName = Annotated[
    str,
    typer.Option(
        "--consumer",
        "-c",
        envvar="POSTROOM_DEAD_LETTER_CONSUMER",
        metavar="NAME",
        help="The consumer whose dead letters these are (its postroom.Consumer name).",
        show_default=False,
    ),
]


# ----------------------------------------------------------------------------- commands


def _broker(settings: Settings, consumer: str) -> DeadLetters:
    """The dead letters of ``consumer`` on the settings' broker; bad URLs exit 2."""
    from postroom.consumer.registry import Consumer

    with user_errors():
        Consumer(consumer)  # the name rules (it names queues and topics)
    try:
        scheme = urlsplit(settings.broker_url).scheme.lower()
    except ValueError:
        scheme = ""
    if scheme == "memory":
        fail(
            "a memory:// broker lives inside one process, so this command cannot reach it; "
            f"in tests, read MemoryBroker.messages({dead_letter_name(consumer)!r}) instead",
            EXIT_USAGE,
        )
    if scheme not in {"amqp", "amqps", "kafka"}:
        fail(
            f"the broker URL {redact_url(settings.broker_url)!r} is not a RabbitMQ (amqp://, "
            "amqps://) or Kafka (kafka://) URL; set --broker-url or POSTROOM_BROKER_URL",
            EXIT_USAGE,
        )
    with user_errors():
        return dead_letters_from_url(settings.broker_url, consumer)


def _run(
    work: Callable[[], Any], doing: str | None = None, count: Callable[[Any], int] = len
) -> Any:
    """Run a broker coroutine; broker failures become sentences (exit 3).

    With ``doing``, a progress bar of that name is on stderr meanwhile (on a terminal),
    ending at ``count(result)`` messages.
    """
    configure_logging(json=False, level="critical")
    if doing is None:
        with user_errors():
            return asyncio.run(work())
    with user_errors(), progress(doing, None) as advance:
        result = asyncio.run(work())
        advance(count(result))
    return result


def _read(listing: Listing) -> int:
    return len(listing.letters)


def _letters_table(title: str | None, letters: Iterable[DeadLetter]) -> FittedTable:
    return table(
        title,
        ["id", "topic", "key", "attempts", "dead-lettered", "error"],
        [
            (
                letter.id,
                letter.topic,
                letter.key,
                letter.attempts,
                timestamp(letter.dead_lettered_at),
                letter.error,
            )
            for letter in letters
        ],
        free={"topic", "key", "error"},
    )


def _nothing_there(broker: DeadLetters, consumer: str, listing: Listing) -> str:
    why = " (it does not exist: nothing was dead-lettered yet)" if listing.missing else ""
    return f"No dead letters for consumer {consumer!r} in {broker.where}{why}."


@app.command("ls")
@with_settings("broker_url")
def list_letters(
    consumer: ConsumerName,
    limit: Annotated[
        int,
        typer.Option(
            "--limit",
            "-n",
            envvar="POSTROOM_DEAD_LETTER_LIMIT",
            min=1,
            max=MAX_LIMIT,
            help="Show at most this many.",
        ),
    ] = 50,
    as_json: Json = False,
    *,
    settings: Settings,
) -> None:
    """List a consumer's dead letters without removing them: id, original topic, key,
    attempts, error and when it was dead-lettered.

    Look at one with `dead-letter show`, send them back with `dead-letter requeue`.
    RabbitMQ: reading hands the messages straight back to the queue (their order may
    change). Kafka: only what was not requeued yet is listed.
    """
    broker = _broker(settings, consumer)
    listing: Listing = _run(
        lambda: broker.browse(limit), f"reading dead letters of {consumer}", _read
    )
    if as_json:
        print_json(
            list_json(
                [letter.summary() for letter in listing.letters],
                listing.total,
                consumer=consumer,
                where=broker.where,
                exists=not listing.missing,
            )
        )
        return
    if not listing.letters:
        say(_nothing_there(broker, consumer, listing))
        return
    console.print(_letters_table(f"Dead letters of {consumer} in {broker.where}", listing.letters))
    more = "; raise --limit to see more" if listing.total > len(listing.letters) else ""
    say(f"{len(listing.letters)} of {listing.total} dead letters{more}. {broker.order_note}")


@app.command()
@with_settings("broker_url")
def show(
    consumer: ConsumerName,
    message_id: Annotated[
        str,
        typer.Argument(
            help=(
                "The dead letter's id: its postroom-id as logs and `dead-letter ls` show it "
                "(any spelling of the UUID), its AMQP message_id, or its position."
            ),
            metavar="ID",
            show_default=False,
        ),
    ],
    as_json: Json = False,
    *,
    settings: Settings,
) -> None:
    """Everything about one dead letter: its error, every header, the payload
    pretty-printed."""
    message_id = inbox_message_id(message_id, listed_by="postroom dead-letter ls")
    broker = _broker(settings, consumer)
    found: Found = _run(lambda: broker.find(message_id))
    letter = found.letter
    if letter is None:
        failed(
            f"no dead letter {message_id!r} for consumer {consumer!r} in {broker.where}: "
            f"`postroom dead-letter ls --consumer {consumer}` lists them"
        )
    if as_json:
        kind, view = payload_view(letter.body, letter.content_type)
        document = letter.summary()
        document["headers"] = letter.headers
        document["payload_format"] = kind
        document["payload_base64"] = letter.body
        if kind in {"json", "text"}:
            document["payload"] = view
        document["copies"] = found.copies
        document["amqp_message_id"] = letter.broker_message_id
        print_json(document)
        return
    now = datetime.now(UTC)
    other_id = letter.broker_message_id
    show_fields(
        [
            ("id", letter.id),
            *([("AMQP message_id", other_id)] if other_id and other_id != letter.id else []),
            ("where", f"{broker.where}, {letter.position}"),
            ("topic", letter.topic),
            ("key", letter.key),
            ("attempts", letter.attempts),
            ("dead-lettered by", letter.headers.get(HEADER_CONSUMER)),
            (
                "dead-lettered",
                f"{timestamp(letter.dead_lettered_at)} "
                f"({age(seconds_between(now, letter.dead_lettered_at))} ago)"
                if letter.dead_lettered_at
                else None,
            ),
            ("content type", letter.content_type),
            ("payload size", f"{letter.payload_bytes} bytes"),
        ]
    )
    if found.copies > 1:
        say(f"({found.copies} dead letters have this id; this is the first.)")
    show_headers_and_payload(letter.headers, letter.body, letter.content_type)
    say(f"\nError:\n{printable(letter.error or '-', keep=NEWLINE)}")
    say(
        "\nFix the cause, then send it back: "
        f"postroom dead-letter requeue --consumer {consumer} {letter.id}"
    )


@app.command()
@with_settings("broker_url")
@with_mode
def requeue(
    consumer: ConsumerName,
    ids: Annotated[
        list[str] | None,
        typer.Argument(
            help=(
                "Ids of the dead letters to send back: postroom-ids as logs and `dead-letter "
                "ls` show them, AMQP message_ids, or positions."
            ),
            metavar="ID",
            show_default=False,
        ),
    ] = None,
    everything: Annotated[
        bool,
        typer.Option(
            "--all",
            envvar="POSTROOM_DEAD_LETTER_ALL",
            help="Without ids: requeue every dead letter of the consumer.",
        ),
    ] = False,
    *,
    mode: Mode,
    settings: Settings,
) -> None:
    """Send dead letters back to the consumer, then remove them from the dead letters.

    RabbitMQ: a copy (same message id, body and headers, attempts reset) goes to the
    consumer's queue, and the dead letter is acknowledged only after RabbitMQ confirmed the
    copy. Kafka: a copy goes to the message's original topic marked for this consumer only
    (other consumer groups skip it), and once Kafka confirmed it the group
    NAME.dead-letter-cli moves past it. Fix the cause first, or they come back. A message
    the consumer already handled is skipped by its inbox.
    """
    if not ids and not everything:
        fail(
            "say which dead letters to requeue: give their ids (see `postroom dead-letter ls "
            f"--consumer {consumer}`), or --all for every dead letter of {consumer!r}",
            EXIT_USAGE,
        )
    ids = [inbox_message_id(i, listed_by="postroom dead-letter ls") for i in ids or []]
    broker = _broker(settings, consumer)
    listing: Listing = _run(
        lambda: broker.browse(None), f"reading dead letters of {consumer}", _read
    )
    if ids:
        absent = [i for i in ids if not any(x.is_called(i) for x in listing.letters)]
        if absent:
            failed(
                f"no dead letter {', '.join(map(repr, absent))} for consumer {consumer!r} in "
                f"{broker.where}; nothing was requeued (`postroom dead-letter ls --consumer "
                f"{consumer}` lists them)"
            )
        matched = [x for x in listing.letters if any(x.is_called(i) for i in ids)]
    else:
        matched = list(listing.letters)

    def apply() -> Done:
        report: Requeued = _run(
            lambda: broker.requeue(matched),
            f"requeue dead letters to {broker.target}",
            lambda done: len(done.requeued),
        )
        return Done(
            len(report.requeued),
            lines=_requeued_lines(report, consumer, broker.target),
            facts={
                "requeued": [letter.id for letter in report.requeued],
                "failed": [{"id": x.id, "error": why} for x, why in report.failures],
                "still_listed": [letter.summary() for letter in report.still_listed],
                "holding_back": [letter.summary() for letter in report.holding_back],
                "gone": [letter.id for letter in report.vanished],
            },
            errors=[
                f"not requeued: {letter.id} ({why}); it stays a dead letter"
                for letter, why in report.failures
            ],
            exit_code=EXIT_FAILED if report.failures else 0,
        )

    run_change(
        Wording(
            "dead letters",
            "requeue",
            {"consumer": consumer},
            place=f"from {broker.where} to {broker.target}",
            target=f" to {broker.target}",
            nothing=_nothing_there(broker, consumer, listing),
        ),
        mode,
        select=lambda: Selection(len(matched), matched[:SAMPLE_ROWS]),
        preview=_letters_table,
        item_json=DeadLetter.summary,
        apply=apply,
    )


def _requeued_lines(report: Requeued, consumer: str, target: str) -> list[str]:
    lines = [
        f"Requeued {len(report.requeued)} dead letters to {target}; the consumer handles "
        "them again with a fresh set of attempts (its inbox skips any it already handled)."
    ]
    if report.vanished:
        lines.append(
            f"{len(report.vanished)} dead letters were gone by the time of the requeue "
            f"(someone else took them): {', '.join(x.id for x in report.vanished)}"
        )
    if report.still_listed:
        lines.append(
            f"Requeued but still listed: {', '.join(x.id for x in report.still_listed)}. "
            "Kafka cannot delete records, and the group "
            f"{consumer + CLI_GROUP_SUFFIX!r} only moves past requeued records without a "
            "gap; these come after dead letters that were not requeued: "
            f"{', '.join(f'{x.id} ({x.position})' for x in report.holding_back)}. "
            "Requeue those (or --all) to clear the list; requeueing one twice is "
            "harmless, the consumer's inbox skips what it already handled."
        )
    return lines
