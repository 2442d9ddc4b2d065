"""An OpenAI-compatible gateway in front of one or many LMArenaBridge servers."""

__version__ = "0.1.0"
