"""`patfast train | teacher | eval | bench | recipes | report | info`.

Every mistake a user can make ends with one line `patfast: error: ...` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

from patfast.errors import TrainingStopped, UserError

COMMANDS = {
    "train": "distil a student from a teacher (PAT, KD) or train it alone; no arguments: the bundled digits demo",
    "teacher": "train or fine-tune a teacher on the same data",
    "eval": "evaluate a checkpoint (student.safetensors, teacher.safetensors or last.pth) on the test (val) split",
    "bench": "benchmarks: kernels against their references (bench kernels), data loaders (bench data), the training "
             "step's paths (bench train)",
    "recipes": "list the packaged recipes (the paper's protocols) that --config NAME takes",
    "report": "tables and curves over seeds from run directories (mean ± std per config)",
    "info": "versions, device and the available backends",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit status 2, no usage block
        if message.startswith("unrecognized arguments:"):
            message += _did_you_mean(self, message.split(":", 1)[1].split())
        raise UserError(f"{self.prog.removeprefix('patfast ')}: {message}" if " " in self.prog else message)


def _did_you_mean(parser: argparse.ArgumentParser, unknown: list[str]) -> str:
    """' (did you mean --batchsize -> --batch-size?)' for misspelt flags, from every command's flags."""
    import difflib

    known = set(parser._option_string_actions)
    for sub in getattr(parser, "commands", {}).values():
        known |= set(sub._option_string_actions)
    hints = []
    for arg in (a.split("=", 1)[0] for a in unknown if a.startswith("--")):
        close = difflib.get_close_matches(arg, sorted(known), n=1, cutoff=0.7)
        if close:
            hints.append(f"{arg} -> {close[0]}")
    return f" (did you mean {', '.join(hints)}?)" if hints else ""


