"""`python -m build_llm.cli`: the `build-llm` command."""

import sys

from build_llm.cli import main

sys.exit(main())
