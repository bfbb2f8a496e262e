"""Crypto engines: the libraries (and the kernel) an SA's cipher can run on, discovered,
verified by known-answer tests, chosen per SA and swapped at runtime (docs/engines.md)."""
