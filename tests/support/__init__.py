"""Tools for tests that run postroom for real: a fault-injecting TCP proxy, relay processes,
and plain-client read-back of what reached RabbitMQ and Kafka.

Nothing here imports postroom's broker modules: the read-back uses aio-pika and
confluent-kafka directly, so a test sees what a user's consumer would see.
"""
