"""``python -m llama_index_lag.cli``: the ``lag`` command."""

import sys

from . import main

sys.exit(main())
