"""mmfuse: attention-based fusion of images and text."""

__version__ = "0.1.0"
