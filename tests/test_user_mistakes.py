"""User mistakes, one table: each ends with exit status 2 and ONE line `patfast: error: ...` naming the problem.

Each case builds what it needs under tmp_path (data folders, checkpoints, config files), runs `patfast.cli.main`
in-process and checks the exit status, that stderr is exactly one line starting `patfast: error: ` and holding the
expected words, that no traceback was printed, and that every file which existed before the run (the sentinel in
the run directory `--out`, the data, the checkpoints) is byte-identical afterwards. Train/teacher cases get `--out`
pointing to a run directory that already holds a sentinel file.

A corrupt or truncated JPEG inside an ImageFolder stops the run with a message naming the file (rather than skipping
it): a data set that silently shrinks gives numbers nobody can compare, and the user can delete or fix the file. The
folder is only listed when it is loaded, so the file is found when the loader decodes it, in the first epoch; the
torch loader turns the UserError raised while decoding (in a worker or not) into the same one line.

Every case is cheap: most fail while the options, data spec, model names and file paths are checked, before the
run directory is touched (nothing new appears in it either); the few that start the run (STARTS_THE_RUN) use a
handful of 12px images or the bundled digits, resnet10t at 32px and batch size 8, and none may reach a training step
(TrainStep is replaced by a failing stub, so a mistake that is not caught costs no training time).

The permission cases (unreadable data, checkpoint or config, unwritable --out) are skipped as root, which ignores mode
bits; to run them as root, drop its DAC capabilities (and the pytest cache, which it could then not write):
    setpriv --bounding-set -dac_override,-dac_read_search pytest -p no:cacheprovider tests/test_user_mistakes.py
"""

import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from patfast.cli import main
from patfast.models.create import create_model
from patfast.models.weights import save_weights
from patfast.train.step import TrainStep

TINY = ["--epochs", "1", "--img-size", "32", "--batch-size", "8", "--no-progress", "--workers", "0"]
ALONE = [*TINY, "--student", "resnet10t", "--distiller", "none"]  # a student trained alone: no teacher needed
KD = [*TINY, "--student", "resnet10t", "--teacher", "resnet10t", "--distiller", "kd", "--pat-dim", "64"]


