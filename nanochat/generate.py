"""``python -m nanochat.generate``: see ``nanochat.cli.generate``."""
import sys

from nanochat.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
