"""Broken builds of postroom that the suite must catch (``make mutants``)."""
