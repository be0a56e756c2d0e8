"""Face detectors beyond OpenCV's Haar cascade (which lives in fer.faces)."""
