import sys

from nanochat.data.corpus import main

sys.exit(main())
