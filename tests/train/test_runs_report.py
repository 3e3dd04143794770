"""`patfast report`: fake run directories (args.yaml + summary.csv in the formats `patfast train` writes, with
numbers the test chooses), no training.

Two groups (distiller kd, pat) x 3 seeds, plus unfinished runs (too few summary rows; all rows but last.pth
without student.safetensors): the grouping, mean and sample std against statistics.mean / stdev over the numbers the
test wrote, the unfinished runs listed apart, the three files, the CLI, the user mistakes (exit 2, one line), and
benchmarks/digits_table.py calling it.
"""

import csv
import importlib.util
import os
import statistics
import subprocess
import sys

import pytest
import yaml

from patfast.cli import main
from patfast.train import runs_report as rr
from patfast.train.config import OPTIONS
from patfast.train.report import SummaryCsv

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EPOCHS = 4
TERMS = {"kd": ["loss_gt", "loss_kd"], "pat": ["loss_gt", "loss_kd", "loss_fd", "loss_reg"]}


def config(distiller: str, seed: int, out: str, **changes) -> dict:
    """A resolved config as args.yaml holds it: every train option, then the run's values."""
    cfg = {"command": "train", **{o.name: o.default for o in OPTIONS if "train" in o.commands}}
    cfg.update(data="digits", student="resnet18", teacher="convnext_atto", distiller=distiller, epochs=EPOCHS,
               img_size=32, batch_size=64, seed=seed, out=out, progress=False, opt="sgd", lr=0.05)
    cfg.update(changes)
    return cfg


def numbers(distiller: str, seed: int, epoch: int) -> dict:
    """The figures of one epoch: raw top-1 rising, EMA top-1 above it at epoch 3 of kd (so the best of
    max(raw, EMA) is not the best raw), seed-dependent spread."""
    base = 60.0 if distiller == "kd" else 65.0
    raw = base + 7.5 * epoch + [0.0, 1.25, -0.5][seed % 3] * epoch / 2
    if epoch == EPOCHS:
        raw -= 3.0  # the last epoch is not the best
    ema = raw - 4.0 + (9.0 + seed if (distiller == "kd" and epoch == 3) else 0.0)
    return {"eval_top1": raw, "ema_top1": ema, "img_per_s": 100.0 + 10 * seed + epoch, "epoch_s": 20.0 + seed + epoch}


def make_run(path, distiller: str, seed: int, rows: int = EPOCHS, weights: bool = True, ema: bool = True,
             **changes) -> str:
    """A run directory as `patfast train` leaves it (placeholder weight files: the report only looks whether they
    exist)."""
    path = str(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "args.yaml"), "w") as f:
        yaml.safe_dump(config(distiller, seed, path, **changes), f, sort_keys=False)
    terms = TERMS[distiller]
    columns = ["epoch", "lr", "train_loss", *terms, "eval_top1", "eval_top5", "ema_top1", "ema_top5", "img_per_s",
               "epoch_s"]
    summary = SummaryCsv(os.path.join(path, "summary.csv"), columns)
    for e in range(1, rows + 1):
        n = numbers(distiller, seed, e)
        summary.append({"epoch": e, "lr": 0.05 / e, "train_loss": 2.0 / e, **{t: 1.0 / e for t in terms},
                        "eval_top1": n["eval_top1"], "eval_top5": 99.0, "ema_top1": n["ema_top1"] if ema else None,
                        "ema_top5": 98.0 if ema else None, "img_per_s": n["img_per_s"], "epoch_s": n["epoch_s"]})
    open(os.path.join(path, "last.pth"), "wb").close()
    if weights and rows >= EPOCHS:
        open(os.path.join(path, "student.safetensors"), "wb").close()
    return path


def expected(distiller: str, seeds=(0, 1, 2)) -> dict:
    """The per-run figures recomputed from numbers(), then mean / sample std, independently of the module."""
    per = {"final_top1": [], "final_ema_top1": [], "best_raw_top1": [], "best_top1": [], "img_per_s": [],
           "total_s": []}
    for s in seeds:
        ep = [numbers(distiller, s, e) for e in range(1, EPOCHS + 1)]
        per["final_top1"].append(ep[-1]["eval_top1"])
        per["final_ema_top1"].append(ep[-1]["ema_top1"])
        per["best_raw_top1"].append(max(x["eval_top1"] for x in ep))
        per["best_top1"].append(max(max(x["eval_top1"], x["ema_top1"]) for x in ep))
        per["img_per_s"].append(statistics.median(x["img_per_s"] for x in ep))
        per["total_s"].append(sum(x["epoch_s"] for x in ep))
    return {k: (statistics.mean(v), statistics.stdev(v)) for k, v in per.items()}


