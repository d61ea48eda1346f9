"""``python -m gradcamo_dask.cli``."""

import sys

from gradcamo_dask.cli.main import main

sys.exit(main())
