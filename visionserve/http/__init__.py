"""The HTTP front door (FastAPI): routes translate to and from `InferenceService`."""

from visionserve.http.app import create_app

__all__ = ["create_app"]
