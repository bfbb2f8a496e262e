"""SA database: inbound SAs by SPI, outbound SAs by the policy they serve."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from .sa import SAParams, SecurityAssociation
from .spd import SPD, Action, Policy


class SAD:
    def __init__(
        self, spd: SPD, sas: Iterable[SAParams | SecurityAssociation], now: float
    ) -> None:
        self._by_name: dict[str, SecurityAssociation] = {}
        self._by_spi: dict[int, SecurityAssociation] = {}
        self._out_by_spi: dict[int, SecurityAssociation] = {}  # for ICMP errors about our ESP
        # Inbound by how their ESP travels: plain ESP finds only plain SAs, ESP in UDP only UDP
        # SAs (RFC 3948); ``by_spi`` finds either.
        self._esp_by_spi: dict[int, SecurityAssociation] = {}
        self._udp_by_spi: dict[int, SecurityAssociation] = {}
        for item in sas:
            sa = item if isinstance(item, SecurityAssociation) else SecurityAssociation(item, now)
            if sa.name in self._by_name:
                raise ValueError(f"duplicate SA name {sa.name!r}")
            self._by_name[sa.name] = sa
            if sa.outbound:
                self._out_by_spi.setdefault(sa.spi, sa)
            else:
                if sa.spi in self._by_spi:
                    raise ValueError(f"duplicate inbound SPI 0x{sa.spi:08x}")
                self._by_spi[sa.spi] = sa
                (self._esp_by_spi if sa.udp is None else self._udp_by_spi)[sa.spi] = sa
        # Precompute: which of a PROTECT policy's SAs this SAD holds, and each SA's policy.
        self._out_by_policy: dict[str, SecurityAssociation] = {}
        self._policy_of: dict[str, Policy] = {}
        for policy in spd.policies:
            if policy.action is not Action.PROTECT:
                continue
            for name in policy.sa_names:
                held = self._by_name.get(name)
                if held is None:
                    continue
                self._policy_of.setdefault(name, policy)
                if held.outbound:
                    self._out_by_policy.setdefault(policy.name, held)

    def by_spi(self, spi: int) -> SecurityAssociation | None:
        return self._by_spi.get(spi)

    def esp_by_spi(self, spi: int) -> SecurityAssociation | None:
        return self._esp_by_spi.get(spi)

    def udp_by_spi(self, spi: int) -> SecurityAssociation | None:
        return self._udp_by_spi.get(spi)

    def udp_ports(self) -> frozenset[int]:
        """The local ports of the inbound SAs whose ESP comes in UDP."""
        return frozenset(sa.udp.local_port for sa in self._udp_by_spi.values()
                         if sa.udp is not None)

    def outbound_by_spi(self, spi: int) -> SecurityAssociation | None:
        return self._out_by_spi.get(spi)

    def by_name(self, name: str) -> SecurityAssociation | None:
        return self._by_name.get(name)

    def outbound_sa(self, policy: Policy) -> SecurityAssociation | None:
        return self._out_by_policy.get(policy.name)

    def policy_of(self, sa: SecurityAssociation) -> Policy | None:
        return self._policy_of.get(sa.name)

    def all(self) -> Iterator[SecurityAssociation]:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)
