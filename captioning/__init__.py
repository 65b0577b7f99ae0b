"""Image captioning with visual attention: encoders, decoders, search, training and inference."""

__version__ = "0.1.0"
