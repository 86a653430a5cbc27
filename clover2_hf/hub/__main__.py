"""`python -m clover2_hf.hub DIR...`: (re)write drafter folders' code files from the installed package."""

import sys

from .code_files import main

sys.exit(main())
