"""User-facing errors of the engine: one sentence that names the problem and the fix."""


class SAMMed3DError(Exception):
    """An error the user can act on; the message is shown as it is."""


class CheckpointError(SAMMed3DError):
    """A checkpoint file that cannot be used."""


class InputError(SAMMed3DError):
    """An image, label or point that cannot be used."""


class DownloadError(SAMMed3DError):
    """A download that failed or could not be verified."""
