from nanochat.cli.train import main
import sys

sys.exit(main())
