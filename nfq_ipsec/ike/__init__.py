"""The IKEv2 keying agent's sans-IO core (RFC 7296, algorithms of RFC 8247).

Like the ESP core it does no I/O: bytes, time and randomness go in, messages and keys come
out; no sockets, clock or random source are touched here. What exists so far is the part
every exchange stands on: the message codec (``message``, ``proposal``), Diffie-Hellman
(``dh``), key derivation and authentication octets (``keys``) and the Encrypted payload
(``sk``). docs/ike.md says what is built and what comes next.
"""
