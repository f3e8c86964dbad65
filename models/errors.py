"""The model room's errors: networks that cannot be built or model packages that cannot be read."""


class ModelError(Exception):
    """A model package, weight folder or network configuration the model room cannot use."""


class IncompatibleWeightsError(ModelError, RuntimeError):
    """Pretrained weights that do not fit the network being built (not an SD-1.5 U-Net layout,
    missing or unexpected keys); the message names what does not fit."""
