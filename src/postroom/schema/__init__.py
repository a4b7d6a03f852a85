"""postroom's tables (SQLAlchemy Core), their migrations and the SQL the services run."""

from postroom.schema.steps import HEAD, downgrade_ops, upgrade_ops
from postroom.schema.tables import (
    DEAD,
    PARTITION_COUNT,
    PENDING,
    PUBLISHED,
    Tables,
    build_tables,
    tables_for,
    validate_identifier,
)

__all__ = [
    "DEAD",
    "HEAD",
    "PARTITION_COUNT",
    "PENDING",
    "PUBLISHED",
    "Tables",
    "build_tables",
    "downgrade_ops",
    "tables_for",
    "upgrade_ops",
    "validate_identifier",
]
