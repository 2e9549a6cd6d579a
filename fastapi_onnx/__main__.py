import sys

from fastapi_onnx.main import main

sys.exit(main())
