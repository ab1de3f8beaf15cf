import sys

from nanochat.cli.config import main

sys.exit(main())
