"""Runs at the start of every interpreter that has this directory on PYTHONPATH (the daemons of
tests that inject faults): wraps the workers' packet handling as NFQ_IPSEC_TEST_FAULT says."""

import os

if os.environ.get("NFQ_IPSEC_TEST_FAULT"):
    from faults import nfq_ipsec_faults

    nfq_ipsec_faults.install(os.environ["NFQ_IPSEC_TEST_FAULT"])
