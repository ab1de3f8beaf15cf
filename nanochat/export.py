"""``python -m nanochat.export``: see ``nanochat.cli.export``."""
import sys

from nanochat.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
