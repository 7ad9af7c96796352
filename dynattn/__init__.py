"""dynattn: exact lazy dynamic attention maintenance."""
__version__ = "0.1.0"
