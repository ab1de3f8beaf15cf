"""``python -m nanochat.eval``: see ``nanochat.cli.eval``."""
import sys

from nanochat.cli.eval import main

if __name__ == "__main__":
    sys.exit(main())
