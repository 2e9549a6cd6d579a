"""The export step's one error type, in a module of its own: `export.weights` needs it and nothing
else of the package, so the Docker build can fetch the weights before the rest of the code is
copied (a code change then leaves the weights layer cached)."""


class ExportError(Exception):
    """The export cannot go on; the message says why and what to do."""