def _distiller_in(argv: list[str]) -> str | None:
    """The value of --distiller on a command line (for --help to show that distiller's flags), else None."""
    for i, arg in enumerate(argv):
        if arg == "--distiller" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--distiller="):
            return arg.split("=", 1)[1]
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    from patfast import __version__
    from patfast.train.config import add_options

    parser = _Parser(prog="patfast", description="Fast heterogeneous knowledge distillation with PAT.")
    parser.add_argument("--version", action="version", version=f"patfast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    parser.commands = {}  # name -> its parser (a --config file sets the defaults of one)
    for name, help_text in COMMANDS.items():
        usage = f"patfast {name} [options]" if name in ("train", "teacher", "eval") else None
        p = parser.commands[name] = sub.add_parser(name, help=help_text, description=help_text, usage=usage)
        if name == "bench":
            from patfast.bench import add_options as add_bench_options

            add_bench_options(p)
        elif name == "report":
            from patfast.train.runs_report import add_options as add_report_options

            add_report_options(p)
        elif name not in ("info", "recipes"):
            add_options(p, name, distiller=_distiller_in(argv or []) if name == "train" else None)
    return parser


def _token_student(name: str) -> bool:
    """Whether a timm model works on tokens (ViT/MLP family): its recipe is then the ViT one."""
    from patfast.models.create import create_model
    from patfast.models.stages import works_on_tokens

    try:
        return works_on_tokens(create_model(name, 10, 224))
    except UserError:
        return False  # an unknown name is reported later, with the rest of the setup


def check_inputs(cfg: dict, command: str) -> None:
    """The cheap checks of what a run reads (data spec, model names, weights files), before its output directory
    is created or written: a mistake there leaves --out as it was. Contents (corrupt data or weights, an image size
    too small for a model) are found when the run loads them."""
    from patfast.data import parse_data_spec
    from patfast.models.create import check_model_name
    from patfast.models.weights import check_file

    parse_data_spec(cfg["data"])
    if command == "teacher":
        check_model_name(cfg["teacher"])
        if cfg.get("init_checkpoint"):
            check_file(cfg["init_checkpoint"])
        return
    check_model_name(cfg["student"])
    if cfg.get("distiller", "pat") != "none":
        check_model_name(cfg["teacher"])
        if cfg.get("teacher_checkpoint"):
            check_file(cfg["teacher_checkpoint"])


def cmd_train(args, command: str) -> int:
    from patfast.train.config import resolve
    from patfast.train.loop import run, saved_config

    saved = saved_config({"resume": args.resume, "out": args.out}, command)  # --resume: that run's config
    if command == "train" and saved is None and args.teacher is None and args.teacher_checkpoint:
        from patfast.models.weights import checkpoint_meta

        args.teacher = checkpoint_meta(args.teacher_checkpoint).get("model")  # the model the file was saved for
    cfg = resolve(args, command, student_is_tokens=_token_student, saved=saved)
    check_inputs(cfg, command)
    run(cfg, command)
    return 0


def cmd_eval(args) -> int:
    from patfast.data import load_data, make_loader
    from patfast.data.datasets import eval_split_name
    from patfast.models.create import create_model
    from patfast.models.weights import (
        is_training_state,
        load_state,
        read_state_dict,
        torch_load,
        training_state_weights,
    )
    from patfast.train.config import resolve
    from patfast.train.evaluate import evaluate
    from patfast.train.loop import resolve_device
    from patfast.train.step import amp_dtype

    cfg = resolve(args, "eval")
    if not cfg.get("checkpoint"):
        raise UserError("eval: --checkpoint is required")
    path = cfg["checkpoint"]
    if path.endswith(".pth"):  # last.pth of a run: the model it trained
        state = torch_load(path)
        if not is_training_state(state):
            raise UserError(f"{path} is not a patfast training state (last.pth)")
        weights, meta = training_state_weights(state, path)
    else:
        weights, meta = read_state_dict(path)
    if args.data is None and meta.get("data"):  # the data it was trained on, unless told otherwise
        cfg["data"] = meta["data"]
    name = cfg.get("model") or meta.get("model")
    if not name:
        raise UserError(f"{path} does not say which model it holds: pass --model")
    img_size = cfg["img_size"]
    if args.img_size is None and meta.get("img_size"):
        try:
            img_size = int(meta["img_size"])
        except (TypeError, ValueError):
            raise UserError(f"{path} records image size {meta['img_size']!r}: pass --img-size") from None
    device = resolve_device(cfg["device"])
    dataset = load_data(cfg["data"])
    model = create_model(name, dataset.num_classes, img_size)
    load_state(model, weights, source=path, meta=meta)
    loader = make_loader(dataset, "test", batch_size=cfg["batch_size"], img_size=img_size, train=False,
                         seed=cfg["seed"], workers=cfg["workers"], crop_pct=cfg["crop_pct"], device=device,
                         backend=cfg["data_backend"], progress=cfg["progress"])
    model.to(device)
    top1, top5 = evaluate(model, loader, device, amp_dtype("auto", device), cfg["progress"])
    print(f"{name} on {cfg['data']} {eval_split_name(cfg['data'])} split ({len(loader.dataset)} images, {img_size}px): "
          f"top-1 {top1:.2f}%  top-5 {top5:.2f}%")
    return 0


def cmd_bench(args) -> int:
    from patfast.bench import run

    return run(args)


def cmd_recipes(args) -> int:
    from patfast.train.recipes import packaged_recipes

    recipes = packaged_recipes()
    width = max(map(len, recipes))
    for name, recipe in recipes.items():
        print(f"{name:<{width}}  {recipe.summary}")
    print(f"\nuse one with: patfast train --config NAME --data ... (the command line overrides it); "
          f"{len(recipes)} recipes")
    return 0


def cmd_info(args) -> int:
    import torch

    from patfast import ops
    from patfast.train.report import environment

    env = environment()
    for key in ("patfast", "python", "torch", "timm", "triton", "cuda"):
        print(f"{key:<18} {env[key]}")
    print(f"{'device':<18} {env.get('gpu', 'no CUDA GPU')} (CPU threads: {env['cpu_threads']})")
    triton_ops = ", ".join(ops.triton_ops()) or "no kernels yet"
    print(f"{'op backends':<18} reference (all ops); triton: {triton_ops}"
          + ("" if torch.cuda.is_available() else " (CPU: auto uses reference)"))
    dali = importlib.util.find_spec("nvidia.dali") is not None if importlib.util.find_spec("nvidia") else False
    print(f"{'data backends':<18} torch, gpu; dali: {'installed' if dali else 'not installed'}"
          + ("" if torch.cuda.is_available() else " (CPU: auto uses torch)"))
    print(f"{'bundled data':<18} digits (scikit-learn, 1,797 images, 10 classes)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        from patfast.train.config import parse_args

        parser = build_parser(argv)
        args = parse_args(parser, argv, parser.commands)
        if args.command is None:
            parser.print_help()
            raise UserError(f"choose a command: {', '.join(COMMANDS)}")
        if args.command in ("train", "teacher"):
            return cmd_train(args, args.command)
        if args.command == "eval":
            return cmd_eval(args)
        if args.command == "bench":
            return cmd_bench(args)
        if args.command == "recipes":
            return cmd_recipes(args)
        if args.command == "report":
            from patfast.train.runs_report import run as cmd_report

            return cmd_report(args)
        return cmd_info(args)
    except UserError as e:
        _say(f"patfast: error: {e}")
        return 2
    except TrainingStopped as e:
        _say(f"patfast: {e}")
        return e.status
    except KeyboardInterrupt:
        _say("patfast: interrupted")
        return 130


def _say(line: str) -> None:
    """The one line of a failed or stopped run, on stderr; under torchrun from rank 0 alone (every process hits the
    same mistake or the same stop). The others stay quiet a moment longer: torchrun stops every process once one
    has exited, and rank 0 must have printed by then."""
    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr)
    else:
        time.sleep(2)


if __name__ == "__main__":
    sys.exit(main())
