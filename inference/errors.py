"""The inference room's error: a portrait, audio track or output the sampler cannot use."""


class InferenceError(Exception):
    """Sampling cannot go on: no face in the portrait, unusable audio, or the video cannot be written."""
