"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
"""

from __future__ import annotations

from alembic import context, op

from postroom.schema.steps import STEPS

revision = ${repr(up_revision)}
down_revision = ${repr(down_revision)}
branch_labels = None
depends_on = None

_STEP = next(step for step in STEPS if step.revision == revision)


def upgrade() -> None:
    _STEP.upgrade(op, context.config.attributes["tables"])


def downgrade() -> None:
    _STEP.downgrade(op, context.config.attributes["tables"])
