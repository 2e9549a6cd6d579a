"""visionserve: vision models behind HTTP and gRPC, on ONNX Runtime or PyTorch, CPU or CUDA."""

__version__ = "0.1.0"
