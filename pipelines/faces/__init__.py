"""Faces in frames: detection and landmarks (68 points, iBUG-300W order), tracks across frames,
the speaker's crop track, and the head / expression statistics of a landmark sequence."""