class Place:
    """What a case builds under tmp_path; `run` is a run directory that already holds a sentinel file."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.run = tmp_path / "run"
        self.run.mkdir()
        (self.run / "notes.txt").write_text("the user's own notes, not to be touched\n")
        self.locked: list = []  # paths chmod-ed by a case, restored afterwards

    def path(self, name: str) -> str:
        return str(self.tmp / name)

    def write(self, name: str, data: bytes | str) -> str:
        p = self.tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode() if isinstance(data, str) else data)
        return str(p)

    def lock(self, path, mode: int) -> str:
        os.chmod(path, mode)
        self.locked.append(path)
        return str(path)

    # ------------------------------------------------------------------------------------------------- data sets

    def cifar100(self, name="cifar-100-python", n_train=8, n_test=4) -> str:
        folder = self.tmp / name
        folder.mkdir()
        dump = {"meta": {b"fine_label_names": [f"c{i}".encode() for i in range(100)]}}
        for split, n in (("train", n_train), ("test", n_test)):
            dump[split] = {b"data": np.full((n, 3072), 7, np.uint8), b"fine_labels": [k % 100 for k in range(n)]}
        for file, obj in dump.items():
            (folder / file).write_bytes(pickle.dumps(obj, protocol=2))
        return str(folder)

    def imagefolder(self, name="images", classes=("cat", "dog"), n_train=4, n_val=2) -> str:
        root = self.tmp / name
        for split, n in (("train", n_train), ("val", n_val)):
            (root / split).mkdir(parents=True, exist_ok=True)
            for c, cls in enumerate(classes):
                (root / split / cls).mkdir(parents=True, exist_ok=True)
                for k in range(n):
                    Image.new("RGB", (12, 12), (90 * c, 10 * k, 0)).save(root / split / cls / f"{k}.png")
        return str(root)

    def checkpoint(self, model: str, num_classes: int = 10, name: str | None = None) -> str:
        path = self.path(name or f"{model}-{num_classes}.safetensors")
        save_weights(create_model(model, num_classes, 32), path, {"model": model})
        return path


class Custom:
    """A custom class: torch.load(weights_only=True) refuses a pickle that needs it (loading it runs code)."""

    def __init__(self):
        self.note = "unpickling me imports this module"


def _jpeg(place: Place, truncated: bool) -> str:
    """An ImageFolder of 8 training images, one a corrupt (garbage) or truncated JPEG: batch size 8 (drop_last)
    puts every image in the first batch, so the bad one is met whatever the shuffled order."""
    root = place.imagefolder(n_train=4)
    os.remove(os.path.join(root, "train", "cat", "0.png"))
    bad = os.path.join(root, "train", "cat", "0.jpg")
    if truncated:
        Image.new("RGB", (64, 64), (200, 30, 30)).save(bad, quality=95)
        with open(bad, "rb") as f:
            data = f.read()
        place.write(bad, data[: len(data) // 2])
    else:
        place.write(bad, b"\xff\xd8\xff\xe0" + b"this is not a JPEG at all" * 20)
    return root


def _cifar_bad(place: Place, truncated: bool) -> str:
    folder = place.cifar100()
    train = os.path.join(folder, "train")
    with open(train, "rb") as f:
        data = f.read()
    place.write(train, data[: len(data) // 3] if truncated else b"\x80\x02}q\x00(garbage" + bytes(range(256)))
    return folder


def _skip_unless_permissions_enforced(place: Place) -> None:
    """Root reads and writes whatever the mode bits say (unless it lacks CAP_DAC_OVERRIDE): nothing to test then."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return
    probe = place.tmp / "probe"
    probe.mkdir()
    os.chmod(probe, 0)
    try:
        os.listdir(probe)
        enforced = False
    except PermissionError:
        enforced = True
    finally:
        os.chmod(probe, 0o700)
        probe.rmdir()
    if not enforced:
        pytest.skip("running as root: file permissions are not enforced")


def _unreadable_data(place: Place) -> str:
    _skip_unless_permissions_enforced(place)
    return place.lock(place.cifar100(), 0)


def _unreadable_file(place: Place, name: str = "teacher.safetensors") -> str:
    _skip_unless_permissions_enforced(place)
    path = place.checkpoint("resnet10t", name=name) if name.endswith(".safetensors") else \
        place.write(name, "epochs: 1\n")
    return place.lock(path, 0)


def _unwritable_out(place: Place) -> str:
    _skip_unless_permissions_enforced(place)
    return place.lock(place.run, 0o500)


def _out_with(place: Place, name: str) -> str:
    # summary.csv with a finished epoch (a header alone is a run that never got anywhere: not refused)
    content = b"epoch,lr,train_loss\n1,0.05,2.3\n" if name == "summary.csv" else b"an earlier run's " + name.encode()
    place.write(f"run/{name}", content)
    return str(place.run)


def _config(place: Place, text: str) -> str:
    return place.write("config.yaml", text)


