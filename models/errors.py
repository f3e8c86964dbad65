"""The model room's error: networks that cannot be built or model packages that cannot be read."""


class ModelError(Exception):
    """A model package, weight folder or network configuration the model room cannot use."""
