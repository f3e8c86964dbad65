"""Model room: the Loopy networks on diffusers and the sampler."""
