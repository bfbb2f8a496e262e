"""A second, independent ESP implementation (N-version ESP: docs/independent.md).

Written apart from ``nfq_ipsec.core``, sharing nothing with it but the configuration's
policies and SA parameters (read by attribute), and built on another cryptographic library
(pycryptodome, where the core uses ``cryptography``). Its structure follows the RFCs one
module each: ``crypto`` (RFC 4106, 7634, 3602, 4868, 2410), ``ipwire`` (RFC 791, 8200),
``window`` (RFC 4303 3.4.3 and Appendix A), ``state`` (RFC 4301 4.4: SPD and SAD),
``framing`` (RFC 4303, RFC 6040), ``fragments`` (RFC 791, RFC 8200: a source's own
fragments), ``pathmtu`` (RFC 4301 8, RFC 1191), ``natt`` (RFC 3948) and ``engine`` (the
entry point).

Like the core it does no I/O: bytes in, an ``Outcome`` out, time passed in.
"""

from .engine import ARRIVING, FORWARDED, LEAVING, UNSUPPORTED, Engine, Outcome

__all__ = ["ARRIVING", "FORWARDED", "LEAVING", "UNSUPPORTED", "Engine", "Outcome"]
