"""``python -m nanochat.serve``: see ``nanochat.cli.serve``."""
import sys

from nanochat.cli.serve import main

sys.exit(main())
