"""What a run prints and draws: the epoch table's small terms, the final table's alignment and outputs line, the
curves' labels (issue 16 item 9)."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from patfast.train import report  # noqa: E402
from patfast.train.loop import final_table  # noqa: E402


class Lines:
    def __init__(self):
        self.lines = []

    def __call__(self, line=""):
        self.lines.append(line)


def row(epoch, **extra):
    return {"epoch": epoch, "lr": 1e-3, "train_loss": 1.0, "loss_gt": 1.0, "loss_reg": 1.2e-5, "eval_top1": 50.0,
            "eval_top5": 90.0, "ema_top1": 40.0, "ema_top5": 80.0, "img_per_s": 100.0, "epoch_s": 2.0, **extra}


def test_a_small_loss_term_is_not_printed_as_zero():
    log = Lines()
    report.EpochTable(log, ["loss_gt", "loss_reg"]).row(row(1))
    assert "1.20e-05" in log.lines[-1] and "0.0000" not in log.lines[-1]


def test_the_final_table_stays_aligned_with_long_names_and_lists_every_output(tmp_path):
    (tmp_path / "best.pth").write_bytes(b"")
    log = Lines()
    result = {"out": str(tmp_path), "role": "student", "model": "deit_tiny_distilled_patch16_224.fb_in22k_ft_in1k",
              "distiller": "pat (official variant)", "last": row(2), "best": {"top1": 50.0, "epoch": 2, "which": "raw"},
              "teacher_top1": 99.0, "teacher_top5": 100.0}
    final_table(log, {"data": "imagefolder:/x", "teacher": "convnext_atto"}, result, 10)
    assert log.lines[1].startswith("== result on the imagefolder:/x val split")
    header, *figures = log.lines[2:7]
    end = header.index("top-1") + 5  # every row's top-1 ends under the header's
    assert [line[end - 5:end] for line in figures] == ["99.00", "50.00", "40.00", "50.00"], log.lines
    outputs = log.lines[-1]
    for name in ("student.safetensors", "student_ema.safetensors", "last.pth", "best.pth", "summary.csv"):
        assert name in outputs, outputs


def test_a_teacher_runs_curves_say_teacher_and_a_students_show_the_teacher(tmp_path, monkeypatch):
    seen = {}
    real = plt.Figure.savefig

    def keep(fig, *a, **k):
        ax = fig.axes[1]
        seen["labels"] = [t.get_text() for t in ax.get_legend().get_texts()]
        seen["ticks"] = [t for t in ax.get_xticks() if 1 <= t <= 3]
        return real(fig, *a, **k)

    monkeypatch.setattr(plt.Figure, "savefig", keep)
    rows = [row(e) for e in (1, 2, 3)]
    report.plot_curves(rows, ["loss_gt"], str(tmp_path / "t.png"), "t", role="teacher")
    assert "teacher top-1" in seen["labels"] and not any("student" in s for s in seen["labels"])
    assert all(float(t).is_integer() for t in seen["ticks"])  # whole epochs only
    report.plot_curves(rows, ["loss_gt"], str(tmp_path / "s.png"), "s", teacher_top1=99.0)
    assert "teacher top-1 (99.00)" in seen["labels"] and "student top-1" in seen["labels"]
