"""The Open Inference Protocol (KServe V2), served beside the project's own API.

`signature` (what the model looks like through the protocol), `codec` (tensors in and out, checked
against it), `rest` (the HTTP body: JSON, binary tensors, compression), `statistics` and `http`
(the FastAPI routes). The gRPC servicer is in `grpc_server/v2_servicer.py`; its stubs,
`grpc_service_pb2*.py`, are generated from protos/inference/grpc_service.proto (`make protos`; do
not edit). The protocol-agnostic modules import neither FastAPI nor grpc.
"""
