"""The inference room's errors: a portrait, audio track or output the sampler cannot use."""


class InferenceError(Exception):
    """Sampling cannot go on: no face in the portrait, unusable audio, or the video cannot be written."""


class BadInputError(InferenceError, ValueError):
    """A portrait or audio file the sampler cannot use (undecodable image, no face, audio shorter
    than one frame); the message names the file."""
