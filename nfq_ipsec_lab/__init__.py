"""nfq-ipsec's lab and benchmark tools: what runs around the data plane, not in it.

- :mod:`nfq_ipsec_lab.lab`: the network-namespace lab (``nfq-ipsec lab demo``,
  ``scripts/demo``), the two-VM Vagrant lab, and the namespace and daemon harness the root
  tests use;
- :mod:`nfq_ipsec_lab.bench`: the benchmark (``nfq-ipsec bench``, ``scripts/bench``), the
  per-packet profiler (``scripts/profile``), the SPD scaling script and the strongSwan
  comparison.

It builds on the runtime package :mod:`nfq_ipsec` and ships beside it as the optional extra
``lab`` (``pip install 'nfq-ipsec[lab]'``). The runtime never imports it (a test checks that):
``nfq-ipsec lab`` and ``nfq-ipsec bench`` find :mod:`nfq_ipsec_lab.cli` through the entry-point
group ``nfq_ipsec.commands`` and, without the extra, say what to install.
"""
