"""Models: timm creation (create), weights files (weights), teachers from timm checkpoints (legacy_checkpoint), stage
taps."""

__all__ = ["load_teacher"]


def __getattr__(name: str):
    # lazy, so that importing patfast.models.tokens or .stages does not import timm
    if name == "load_teacher":
        from patfast.models.legacy_checkpoint import load_teacher

        return load_teacher
    raise AttributeError(f"module 'patfast.models' has no attribute {name!r}")
