"""visionserve: vision models behind HTTP and gRPC, on ONNX Runtime or PyTorch, CPU or CUDA."""

import os

__version__ = "0.1.0"

# NOTE: ONNX Runtime's Linux wheels (1.29 on) send usage telemetry to Microsoft and keep a device
# id and an event store under ~/.cache/Microsoft/ unless ORT_DISABLE_TELEMETRY=1 is set before
# onnxruntime is imported (measured: set after the import, the files still appear). A server
# for private networks sends nothing out unasked; every entry point imports this package before
# it imports onnxruntime. ORT_DISABLE_TELEMETRY=0 in the environment keeps ONNX Runtime's own default.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
