"""Generated gRPC stubs for the seed articles' own services, protos/seeds/*.proto (`make protos`; do
not edit): `classify_pb2*` (seed 000, `classify.Classifier`), `inference_pb2*` (seed 001,
`InferenceServer`) and `protobuf_pb2*` (seed 003, `Pipeline`). Their servicers are in
grpc_server/seed_services.py.
"""
