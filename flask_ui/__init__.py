"""Deployable: the upload UI (Flask). Talks to the inference APIs only through `client` (HTTP)
and `grpc_client` (gRPC, video); `python -m flask_ui` serves it (settings: VISION_UI_* env)."""
