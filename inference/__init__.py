"""Inference room: the Loopy sampler (DDIM with three-way guidance, clip by clip with the motion
history kept as latents), portrait preparation, video writing and the sampling CLI.

Imports the data room (audio decoding and features, face crops, VAE latents) and the model room
(networks, model packages); nothing below it imports this room.
"""
