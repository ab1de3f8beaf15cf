import sys

from nanochat.cli.train import main

sys.exit(main())
