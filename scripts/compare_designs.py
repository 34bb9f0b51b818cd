"""The original design side by side with its workarounds and snaptree.

Example:

    .venv/bin/python scripts/compare_designs.py --seconds 3 --accounts 10000 --writers 2

All the work is in ``snaptree.demo.compare``; ``snaptree demo --compare`` runs the same code.
"""

import sys

from snaptree.demo.compare import main

if __name__ == "__main__":
    sys.exit(main())
