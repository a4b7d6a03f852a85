"""Relay broker state and the consumers' delivery counter.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from alembic import context, op

from postroom.schema.steps import STEPS

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_STEP = next(step for step in STEPS if step.revision == revision)


def upgrade() -> None:
    """Add the relays' broker state columns and the inbox's delivery counter table."""
    _STEP.upgrade(op, context.config.attributes["tables"])


def downgrade() -> None:
    """Drop the delivery counter table and the relays' broker state columns."""
    _STEP.downgrade(op, context.config.attributes["tables"])
