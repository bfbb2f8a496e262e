"""OpenSSL through ``cryptography``: the core's own suites (compiled), every suite there is."""

from __future__ import annotations

import cryptography
from cryptography.hazmat.backends.openssl import backend

from ..core.suites import Suite, make_suite
from .base import ALL_SUITES, Engine, Probe


class OpenSSLEngine(Engine):
    name = "openssl"

    def probe(self) -> Probe:
        return Probe(frozenset(ALL_SUITES),
                     detail=f"cryptography {cryptography.__version__}, {backend.openssl_version_text()}")

    def build(self, encryption: str, key: bytes, integrity: str | None, integrity_key: bytes) -> Suite:
        return make_suite(encryption, key, integrity, integrity_key)
