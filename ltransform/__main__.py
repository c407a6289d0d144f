"""``python -m ltransform run ...``: the same as the ``ltransform`` command."""

import sys

from ltransform.cli import main

sys.exit(main())