@pytest.fixture
def runs(tmp_path):
    """root/kd-seed{0,1,2}, root/pat-seed{0,1,2} (out, workers and device differ per run: ignored), and two
    unfinished ones of the pat config: 2 of 4 epochs; 4 of 4 with last.pth but no student.safetensors."""
    root = tmp_path / "runs"
    for d in ("kd", "pat"):
        for s in range(3):
            make_run(root / f"{d}-seed{s}", d, s, workers=s, device=["auto", "cpu", "cuda:0"][s])
    make_run(root / "pat-seed7-killed", "pat", 7, rows=2)
    make_run(root / "pat-seed8-noweights", "pat", 8, weights=False)
    return root


def test_grouping_and_statistics(runs):
    report = rr.build_report([str(runs)])
    assert report.keys == ["distiller"]
    assert [g.config["distiller"] for g in report.groups] == ["kd", "pat"]
    assert [[r.seed for r in g.runs] for g in report.groups] == [[0, 1, 2], [0, 1, 2]]
    assert sorted(os.path.basename(r.path) for r in report.unfinished) == ["pat-seed7-killed", "pat-seed8-noweights"]
    assert "2 of 4 epochs" in report.unfinished[0].reason or "2 of 4 epochs" in report.unfinished[1].reason
    rows = rr.table_rows(report)
    for row, d in zip(rows, ("kd", "pat")):
        assert row["distiller"] == d and row["n"] == 3 and row["seeds"] == "0 1 2" and row["epochs"] == EPOCHS
        for name, (mean, std) in expected(d).items():
            assert row[f"{name}_mean"] == pytest.approx(mean, abs=1e-4), (d, name)
            assert row[f"{name}_std"] == pytest.approx(std, abs=1e-4), (d, name)
        assert "seed7" not in row["runs"] and "seed8" not in row["runs"]
    kd = expected("kd")
    assert kd["best_top1"][0] > kd["best_raw_top1"][0]  # the EMA's epoch 3 counts in the paper's metric
    text = rr.markdown(report)
    assert f"| kd | 3 | 0, 1, 2 | {kd['final_top1'][0]:.2f} ± {kd['final_top1'][1]:.2f} |" in text
    not_finished = text.split("## Not finished")[1]
    assert "pat-seed7-killed | 7 | 2 of 4 |" in not_finished and "no student.safetensors" in not_finished


