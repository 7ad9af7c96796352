"""Shared test settings."""

import os

from hypothesis import settings

# CI explores the same examples on every run (a red CI must be reproducible); locally hypothesis
# draws new ones each time and keeps failures in .hypothesis/.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
