"""What the training loop asks of a distiller (Distiller's methods), for every distiller and the student alone: the
learning modules and their state without the teacher, the per-process and shared state, the first-batch and compile
switches, stage taps that let go of features, and an EMA copy without the stage hooks."""

import copy

import pytest
import torch
from timm.utils import ModelEmaV3

from patfast.distill.build import DistillSettings, build_distiller
from patfast.models.create import create_model

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def make(name, **kw):
    torch.manual_seed(0)
    teacher = create_model("convnext_atto", 10, 32) if name != "none" else None
    extra = {"pat_dim": 64, "pat_heads": 4} if name == "pat" else {}
    return build_distiller(name, create_model("resnet10t", 10, 32), teacher, DistillSettings(**extra, **kw),
                           img_size=32, data_mean=MEAN, data_std=STD)


def batch():
    g = torch.Generator().manual_seed(3)
    return torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)


ALL = ("pat", "kd", "ofa", "dkd", "dist", "fitnet", "none")
TAPPED = ("pat", "ofa", "fitnet")  # distillers that read the student's stage features


@pytest.mark.parametrize("name", ALL)
def test_learning_modules_state_and_roundtrip(name):
    d = make(name)
    assert "teacher" not in d.learning_modules()
    teacher_params = {id(p) for p in d.frozen_teacher().parameters()} if name != "none" else set()
    params = d.trainable_parameters()
    assert params and not teacher_params & {id(p) for p in params}
    state = d.trainable_state_dict()
    assert not any(k.startswith("teacher.") for k in state)
    assert state.keys() == {k for k in d.state_dict() if not k.startswith("teacher.")}
    other = make(name)
    with torch.no_grad():
        for p in other.trainable_parameters():
            p.add_(1.0)
    assert other.load_trainable_state_dict(state) == ([], [])
    assert all(torch.equal(v, other.trainable_state_dict()[k]) for k, v in state.items())
    missing, unexpected = other.load_trainable_state_dict({**state, "student.nope": torch.zeros(1)})
    assert missing == [] and unexpected == ["student.nope"]


def test_pat_process_state_is_the_feedback_and_shared_state_the_teacher_buffers():
    d = make("pat").train()
    assert d.process_state() == {"1": None, "2": None, "3": None, "4": None}
    assert not d.compile_ready()  # step 0: no feedback yet, the start-up graph
    d(*batch())
    state = d.process_state()
    assert all(v is not None for v in state.values()) and d.compile_ready()
    fresh = make("pat")
    fresh.load_process_state(state)
    assert all(fresh.prompts[k].feedback is state[k] for k in state)
    shared = d.shared_state()
    assert shared.keys() == dict(d.teacher.model.named_buffers()).keys()
    assert not d.first_batch_special and make("pat", pat_variant="official").first_batch_special
    assert make("pat", pat_feedback=False).compile_ready()  # without feedback the steady graph is the first one
    with pytest.raises(ValueError):
        make("kd").load_process_state({"1": None})


@pytest.mark.parametrize("name", TAPPED)
def test_taps_let_go_of_features_after_the_forward(name):
    d = make(name).train()
    _, losses = d(*batch())
    assert list(losses) == list(d.terms)
    assert all(r is None for r in d.student_taps._raw)
    assert all(r is None for r in d.teacher.taps._raw)
    kd = make("kd").train()
    kd(*batch())
    assert all(r is None for r in kd.teacher.taps._raw)  # the clean teacher's features were never used


@pytest.mark.parametrize("name", TAPPED)
def test_the_ema_copy_does_not_write_into_the_stage_taps(name):
    d = make(name).train()
    x, _ = batch()
    leaky = copy.deepcopy(d.student)  # what ModelEmaV3 makes: the hooks come along
    leaky.eval()(x)
    assert all(r is not None for r in d.student_taps._raw)  # the copy wrote into the distiller's taps
    d.student_taps.clear()
    ema = ModelEmaV3(d.student, decay=0.9)
    assert d.without_hooks(ema.module) is ema.module
    ema.module(x)
    assert all(r is None for r in d.student_taps._raw)
    d.student(x)  # the student's own hooks are still there
    assert all(r is not None for r in d.student_taps._raw)


@pytest.mark.parametrize("name", ALL)
def test_the_terms_are_what_forward_returns_and_the_teacher_gets_no_gradient(name):
    d = make(name).train()
    d.start_epoch(1)
    logits, losses = d(*batch())
    assert tuple(losses) == d.terms and logits.shape == (4, 10)
    sum(losses.values()).backward()
    teacher = d.frozen_teacher()
    assert teacher is None or all(p.grad is None for p in teacher.parameters())
    learning = [p for p in d.trainable_parameters() if p.grad is not None]
    assert learning, "nothing learns"


def test_dkd_warm_up_scales_its_term_by_epoch():
    d = make("dkd", dkd_warmup_epochs=4.0).train()
    x, y = batch()
    full = None
    for epoch, scale in ((1, 0.25), (2, 0.5), (4, 1.0), (9, 1.0)):
        d.start_epoch(epoch)
        term = d(x, y)[1]["loss_kd"].detach()
        full = term / scale if full is None else full
        torch.testing.assert_close(term, full * scale)
