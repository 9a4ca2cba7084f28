import sys

from unet3plus.cli import main

sys.exit(main())
