"""`python -m harmony.check gpu ...`"""

import sys

from harmony.check import main

sys.exit(main())
