"""Outbox and inbox tables.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

from alembic import context, op

from postroom.schema.steps import STEPS

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_STEP = next(step for step in STEPS if step.revision == revision)


def upgrade() -> None:
    """Create the outbox and inbox tables."""
    _STEP.upgrade(op, context.config.attributes["tables"])


def downgrade() -> None:
    """Drop the outbox and inbox tables."""
    _STEP.downgrade(op, context.config.attributes["tables"])
