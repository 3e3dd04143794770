"""Shared setup for the distillation tests: one intra-op thread, small PAT distillers, random batches."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread(one_thread_seeded):
    yield


MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)


@pytest.fixture
def make_pat():
    """make_pat(teacher, student, img, variant, **kw) -> a PAT distiller with small random timm models.

    variant: a name ("paper" / "official": built by build_distiller) or a PatVariant (one switch at a time: built
    the way build_distiller wires a variant into the taps).
    """
    from patfast.distill.build import DistillSettings, build_distiller
    from patfast.distill.pat import PAT
    from patfast.distill.variant import PatVariant
    from patfast.models.create import create_model
    from patfast.models.stages import StageTaps
    from patfast.models.teacher import Teacher

    def make(teacher="convnext_atto", student="resnet18", img=32, variant="paper", **kw):
        t = create_model(teacher, 10, img)
        s = create_model(student, 10, img)
        if isinstance(variant, str):
            settings = DistillSettings(pat_variant=variant, **kw)  # kw: DistillSettings fields
            return build_distiller("pat", s, t, settings, img_size=img, data_mean=MEAN, data_std=STD)
        assert isinstance(variant, PatVariant)
        t_taps = StageTaps(t, img, class_token=variant.class_token_rule, token_return=variant.token_return_rule)
        wrapped = Teacher(t, t_taps, mean=MEAN, std=STD, data_mean=MEAN, data_std=STD)
        s_taps = StageTaps(s, img, class_token=variant.class_token_rule)
        return PAT(s, s_taps, wrapped, variant=variant, **kw)  # kw: PAT's arguments

    return make


@pytest.fixture
def make_batch():
    """make_batch(b, img, classes, seed) -> (images (b, 3, img, img), int labels (b,))."""

    def make(b=4, img=32, classes=10, seed=0):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(b, 3, img, img, generator=g), torch.randint(0, classes, (b,), generator=g)

    return make