def _truncated_pth(place: Place) -> str:
    path = place.path("cut.pth")
    torch.save({"w": torch.zeros(64)}, path)
    with open(path, "rb") as f:
        data = f.read()
    return place.write("cut.pth", data[: len(data) // 2])


def _plain_pth(place: Place) -> str:
    path = place.path("plain.pth")
    torch.save({"w": torch.zeros(1)}, path)
    return path


def _pickled_class(place: Place) -> str:
    path = place.path("evil.pth")
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": Custom()}, path)
    return path


# (id, argv builder (Place -> argv), words the one line must hold). Train/teacher argv get `--out <run>` appended
# unless they set --out themselves.
CASES = [
    # ---- data specs and data folders
    ("data-missing-dir", lambda p: ["train", *ALONE, "--data", f"cifar100:{p.path('nowhere')}"],
     "directory not found"),
    ("data-unreadable-dir", lambda p: ["train", *ALONE, "--data", f"cifar100:{_unreadable_data(p)}"],
     "directory not readable"),
    ("data-unknown-kind", lambda p: ["train", *ALONE, "--data", f"mnist:{p.tmp}"], "unknown data spec 'mnist:"),
    ("data-kind-without-dir", lambda p: ["train", *ALONE, "--data", "cifar10"], "needs a directory: cifar10:DIR"),
    ("data-digits-with-dir", lambda p: ["train", *ALONE, "--data", f"digits:{p.tmp}"], "unknown data spec"),
    ("data-empty-spec", lambda p: ["train", *ALONE, "--data", " "], "empty data spec"),
    ("data-cifar-not-there", lambda p: ["train", *ALONE, "--data", f"cifar100:{p.imagefolder()}"],
     "no CIFAR-100 python batches"),
    ("data-cifar-corrupt-pickle", lambda p: ["train", *ALONE, "--data", f"cifar100:{_cifar_bad(p, False)}"],
     "corrupt or truncated CIFAR pickle"),
    ("data-cifar-truncated-pickle", lambda p: ["train", *ALONE, "--data", f"cifar100:{_cifar_bad(p, True)}"],
     "corrupt or truncated CIFAR pickle"),
    ("data-imagefolder-no-classes",
     lambda p: ["train", *ALONE, "--data", f"imagefolder:{p.imagefolder(classes=())}"], "no class sub-folders"),
    ("data-imagefolder-no-images",
     lambda p: ["train", *ALONE, "--data", f"imagefolder:{p.imagefolder(n_train=0)}"], "no images"),
    ("data-imagefolder-empty-val",
     lambda p: ["train", *ALONE, "--data", f"imagefolder:{p.imagefolder(n_val=0)}"], "val"),
    ("data-corrupt-jpeg", lambda p: ["train", *ALONE, "--data", f"imagefolder:{_jpeg(p, False)}"],
     "cannot decode image"),
    ("data-truncated-jpeg", lambda p: ["train", *ALONE, "--data", f"imagefolder:{_jpeg(p, True)}"],
     "cannot decode image"),
    ("data-batch-larger-than-train-set",
     lambda p: ["train", *ALONE, "--data", f"imagefolder:{p.imagefolder()}", "--batch-size", "64"],
     "batch size 64 is larger than the 8 images"),
    # ---- teacher checkpoints
    ("teacher-ckpt-missing", lambda p: ["train", *KD, "--teacher-checkpoint", p.path("none.safetensors")],
     "checkpoint not found"),
    ("teacher-ckpt-is-dir", lambda p: ["train", *KD, "--teacher-checkpoint", str(p.run)], "is a directory"),
    ("teacher-ckpt-garbage-pth", lambda p: ["train", *KD, "--teacher-checkpoint", p.write("t.pth", b"\x00garbage")],
     "not a torch weights file"),
    ("teacher-ckpt-truncated-pth", lambda p: ["train", *KD, "--teacher-checkpoint", _truncated_pth(p)],
     "truncated or corrupt torch zip archive"),
    ("teacher-ckpt-garbage-safetensors",
     lambda p: ["train", *KD, "--teacher-checkpoint", p.write("t.safetensors", os.urandom(64))],
     "cannot read checkpoint"),
    ("teacher-ckpt-pickled-code", lambda p: ["train", *KD, "--teacher-checkpoint", _pickled_class(p)],
     "Custom, which only loads by running code from the file"),
    ("teacher-ckpt-unreadable", lambda p: ["train", *KD, "--teacher-checkpoint", _unreadable_file(p)],
     "is not readable"),
    ("teacher-ckpt-other-model",
     lambda p: ["train", *KD, "--teacher", "convnext_atto", "--teacher-checkpoint", p.checkpoint("resnet10t")],
     "saved for resnet10t"),
    ("teacher-ckpt-other-classes", lambda p: ["train", *KD, "--teacher-checkpoint", p.checkpoint("resnet10t", 5)],
     "shape mismatch"),
    # ---- model names and sizes
    ("unknown-student", lambda p: ["train", *ALONE, "--student", "resnet1000"], "unknown timm model 'resnet1000'"),
    ("unknown-teacher", lambda p: ["train", *KD, "--teacher", "swin_tinny_patch4_window7_224"],
     "unknown timm model 'swin_tinny"),
    ("unknown-teacher-command-model", lambda p: ["teacher", *TINY, "--teacher", "convnext_attto"],
     "did you mean convnext_atto"),
    ("img-size-too-small-for-swin",
     lambda p: ["train", *ALONE, "--student", "swin_tiny_patch4_window7_224", "--img-size", "16"],
     "image size 16 is too small for swin_tiny_patch4_window7_224"),
    ("img-size-too-small-for-teacher",
     lambda p: ["train", *KD, "--student", "vit_tiny_patch16_224", "--teacher", "swin_tiny_patch4_window7_224",
                "--img-size", "16", "--teacher-checkpoint", p.checkpoint("resnet10t")],
     "image size 16 is too small for swin_tiny_patch4_window7_224"),
    # ---- config files
    ("config-missing", lambda p: ["train", *ALONE, "--config", p.path("no.yaml")], "config file not found"),
    ("config-invalid-yaml", lambda p: ["train", *ALONE, "--config", _config(p, "epochs: [1, 2\nlr: 3\n")],
     "line 2, column 3: expected ',' or ']'"),
    ("config-unknown-key", lambda p: ["train", *ALONE, "--config", _config(p, "epoch: 3\n")],
     "unknown key 'epoch' in config file"),
    ("config-wrong-type", lambda p: ["train", "--no-progress", "--config", _config(p, "batch_size: many\n")],
     "'batch_size' in"),
    ("config-unreadable", lambda p: ["train", *ALONE, "--config", _unreadable_file(p, "config.yaml")],
     "cannot read config file"),
    ("config-not-a-mapping", lambda p: ["train", *ALONE, "--config", _config(p, "- 1\n- 2\n")],
     "must hold a mapping"),
    # ---- numbers and choices
    ("batch-size-zero", lambda p: ["train", *ALONE, "--batch-size", "0"], "--batch-size must be > 0, got 0"),
    ("batch-size-negative", lambda p: ["train", *ALONE, "--batch-size", "-8"], "--batch-size must be > 0, got -8"),
    ("epochs-zero", lambda p: ["train", *ALONE, "--epochs", "0"], "--epochs must be > 0, got 0"),
    ("epochs-negative", lambda p: ["teacher", *TINY, "--epochs", "-1"], "--epochs must be > 0, got -1"),
    ("epochs-not-a-number", lambda p: ["train", *ALONE, "--epochs", "ten"], "--epochs must be int, got 'ten'"),
    ("img-size-zero", lambda p: ["train", *ALONE, "--img-size", "0"], "--img-size must be > 0, got 0"),
    ("img-size-negative", lambda p: ["train", *ALONE, "--img-size", "-32"], "--img-size must be > 0, got -32"),
    ("lr-zero", lambda p: ["train", *ALONE, "--lr", "0"], "--lr must be > 0, got 0.0"),
    ("lr-negative", lambda p: ["train", *ALONE, "--lr", "-0.1"], "--lr must be > 0, got -0.1"),
    ("hflip-above-one", lambda p: ["train", *ALONE, "--hflip", "1.5"], "--hflip must be a probability in [0, 1]"),
    ("crop-scale-reversed", lambda p: ["train", *ALONE, "--crop-scale", "0.9,0.1"], "--crop-scale takes two values"),
    ("pat-dim-not-divisible", lambda p: ["train", *TINY, "--pat-dim", "100", "--pat-heads", "8"],
     "not divisible by --pat-heads"),
    ("workers-negative", lambda p: ["train", *ALONE, "--workers", "-1"], "--workers must be >= 0, got -1"),
    ("device-unknown", lambda p: ["train", *ALONE, "--device", "tpu"], "unknown device 'tpu'"),
    ("mixup-odd-batch", lambda p: ["teacher", *TINY, "--teacher", "resnet10t", "--mixup", "0.8", "--batch-size", "7"],
     "mixup/cutmix needs an even batch size"),
    ("student-stages-unknown-module",
     lambda p: ["train", *KD, "--distiller", "pat", "--student-stages", "a,b,c,d",
                "--teacher-checkpoint", p.checkpoint("resnet10t")],
     "--student-stages: ResNet has no module 'a'"),
    ("unknown-distiller", lambda p: ["train", *TINY, "--distiller", "crd"], "--distiller must be one of"),
    ("unknown-pat-variant", lambda p: ["train", *TINY, "--pat-variant", "v2"], "--pat-variant must be one of"),
    ("ofa-stage-out-of-range", lambda p: ["train", *TINY, "--distiller", "ofa", "--ofa-stages", "1,5"],
     "--ofa-stages takes distinct stages among 1,2,3,4, got 1,5"),
    ("ofa-eps-count", lambda p: ["train", *TINY, "--distiller", "ofa", "--ofa-stages", "3,4", "--ofa-eps", "1,2"],
     "--ofa-eps takes one value, or one per --ofa-stages stage plus one for the logits (3), got 1.0,2.0"),
    ("ofa-eps-negative", lambda p: ["train", *TINY, "--distiller", "ofa", "--ofa-eps", "-1"],
     "--ofa-eps values must be >= 0, got -1.0"),
    ("fitnet-stage-repeated", lambda p: ["train", *TINY, "--distiller", "fitnet", "--fitnet-stages", "2,2"],
     "--fitnet-stages takes distinct stages among 1,2,3,4, got 2,2"),
    ("dkd-temperature-zero", lambda p: ["train", *TINY, "--distiller", "dkd", "--dkd-temperature", "0"],
     "--dkd-temperature must be > 0, got 0.0"),
    ("dist-beta-negative", lambda p: ["train", *TINY, "--distiller", "dist", "--dist-beta", "-1"],
     "--dist-beta must be >= 0, got -1.0"),
    ("unknown-data-backend", lambda p: ["train", *ALONE, "--data-backend", "ffcv"], "--data-backend must be one of"),
    ("unknown-amp", lambda p: ["train", *ALONE, "--amp", "fp8"], "--amp must be one of"),
    ("unknown-flag", lambda p: ["train", *ALONE, "--epoch", "3", "--bogus"], "unrecognized arguments: --bogus"),
    ("misspelt-flag", lambda p: ["train", *ALONE, "--batchsize", "3"], "did you mean --batchsize -> --batch-size?"),
    ("auto-augment-bogus", lambda p: ["train", *ALONE, "--auto-augment", "rand-bogus"],
     "bad auto-augment 'rand-bogus'"),
    ("resume-auto-without-out", lambda p: ["train", *ALONE, "--resume", "auto"], "--resume auto continues"),
    ("resume-a-teacher-run-with-train", lambda p: ["train", *ALONE, "--resume", _teacher_run(p)],
     "that run is a `patfast teacher` run (continue it with `patfast teacher --resume"),
    ("data-bare-directory", lambda p: ["train", *ALONE, "--data", str(p.tmp)], "is a bare directory, not a spec"),
    ("no-command", lambda p: [], "choose a command"),
    ("unknown-command", lambda p: ["fit"], "invalid choice: 'fit'"),
    # ---- the output directory
    ("out-is-a-file", lambda p: ["train", *ALONE, "--out", str(p.run / "notes.txt")],
     "cannot write to output directory"),
    ("out-below-a-file", lambda p: ["train", *ALONE, "--out", str(p.run / "notes.txt" / "run")],
     "cannot write to output directory"),
    ("out-unwritable", lambda p: ["train", *ALONE, "--out", _unwritable_out(p)], "cannot write to output directory"),
    ("out-holds-summary", lambda p: ["train", *ALONE, "--out", _out_with(p, "summary.csv")], "already holds a run"),
    ("out-holds-last-pth", lambda p: ["teacher", *TINY, "--out", _out_with(p, "last.pth")], "already holds a run"),
    # ---- eval
    ("eval-no-checkpoint", lambda p: ["eval", "--no-progress"], "--checkpoint is required"),
    ("eval-checkpoint-missing", lambda p: ["eval", "--checkpoint", p.path("gone.safetensors")],
     "checkpoint not found"),
    ("eval-checkpoint-other-model",
     lambda p: ["eval", *TINY[2:], "--model", "convnext_atto", "--checkpoint", p.checkpoint("resnet10t")],
     "saved for resnet10t"),
    ("eval-pth-empty", lambda p: ["eval", "--checkpoint", p.write("w.pth", b"")], "the file is empty or truncated"),
    ("eval-pth-not-a-run", lambda p: ["eval", "--checkpoint", _plain_pth(p)], "is not a patfast training state"),
    ("eval-checkpoint-is-dir", lambda p: ["eval", "--checkpoint", str(p.run)], "is a directory"),
    # ---- bench
    ("bench-data-batch-size-zero", lambda p: ["bench", "data", "--batch-size", "0", "--no-progress"],
     "--batch-size must be >= 1, got 0"),
    ("bench-train-bogus-path", lambda p: ["bench", "train", "--paths", "bogus"], "--paths takes a comma list"),
    ("bench-unknown-what", lambda p: ["bench", "everything"], "invalid choice: 'everything'"),
]


def _teacher_run(p) -> str:
    """A run directory as `patfast teacher` leaves it (its last.pth records the command)."""
    d = p.tmp / "teacher-run"
    d.mkdir()
    torch.save({"version": 1, "distiller": {}, "config": {"command": "teacher", "epochs": 1}}, d / "last.pth")
    return str(d)


def _snapshot(root) -> dict[str, bytes]:
    """Every readable file under root -> its bytes."""
    files = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            try:
                with open(path, "rb") as f:
                    files[path] = f.read()
            except OSError:
                pass
    return files


def _no_training(*args, **kwargs):
    raise AssertionError("a user mistake reached a training step: it should have been stopped before")


@pytest.fixture
def place(tmp_path, monkeypatch):
    monkeypatch.setenv("PATFAST_CACHE", str(tmp_path / "cache"))  # no teacher is ever trained into the real cache
    monkeypatch.setattr(TrainStep, "__call__", _no_training)  # a case that does not fail costs no training time
    monkeypatch.chdir(tmp_path)  # nothing is written into the repository (runs/...)
    p = Place(tmp_path)
    yield p
    for path in p.locked:
        os.chmod(path, 0o700)


# Cases found only once the run has started (the data or the weights are read, the models built): the run directory
# may then gain the new run's log.txt and args.yaml (never a changed file). Every other case leaves --out as it was.
STARTS_THE_RUN = {
    "data-cifar-not-there", "data-cifar-corrupt-pickle", "data-cifar-truncated-pickle", "data-imagefolder-no-classes",
    "data-imagefolder-no-images", "data-imagefolder-empty-val", "data-corrupt-jpeg", "data-truncated-jpeg",
    "data-batch-larger-than-train-set", "teacher-ckpt-garbage-pth", "teacher-ckpt-truncated-pth",
    "teacher-ckpt-garbage-safetensors", "teacher-ckpt-pickled-code", "teacher-ckpt-other-model",
    "teacher-ckpt-other-classes", "img-size-too-small-for-swin", "img-size-too-small-for-teacher", "mixup-odd-batch",
    "student-stages-unknown-module",
}


@pytest.mark.parametrize("case, build, needle", CASES, ids=[c[0] for c in CASES])
def test_user_mistake(case, build, needle, place, capsys):
    argv = build(place)
    if argv[:1] in (["train"], ["teacher"]) and "--out" not in argv and "--resume" not in argv:
        argv += ["--out", str(place.run)]
    before = _snapshot(place.tmp)
    listed = sorted(os.listdir(place.run))
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("patfast: error: "), err
    assert needle in lines[0], err
    for path in place.locked:
        os.chmod(path, 0o700)
    after = _snapshot(place.tmp)
    assert {p: after.get(p) for p in before} == before, "a file that was there before was changed or removed"
    if case not in STARTS_THE_RUN:
        assert sorted(os.listdir(place.run)) == listed, "the run directory gained files though no run started"
    elif (place.run / "log.txt").exists():  # the run had begun its log: the log says how it ended
        assert (place.run / "log.txt").read_text().strip().splitlines()[-1] == lines[0]


def test_the_table_is_large_enough():
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)
    assert STARTS_THE_RUN <= {c[0] for c in CASES}
