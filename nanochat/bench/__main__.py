import sys

from nanochat.bench.cli import main

sys.exit(main())
