"""patfast: fast heterogeneous knowledge distillation with PAT (Perspective-Aware Teaching)."""

__version__ = "0.1.0"
