"""Submodule of the torchaudio import stub (see __init__.py)."""
from ._missing import missing_in

__getattr__ = missing_in(__name__)
