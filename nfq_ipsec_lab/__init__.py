"""nfq-ipsec's lab and benchmark tools: what runs around the data plane, not in it.

- :mod:`nfq_ipsec_lab.lab`: the network-namespace lab (``nfq-ipsec lab demo``,
  ``scripts/demo``), the two-VM Vagrant lab, and the namespace and daemon harness the root
  tests use;
- :mod:`nfq_ipsec_lab.bench`: the benchmark (``nfq-ipsec bench``, ``scripts/bench``), the
  per-packet profiler (``scripts/profile``), the SPD scaling script and the strongSwan
  comparison.

It builds on the runtime package :mod:`nfq_ipsec`; the runtime does not need it.
"""
