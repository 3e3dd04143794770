"""Creating timm models by name: unknown names and pretrained tags."""

import pytest
import torch

from patfast.errors import UserError
from patfast.models.create import check_model_name, create_model, random_init_note


def test_random_init_note_for_a_tagged_name():
    assert random_init_note("resnet18.a1_in1k") == (
        "resnet18.a1_in1k: the tag '.a1_in1k' names pretrained weights, but the model starts from random weights "
        "(no download here; pass a weights file)")
    assert random_init_note("resnet18.a1_in1k", hint="pass --teacher-checkpoint FILE").endswith(
        "random weights (pass --teacher-checkpoint FILE)")
    assert random_init_note("resnet18") is None
    assert random_init_note("deit_tiny_patch16_224") is None


def test_a_tagged_name_builds_the_same_random_model():
    torch.manual_seed(0)
    tagged = create_model("resnet10t.c3_in1k", 10, 32)
    torch.manual_seed(0)
    plain = create_model("resnet10t", 10, 32)
    assert all(torch.equal(a, b) for a, b in zip(tagged.state_dict().values(), plain.state_dict().values()))


def test_unknown_pretrained_tag_lists_the_tags():
    check_model_name("resnet18.a1_in1k")
    with pytest.raises(UserError, match=r"unknown pretrained tag '\.bogus' for timm model resnet18 \(its tags: "
                                        r"a1_in1k, a2_in1k, .*tv_in1k; or drop the tag: resnet18\)$"):
        check_model_name("resnet18.bogus")
    with pytest.raises(UserError, match="unknown pretrained tag '.bogus' for timm model resnet10t"):
        create_model("resnet10t.bogus", 10, 32)


def test_unknown_model_name():
    with pytest.raises(UserError, match=r"unknown timm model 'resnet1000' \(did you mean"):
        check_model_name("resnet1000")
