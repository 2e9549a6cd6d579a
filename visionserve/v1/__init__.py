"""Generated gRPC stubs for protos/visionserve/v1/inference.proto (`make protos`; do not edit)."""
