import sys

from sslfast.pretrain.cli import main

sys.exit(main())
