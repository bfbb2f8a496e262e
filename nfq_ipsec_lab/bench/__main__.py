"""``python -m nfq_ipsec_lab.bench``: the same as ``nfq-ipsec bench``."""

import sys

from . import main

sys.exit(main())
