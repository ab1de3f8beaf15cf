import sys

from nanochat.train.trainer import main

sys.exit(main())
