"""Shipped datasets (JSON lines); regenerate with scripts/make_data.py."""
