"""The ``[crypto]`` section: the engines' policy, preferences and checks."""

from __future__ import annotations

from typing import Any

from ..engines.base import CryptoSettings
from . import parsers
from .fields import CRYPTO
from .reading import Problems


def read_crypto(raw: dict[str, Any], probs: Problems) -> CryptoSettings:
    CRYPTO.check_unknown(raw, "crypto", probs)
    policy = CRYPTO["policy"].read(raw, "crypto", probs)
    prefer = parsers.engine_names(CRYPTO["prefer"], raw, "crypto", probs)
    if policy == "prefer" and not prefer:
        probs.add("crypto.prefer", "policy prefer needs a list of engines")
    disabled = parsers.engine_names(CRYPTO["disabled"], raw, "crypto", probs)
    return CryptoSettings(
        policy=policy,
        prefer=prefer,
        verify_interval=parsers.seconds_or_off(CRYPTO["verify_interval"], raw, "crypto", probs),
        verify_timeout=CRYPTO["verify_timeout"].read(raw, "crypto", probs),
        disabled=disabled,
        self_check=CRYPTO["self_check"].read(raw, "crypto", probs),
        offload_helpers=CRYPTO["offload_helpers"].read(raw, "crypto", probs),
        offload_batch=CRYPTO["offload_batch"].read(raw, "crypto", probs),
        offload_timeout=CRYPTO["offload_timeout"].read(raw, "crypto", probs),
    )
