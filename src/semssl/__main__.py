import sys

from semssl.cli import main

sys.exit(main())
