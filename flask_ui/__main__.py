"""Deployable: the upload UI, `python -m flask_ui` (settings: VISION_UI_* env)."""

import sys

from flask_ui.server import main

sys.exit(main())
