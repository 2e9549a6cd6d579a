import sys

from fastapi_pt.main import main

sys.exit(main())
