"""Validation, backend dispatch and custom-op registration, one op per file."""
