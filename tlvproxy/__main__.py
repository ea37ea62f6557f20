"""`python -m tlvproxy` is the `tlvproxy` command."""

import sys

from tlvproxy.cli import main

sys.exit(main())
