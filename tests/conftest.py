"""Shared test setup: registers the in-memory "fake" dataset (fake_data.py)."""

import fake_data  # noqa: F401  # pylint: disable=unused-import  # Registers data.dataset="fake".
