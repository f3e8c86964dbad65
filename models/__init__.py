"""Model room: the Loopy networks on diffusers (LoopyModel and its modules) and model packages in the MLflow registry."""
