"""Deployable: the gRPC front door (grpc.aio) to the same InferenceService as the HTTP app."""
