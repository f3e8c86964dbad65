"""The training-time reader: Loopy samples (clip, reference, motion frames, audio windows,
condition switches) from a dataset, for plain torch and for Ray Data / Ray Train."""
