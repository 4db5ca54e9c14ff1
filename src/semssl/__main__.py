from semssl.cli import main
import sys

sys.exit(main())
