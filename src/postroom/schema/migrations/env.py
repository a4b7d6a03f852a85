"""Alembic environment for postroom's own migrations; the logic is in postroom.schema.migrate."""

from alembic import context

from postroom.schema.migrate import run_environment

run_environment(context)
