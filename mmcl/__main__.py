"""`python -m mmcl ...` is the `mmcl` command (launchers that take `-m` start it this way)."""

import sys

from mmcl.cli import main

sys.exit(main())
