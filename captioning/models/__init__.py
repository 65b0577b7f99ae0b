"""Encoders, attention and decoders, all speaking the contracts of ``base.py``."""