def test_config_differences_split_groups(tmp_path):
    """A key that changes the result (lr) makes another group and names it; an args.yaml from before an option
    existed groups with runs that have its default; n = 1 shows – for the std."""
    a = make_run(tmp_path / "a", "kd", 0)
    b = make_run(tmp_path / "b", "kd", 1)
    with open(os.path.join(b, "args.yaml")) as f:
        cfg = yaml.safe_load(f)
    del cfg["pat_feedback"]  # an older run's args.yaml
    with open(os.path.join(b, "args.yaml"), "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    c = make_run(tmp_path / "c", "kd", 0, lr=0.1)
    report = rr.build_report([a, b, c, a])  # the same directory twice counts once
    assert report.keys == ["lr"]
    assert [[os.path.basename(r.path) for r in g.runs] for g in report.groups] == [["a", "b"], ["c"]]
    text = rr.markdown(report)
    final = numbers("kd", 0, EPOCHS)["eval_top1"]
    assert f"| 0.1 | 1 | 0 | {final:.2f} ± – |" in text
    assert rr.build_report([a, b], ignore=["lr"]).keys == []


def test_missing_ema_shows_a_dash(tmp_path):
    """EMA on but no ema_top1 figures: final EMA and best raw/EMA are –, nothing invented; EMA off: the paper's
    metric is the best raw top-1."""
    on = [make_run(tmp_path / f"on{s}", "kd", s, ema=False) for s in range(2)]
    off = [make_run(tmp_path / f"off{s}", "kd", s, ema=False, model_ema=False) for s in range(2)]
    report = rr.build_report(on + off)
    rows = {r["model_ema"]: r for r in rr.table_rows(report)}
    assert rows["True"]["final_ema_top1_mean"] is None and rows["True"]["best_top1_mean"] is None
    assert rows["True"]["final_top1_mean"] is not None
    assert rows["False"]["best_top1_mean"] == pytest.approx(expected("kd", (0, 1))["best_raw_top1"][0], abs=1e-4)
    line = next(x for x in rr.markdown(report).splitlines() if x.startswith("| True |"))
    assert line.split(" | ")[4] == "–" and line.split(" | ")[6] == "–"


def test_files_written_and_csv_parses_back(runs, tmp_path):
    report = rr.build_report([str(runs)])
    written = rr.write_all(report, str(tmp_path / "out"))
    for ext in ("md", "csv", "png"):
        assert os.path.getsize(written[ext]) > 0
    with open(written["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(written["md"]) as f:
        assert f.read() == written["text"]
    with open(written["csv"], newline="") as f:
        back = list(csv.DictReader(f))
    assert [r["distiller"] for r in back] == ["kd", "pat"]
    for r in back:
        assert int(r["n"]) == 3
        for name, (mean, std) in expected(r["distiller"]).items():
            assert float(r[f"{name}_mean"]) == pytest.approx(mean, rel=1e-5)
            assert float(r[f"{name}_std"]) == pytest.approx(std, rel=1e-5)


def test_cli_prints_the_table(runs, tmp_path):
    out = tmp_path / "rep"
    dirs = [str(runs / f"{d}-seed{s}") for d in ("kd", "pat") for s in range(3)] + [str(runs / "pat-seed7-killed")]
    p = subprocess.run([sys.executable, "-m", "patfast", "report", *dirs, "--out", str(out)], capture_output=True,
                       text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "| distiller | n | seeds | final top-1 |" in p.stdout and "| pat | 3 | 0, 1, 2 |" in p.stdout
    assert "pat-seed7-killed" in p.stdout.split("## Not finished")[1]
    assert sorted(os.listdir(out)) == ["report.csv", "report.md", "report.png"]


def test_default_out_is_report_in_the_current_directory(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["report", str(runs / "kd-seed0")]) == 0
    assert sorted(os.listdir(tmp_path / "report")) == ["report.csv", "report.md", "report.png"]
    assert "| all runs | 1 | 0 |" in capsys.readouterr().out


def _bad_summary(tmp_path):
    run = make_run(tmp_path / "bad", "kd", 0)
    with open(os.path.join(run, "summary.csv"), "a") as f:
        f.write("5,0.1,oops,1,1,x,1,1,1,1,1\n")
    return [run]


MISTAKES = {
    "no runs": (lambda t: [], "give one or more run directories"),
    "no such dir": (lambda t: [str(t / "nowhere")], "no such directory"),
    "not a run": (lambda t: [str(t / "empty")], "is not a patfast run"),
    "a file": (lambda t: [str(t / "f.txt")], "is a file"),
    "bad args.yaml": (lambda t: [str(t / "r")], "not a patfast args.yaml"),
    "bad summary": (_bad_summary, "not a number"),
}


@pytest.mark.parametrize("case", MISTAKES)
def test_user_mistakes(case, tmp_path, capsys):
    (tmp_path / "f.txt").write_text("x")
    (tmp_path / "r").mkdir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "r" / "args.yaml").write_text("just a string\n")
    make, words = MISTAKES[case]
    assert main(["report", *make(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("patfast: error: report: ") and words in err, err
    assert not (tmp_path / "out").exists()


def test_user_mistake_through_the_cli(tmp_path):
    p = subprocess.run([sys.executable, "-m", "patfast", "report", str(tmp_path / "nowhere")], capture_output=True,
                       text=True, cwd=tmp_path, timeout=120)
    assert p.returncode == 2 and p.stderr == f"patfast: error: report: {tmp_path / 'nowhere'}: no such directory\n"


def test_digits_table_uses_the_report(tmp_path, capsys):
    """benchmarks/digits_table.py over finished runs (their student.safetensors exist: nothing is trained)."""
    for d in ("kd", "pat"):
        for s in (0, 1):
            make_run(tmp_path / f"{d}-seed{s}", d, s)
            # each seed's teacher, as a distilling run logs it (the same teacher for kd and pat of a seed)
            (tmp_path / f"{d}-seed{s}" / "log.txt").write_text(f"teacher test accuracy: top-1 {99 - s:.2f}%  top-5 "
                                                               "100.00%\n")
    spec = importlib.util.spec_from_file_location("digits_table", os.path.join(ROOT, "benchmarks", "digits_table.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main([str(tmp_path), "--seeds", "0", "1", "--distillers", "kd", "pat"])
    text = (tmp_path / "table.md").read_text()
    assert text == capsys.readouterr().out.removesuffix("\n")
    assert "Seeds: 0, 1" in text and "| kd | 2 | 0, 1 |" in text and "| pat | 2 | 0, 1 |" in text
    assert "Teacher test top-1: 98.50 ± 0.71 % (seeds 0, 1: 99.00 / 98.00)" in text
    assert os.path.isfile(tmp_path / "table.csv") and os.path.isfile(tmp_path / "table.png")
