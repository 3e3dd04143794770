"""Run configuration: built-in defaults < recipe < data-set defaults < YAML file (`--config`) < command line.

Flags are kebab-case (`--batch-size`), config keys snake_case (`batch_size`); the resolved configuration is written
to args.yaml. Every mistake in it is a UserError.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

import yaml

from patfast.distill import DISTILLERS
from patfast.errors import UserError
from patfast.train.recipes import config_path


@dataclass(frozen=True)
class Option:
    name: str  # snake_case key
    type: type | None  # float, int, str, bool; None = comma list of str; "ints" = comma list of int
    default: object
    help: str
    commands: tuple[str, ...] = ("train", "teacher")
    choices: tuple = ()
    list_of: type | None = None
    extra: dict = field(default_factory=dict)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's

RECIPES = {
    # SPEC section 7: CNN students / ViT-MLP students. Keys absent here keep their built-in defaults.
    "cnn": {"opt": "sgd", "lr": 0.05, "weight_decay": 2e-3, "min_lr": 1e-3, "warmup_epochs": 3, "clip_grad": 0.0},
    "vit": {"opt": "adamw", "lr": 5e-4, "weight_decay": 0.05, "min_lr": 1e-5, "warmup_epochs": 20, "clip_grad": 5.0,
            "auto_augment": "rand-m9-mstd0.5-inc1", "reprob": 0.25, "mixup": 0.8, "cutmix": 1.0},
}

# The bundled default: the setting distillation is for, at a size that trains in minutes on 2 CPU cores. A CNN
# teacher (CNNs learn well from 1.4k small images) and a data-hungry ViT student on a short schedule (a DeiT with
# 2x2 tokens at 32px learns slowly from labels alone), as in the paper's ConvNeXt-T -> DeiT-T row.
DATA_DEFAULTS = {
    "digits": {"teacher": "resnet10t", "student": "deit_tiny_patch16_224", "img_size": 32, "batch_size": 64,
               "epochs": 10, "teacher_epochs": 10, "warmup_epochs": 1, "crop_scale": [0.5, 1.0], "hflip": 0.0,
               "model_ema_decay": 0.99, "auto_augment": "", "reprob": 0.0, "mixup": 0.0, "cutmix": 0.0},
}

EMA_DECAY = 0.9998  # timm's and the paper's, for runs of 50k steps or more
SHORT_RUN_WARMUP = 0.2  # a recipe's warm-up is at most this fraction of the run


def ema_decay(cfg: dict, total_steps: int) -> float:
    """--model-ema-decay, or auto: EMA_DECAY, lowered for a short run so that its EMA spans a tenth of it."""
    if cfg.get("model_ema_decay") is not None:
        return cfg["model_ema_decay"]
    return min(EMA_DECAY, 1 - 10 / max(total_steps, 20))


def warmup_note(cfg: dict) -> str:
    """' (...)' when the recipe's or data set's warm-up was shortened to fit the run, else ''."""
    kind = data_kind(cfg.get("data", ""))
    source = DATA_DEFAULTS.get(kind, {}).get("warmup_epochs", RECIPES.get(cfg.get("recipe"), {}).get("warmup_epochs"))
    if source is None or cfg["warmup_epochs"] >= source or cfg["warmup_epochs"] != round(SHORT_RUN_WARMUP *
                                                                                          cfg["epochs"], 4):
        return ""
    whose = f"{kind} defaults'" if "warmup_epochs" in DATA_DEFAULTS.get(kind, {}) else f"{cfg['recipe']} recipe's"
    return (f" (the {whose} {source:g} warm-up epoch(s), shortened to a fifth of this {cfg['epochs']}-epoch run; "
            "--warmup-epochs sets it)")


OPTIONS = [
    Option("config", str, None, "YAML file of defaults (snake_case keys), or a packaged recipe's name (`patfast "
           "recipes`); the command line overrides it"),
    Option("data", str, "digits", "digits (bundled) | cifar10:DIR | cifar100:DIR | imagefolder:DIR",
           ("train", "teacher", "eval")),
    Option("teacher", str, "swin_tiny_patch4_window7_224", "teacher timm model name"),
    Option("student", str, "resnet18", "student timm model name", ("train",)),
    Option("model", str, None, "model to evaluate (default: from the checkpoint's metadata)", ("eval",)),
    Option("teacher_checkpoint", str, None, "teacher weights (.safetensors or a torch file); on the bundled data a "
           "teacher is trained and cached when omitted", ("train",)),
    Option("init_checkpoint", str, None, "start from these weights (fine-tune)", ("teacher",)),
    Option("checkpoint", str, None, "weights to evaluate (.safetensors or last.pth)", ("eval",)),
    Option("teacher_ema", bool, False, "take the teacher checkpoint's EMA weights (state_dict_ema of a timm "
           "CheckpointSaver file, e.g. OFA-KD's teachers)", ("train",)),
    Option("teacher_pretrained", bool, False, "start the teacher from timm's pretrained weights (hub download; with "
           "--teacher-checkpoint FILE: that file, offline, through timm's own checkpoint filter)", ("train",)),
    Option("teacher_mean", float, None, "mean the teacher was trained with (3 values; default: its checkpoint's or "
           "the data's)", ("train",), list_of=float),
    Option("teacher_std", float, None, "std the teacher was trained with (3 values)", ("train",), list_of=float),
    Option("distiller", str, "pat", " | ".join(DISTILLERS) + " (README: Distillers; `patfast train --distiller X "
           "--help` shows X's own flags)", ("train",), choices=DISTILLERS),
    Option("pat_variant", str, "paper", "paper | official (SPEC section 6)", ("train",), choices=("paper", "official")),
    Option("pat_afp_stage", int, [1, 2, 3, 4], "teacher stages that get a feedback prompt ('none': no AFP)",
           ("train",), list_of=int),
    Option("pat_feedback", bool, True, "feed the previous step's (aligned student - prompted teacher) to the prompts "
           "(--no-pat-feedback: the ablation 'AFP without feedback')", ("train",)),
    Option("pat_aligner_order", str, "auto", "aligners: upsample-last (BatchNorm + conv on the grid, then the resize: "
           "the same function, cheaper) | plain (resize first, the authors' order) | auto (upsample-last; plain "
           "under --sync-bn with several processes)", ("train",), choices=("auto", "upsample-last", "plain")),
    Option("pat_dim", int, 512, "RAA width", ("train",)),
    Option("pat_heads", int, 8, "RAA heads", ("train",)),
    Option("student_stages", str, None, "4 student module names whose outputs are the stage features",
           ("train",), list_of=str),
    Option("teacher_stages", str, None, "4 teacher module names whose outputs are the stage features",
           ("train",), list_of=str),
    Option("teacher_prompt_points", str, None, "4 teacher module names whose inputs get the prompts",
           ("train",), list_of=str),
    Option("gt_weight", float, 1.0, "weight of the ground-truth CE (w_gt)", ("train",)),
    Option("kd_weight", float, 1.0, "weight of the logit term loss_kd (PAT's alpha; kd, dkd, dist and ofa's "
           "logit loss)", ("train",)),
    Option("fd_weight", float, 1.0, "weight of the feature (HCL) term (beta)", ("train",)),
    Option("reg_weight", float, 1.0, "weight of the prompt regularisation KL (gamma)", ("train",)),
    Option("kd_temperature", float, 1.0, "KD temperature (kd and pat)", ("train",)),
    Option("ofa_stages", int, [1, 2, 3, 4], "student stages that get an exit branch", ("train",), list_of=int),
    Option("ofa_eps", float, [1.0], "target-enhancement exponents: one per stage and one for the logits, or one "
           "for all", ("train",), list_of=float),
    Option("ofa_weight", float, None, "weight of the branch losses (default: 0.1 for CNN students on CIFAR, 1.0 "
           "otherwise, as OFA-KD's recipes)", ("train",)),
    Option("ofa_temperature", float, 1.0, "OFA temperature", ("train",)),
    Option("dkd_alpha", float, 1.0, "weight of the target-class term (TCKD)", ("train",)),
    Option("dkd_beta", float, 8.0, "weight of the non-target term (NCKD)", ("train",)),
    Option("dkd_temperature", float, 4.0, "DKD temperature", ("train",)),
    Option("dkd_warmup_epochs", float, 20.0, "epochs over which the DKD term's weight grows linearly to 1 "
           "(mdistiller's 20 on CIFAR; at most a fifth of the run unless given)", ("train",)),
    Option("dist_beta", float, 1.0, "weight of the inter-class term (correlation per sample)", ("train",)),
    Option("dist_gamma", float, 1.0, "weight of the intra-class term (correlation per class over the batch)",
           ("train",)),
    Option("dist_temperature", float, 1.0, "DIST temperature", ("train",)),
    Option("fitnet_weight", float, 1.0, "weight of the hint (feature MSE) term", ("train",)),
    Option("fitnet_stages", int, [1, 2, 3, 4], "stages whose features are matched", ("train",), list_of=int),
    Option("backend", str, "auto", "op backend: auto | reference | triton", ("train",),
           choices=("auto", "reference", "triton")),
    Option("recipe", str, "auto", "hyper-parameter recipe: auto (by student type) | cnn | vit",
           choices=("auto", "cnn", "vit")),
    Option("epochs", int, 300, "training epochs"),
    Option("teacher_epochs", int, 30, "epochs when `train` has to train the bundled-data teacher first", ("train",)),
    Option("batch_size", int, 128, "batch size (per process and step)", ("train", "teacher", "eval")),
    Option("grad_accum", int, 1, "accumulate the gradients of N steps before each update (total batch: processes x "
           "batch size x N)"),
    Option("sync_bn", bool, False, "under torchrun: BatchNorm statistics over all processes (SyncBatchNorm)"),
    Option("img_size", int, 224, "input size", ("train", "teacher", "eval")),
    Option("opt", str, None, "sgd | adamw (default: from the recipe)", choices=("sgd", "adamw")),
    Option("lr", float, None, "peak learning rate"),
    Option("min_lr", float, None, "final learning rate of the cosine schedule"),
    Option("warmup_epochs", float, None, "linear warm-up epochs (the recipe's, at most a fifth of the run)"),
    Option("weight_decay", float, None, "weight decay (not on 1-D parameters)"),
    Option("momentum", float, 0.9, "SGD momentum"),
    Option("clip_grad", float, None, "clip the gradient norm at this value (0: off)"),
    Option("smoothing", float, 0.1, "label smoothing"),
    Option("crop_scale", float, [0.08, 1.0], "random-resized-crop scale range (2 values)", list_of=float),
    Option("hflip", float, 0.5, "horizontal flip probability"),
    Option("auto_augment", str, "", "RandAugment policy, e.g. rand-m9-mstd0.5-inc1 ('' off)"),
    Option("reprob", float, 0.0, "random erasing probability"),
    Option("mixup", float, 0.0, "mixup alpha (0 off)"),
    Option("cutmix", float, 0.0, "cutmix alpha (0 off)"),
    Option("crop_pct", float, 0.875, "eval: resize to img_size/crop_pct, then centre crop",
           ("train", "teacher", "eval")),
    Option("model_ema", bool, True, "keep and evaluate an EMA of the student"),
    Option("model_ema_decay", float, None, f"EMA decay per step (auto: {EMA_DECAY}, or 1 - 10 / the run's steps when "
           "that is smaller: a short run's EMA then averages over its last tenth)"),
    Option("compile", bool, None, "torch.compile the training step (auto: on CUDA, off on the CPU; the first "
           "steps compile)"),
    Option("compile_mode", str, "default", "torch.compile mode; reduce-overhead adds CUDA graphs",
           choices=COMPILE_MODES),
    Option("channels_last", bool, None, "channels_last memory format for conv models (auto: on CUDA, off on the CPU)"),
    Option("amp", str, "auto", "auto (bf16 on CUDA, none on CPU) | none | bf16 | fp16 (with a grad scaler)",
           choices=("auto", "none", "bf16", "fp16")),
    Option("data_backend", str, "auto", "data loader: auto (dali if installed on CUDA, else gpu on CUDA for in-memory "
           "data, else torch) | torch | gpu | dali", ("train", "teacher", "eval"),
           choices=("auto", "torch", "gpu", "dali")),
    Option("workers", int, 0, "data loader worker processes (torch) or threads (dali)", ("train", "teacher", "eval")),
    Option("resume", str, None, "continue the run in DIR with its own config, the command line overriding only "
           "what it gives (--epochs N extends a finished run); 'auto': continue --out if it holds a run, else start "
           "it", ("train", "teacher"), extra={"metavar": "DIR"}),
    Option("checkpoint_every", int, 0, "also write last.pth every N steps (0: only at the end of each epoch)",
           ("train", "teacher")),
    Option("allow_config_change", bool, False, "resume even though the config differs from the checkpoint's",
           ("train", "teacher")),
    Option("nonfinite_patience", int, 10, "stop (exit status 3) after this many consecutive steps with a NaN/Inf "
           "loss (each is skipped)", ("train", "teacher")),
    Option("seed", int, 0, "random seed", ("train", "teacher", "eval")),
    Option("deterministic", bool, False, "deterministic algorithms (slower)"),
    Option("out", str, None, "output directory (default: runs/<command>-<time>)", ("train", "teacher")),
    Option("device", str, "auto", "auto | cpu | cuda | cuda:N", ("train", "teacher", "eval")),
    Option("progress", bool, True, "show progress bars", ("train", "teacher", "eval")),
]
BY_NAME = {o.name: o for o in OPTIONS}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# --help shows the flags in these groups, in this order (an option not listed goes under "other")
GROUPS = {
    "data": ("config", "data", "img_size", "batch_size", "crop_scale", "hflip", "auto_augment", "reprob", "mixup",
             "cutmix", "crop_pct", "data_backend", "workers"),
    "models": ("teacher", "student", "model", "checkpoint", "teacher_checkpoint", "init_checkpoint", "teacher_ema",
               "teacher_pretrained", "teacher_mean", "teacher_std", "teacher_epochs"),
    "distiller": ("distiller", "student_stages", "teacher_stages", "gt_weight", "kd_weight", "kd_temperature",
                  "backend"),
    "pat (--distiller pat)": ("pat_variant", "pat_afp_stage", "pat_feedback", "pat_aligner_order", "pat_dim",
                              "pat_heads", "teacher_prompt_points", "fd_weight", "reg_weight"),
    "ofa (--distiller ofa: OFA-KD)": ("ofa_stages", "ofa_eps", "ofa_weight", "ofa_temperature"),
    "dkd (--distiller dkd: decoupled KD)": ("dkd_alpha", "dkd_beta", "dkd_temperature", "dkd_warmup_epochs"),
    "dist (--distiller dist: DIST)": ("dist_beta", "dist_gamma", "dist_temperature"),
    "fitnet (--distiller fitnet: FitNet hints)": ("fitnet_weight", "fitnet_stages"),
    "optimisation": ("recipe", "epochs", "opt", "lr", "min_lr", "warmup_epochs", "weight_decay", "momentum",
                     "clip_grad", "smoothing", "grad_accum", "model_ema", "model_ema_decay", "seed", "deterministic",
                     "nonfinite_patience"),
    "speed": ("compile", "compile_mode", "channels_last", "amp", "device"),
    "output and resuming": ("out", "resume", "checkpoint_every", "allow_config_change", "progress"),
    "distributed (torchrun)": ("sync_bn",),
}
GROUP_OF = {name: group for group, names in GROUPS.items() for name in names}
DISTILLER_OF_GROUP = {g: g.split(" ", 1)[0] for g in GROUPS if g.split(" ", 1)[0] in DISTILLERS}


def _default_text(o: Option, command: str) -> str:
    """The defaults that apply, as --help shows them: the bundled data's (the no-argument demo), the recipes',
    the built-in one; '' where the help text says it already."""
    if command == "eval" and o.name in ("img_size", "data"):
        return f"(default: the checkpoint's, else {o.default})"
    if command == "eval" and o.name == "checkpoint":
        return "(required)"
    def show(v):
        if isinstance(v, bool):
            return "on" if v else "off"
        return _show(v) if v not in ("", None) else "off" if v == "" else "auto"

    digits = DATA_DEFAULTS["digits"]
    on_digits = digits.get("teacher_epochs" if command == "teacher" and o.name == "epochs" else o.name)
    if command not in ("train", "teacher"):
        on_digits = None
    if "default:" in o.help or "(auto" in o.help:  # the help says the default; the demo's own, if it has one
        return f"(on the bundled digits: {show(on_digits)})" if on_digits is not None else ""
    parts, role = [], "student" if command == "train" else "model"
    if o.name in RECIPES["cnn"] or o.name in RECIPES["vit"]:
        by_recipe = {r: RECIPES[r].get(o.name, o.default) for r in ("cnn", "vit")}
        parts.append(f"CNN {role}s {show(by_recipe['cnn'])}, ViT/MLP {role}s {show(by_recipe['vit'])}")
    elif o.default is not None or o.type is bool:
        parts.append(show(o.default))
    if on_digits is not None:
        others = f"; other data: {parts[0]}" if parts and o.name != "teacher_epochs" else ""
        return f"(default on the bundled digits: {show(on_digits)}{others})"
    return f"(default: {parts[0]})" if parts else ""


def add_options(parser: argparse.ArgumentParser, command: str, distiller: str | None = None) -> None:
    """Add the command's flags in their groups, each typed by its option's converter; every default is None so that
    we can tell what the user set (a --config file's values become defaults: `parse_args`). `distiller`: --help
    then shows only that distiller's own group among the distillers' groups (the others still parse)."""
    mine = [o for o in OPTIONS if command in o.commands]
    if distiller in DISTILLERS:
        mine = [o for o in mine if DISTILLER_OF_GROUP.get(GROUP_OF.get(o.name), distiller) == distiller]
        hidden = [o for o in OPTIONS if command in o.commands and o not in mine]
    else:
        hidden = []
    present = {GROUP_OF.get(o.name, "other") for o in mine}
    groups = {g: parser.add_argument_group(g) for g in [*GROUPS, "other"] if g in present}
    for o in mine:
        group = groups[GROUP_OF.get(o.name, "other")]
        text = " ".join(t for t in (o.help, _default_text(o, command)) if t)
        if o.type is bool:
            group.add_argument(flag(o.name), dest=o.name, action=argparse.BooleanOptionalAction, default=None,
                               help=text)
        else:
            group.add_argument(flag(o.name), dest=o.name, default=None,
                               metavar=o.extra.get("metavar", o.name.split("_")[-1].upper()),
                               type=_command_line_type(o), help=text)
    for o in hidden:  # the other distillers' flags: accepted, not shown
        if o.type is bool:
            parser.add_argument(flag(o.name), dest=o.name, action=argparse.BooleanOptionalAction, default=None,
                                help=argparse.SUPPRESS)
        else:
            parser.add_argument(flag(o.name), dest=o.name, default=None, type=_command_line_type(o),
                                help=argparse.SUPPRESS)


def parse_args(parser: argparse.ArgumentParser, argv: list[str], command_parsers: dict | None = None,
               command: str | None = None) -> argparse.Namespace:
    """timm's `_parse_args` pattern: a first parse finds --config; the file's values become the defaults of the
    command's parser (`command_parsers[args.command]`, or `parser` itself for `command`); a second parse lets the
    command line override them."""
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        command = command or args.command
        target = command_parsers[command] if command_parsers else parser
        target.set_defaults(**read_yaml(config_path(args.config), command))
        args = parser.parse_args(argv)
    return args


def _show(v) -> str:
    return ",".join(map(str, v)) if isinstance(v, list) else str(v)


def _command_line_type(o: Option):
    """argparse's `type` for the option. It raises UserError, which argparse lets through: our message, as is."""
    def convert(text: str):
        return _convert(o, text, "command line")

    return convert


def _convert(o: Option, value, source: str):
    """A value from the command line (str) or YAML (any) -> the option's type, one of its choices; UserError when
    it does not fit."""
    what = f"{flag(o.name)}" if source == "command line" else f"'{o.name}' in {source}"
    value = _typed(o, value, what)
    if o.choices and value is not None and value not in o.choices:
        raise UserError(f"{what} must be one of {', '.join(o.choices)}, got '{value}'")
    return value


def _typed(o: Option, value, what: str):
    try:
        if o.list_of is not None:
            if o.name == "pat_afp_stage" and (value == [] or (isinstance(value, str) and value.strip().lower()
                                                                in ("none", "[]"))):
                return []
            items = value if isinstance(value, (list, tuple)) else [s for s in str(value).split(",") if s.strip()]
            return [o.list_of(str(s).strip()) if o.list_of is not str else str(s).strip() for s in items]
        if value is None:
            return None
        if o.type is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if o.type is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return o.type(value) if o.type is not str else str(value)
    except (TypeError, ValueError):
        kind = f"a comma list of {o.list_of.__name__}" if o.list_of else o.type.__name__
        raise UserError(f"{what} must be {kind}, got {value!r}") from None


# A run's args.yaml records these about the run itself: read back as a --config file, they are not defaults for a
# new run (its command is the one typed; its output directory is a new one).
RUN_RECORD_KEYS = ("command", "config", "out", "resume")


def read_yaml(path: str, command: str) -> dict:
    """The option values of a config file for `command` (a recipe, a file of one's own, or a run's args.yaml: keys
    of the other commands are skipped; `null` means the default of an option whose default is None, as args.yaml
    writes it, and is an error elsewhere)."""
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path} (nor a packaged recipe: `patfast recipes` lists them)")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise UserError(f"cannot read config file {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = " ".join(str(x) for x in (getattr(e, "problem", None), getattr(e, "context", None)) if x)
        raise UserError(f"cannot read config file {path}: {where}{what or str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of option: value, not {type(data).__name__}")
    out, run_record = {}, "command" in data  # patfast wrote it (args.yaml)
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if run_record and name in RUN_RECORD_KEYS:
            continue
        if name not in BY_NAME or name == "config":
            import difflib

            close = difflib.get_close_matches(name, [n for n in BY_NAME if n != "config"], n=1, cutoff=0.7)
            raise UserError(f"unknown key '{key}' in config file {path}"
                            + (f" (did you mean '{close[0]}'?)" if close else ""))
        if command not in BY_NAME[name].commands:
            continue  # a config shared between commands may hold keys of the other one
        if value is None and BY_NAME[name].default is None:
            continue  # null for an option whose default is None (auto, none given): that default
        out[name] = _convert(BY_NAME[name], value, path)
    return out


def data_kind(data: str) -> str:
    return str(data).split(":", 1)[0]


def resolve(args: argparse.Namespace, command: str, *, student_is_tokens=None, saved: dict | None = None) -> dict:
    """The resolved configuration of a run as a plain dict (what args.yaml holds), from `args` as `parse_args` gives
    them (typed, a --config file applied: the values not None are the user's).

    student_is_tokens: callable(model_name) -> bool, used by recipe "auto" (token students get the ViT recipe).
    saved: the resolved config of the run --resume continues: the command line overrides only what it gives.
    """
    user = {k: v for k, v in vars(args).items() if k in BY_NAME and v is not None}  # typed: parse_args
    cfg = {o.name: o.default for o in OPTIONS if command in o.commands}
    if saved is not None:
        cfg.update({k: v for k, v in saved.items() if k in cfg})
        cfg.update(user)
        _validate(cfg)
        return cfg
    kind = data_kind(user.get("data", cfg.get("data", "digits")))
    data_defaults = {k: v for k, v in DATA_DEFAULTS.get(kind, {}).items() if k in cfg}
    if command == "teacher" and "teacher" in data_defaults:
        data_defaults["epochs"] = DATA_DEFAULTS[kind].get("teacher_epochs", data_defaults.get("epochs"))
    recipe = user.get("recipe", "auto")
    if recipe == "auto":
        model = user.get("student" if command == "train" else "teacher",
                         data_defaults.get("student" if command == "train" else "teacher",
                                           cfg.get("student" if command == "train" else "teacher")))
        recipe = "vit" if (student_is_tokens and model and student_is_tokens(model)) else "cnn"
    cfg.update({k: v for k, v in RECIPES[recipe].items() if k in cfg})
    if user.get("opt") and user.get("opt") != RECIPES[recipe]["opt"]:
        # an explicit optimiser brings its own recipe's rates unless they are given too
        other = "vit" if recipe == "cnn" else "cnn"
        cfg.update({k: RECIPES[other][k] for k in ("lr", "weight_decay", "min_lr") if k in cfg})
    cfg.update(data_defaults)
    cfg.update(user)
    if "dkd_warmup_epochs" not in user and cfg.get("dkd_warmup_epochs") and cfg.get("epochs"):
        cfg["dkd_warmup_epochs"] = min(cfg["dkd_warmup_epochs"], round(SHORT_RUN_WARMUP * cfg["epochs"], 4))
    if command == "train" and cfg.get("ofa_weight") is None:
        cifar_cnn = recipe == "cnn" and kind in ("cifar10", "cifar100")
        cfg["ofa_weight"] = 0.1 if cifar_cnn else 1.0  # OFA-KD's CIFAR CNN recipe; 1.0 elsewhere
    if "warmup_epochs" not in user and cfg.get("warmup_epochs") and cfg.get("epochs"):
        # a recipe's warm-up (20 epochs of 300) would fill a short run: shortened to a fifth of it at most
        cfg["warmup_epochs"] = min(cfg["warmup_epochs"], round(SHORT_RUN_WARMUP * cfg["epochs"], 4))
    cfg["recipe"] = recipe
    _validate(cfg)
    return cfg


def _validate(cfg: dict) -> None:
    def positive(name, allow_zero=False):
        if name in cfg and cfg[name] is not None and (cfg[name] < 0 or (cfg[name] == 0 and not allow_zero)):
            raise UserError(f"{flag(name)} must be {'>= 0' if allow_zero else '> 0'}, got {cfg[name]}")

    for name in ("epochs", "batch_size", "img_size", "lr", "teacher_epochs", "pat_dim", "pat_heads",
                 "kd_temperature", "model_ema_decay", "nonfinite_patience", "grad_accum", "ofa_temperature",
                 "dkd_temperature", "dist_temperature"):
        positive(name)
    for name in ("min_lr", "warmup_epochs", "weight_decay", "momentum", "clip_grad", "smoothing", "mixup", "cutmix",
                 "reprob", "hflip", "workers", "gt_weight", "kd_weight", "fd_weight", "reg_weight",
                 "checkpoint_every", "ofa_weight", "dkd_alpha", "dkd_beta", "dkd_warmup_epochs", "dist_beta",
                 "dist_gamma", "fitnet_weight"):
        positive(name, allow_zero=True)
    for name in ("hflip", "reprob", "smoothing"):
        if name in cfg and cfg[name] > 1:
            raise UserError(f"{flag(name)} must be a probability in [0, 1], got {cfg[name]}")
    if cfg.get("model_ema_decay") is not None and cfg["model_ema_decay"] >= 1:
        raise UserError(f"--model-ema-decay must be < 1, got {cfg['model_ema_decay']}")
    if cfg.get("seed") is not None and not 0 <= cfg["seed"] < 2**32:
        raise UserError(f"--seed must be in [0, 2**32 - 1], got {cfg['seed']}")
    if cfg.get("auto_augment"):
        from patfast.data.transforms import check_auto_augment

        cfg["auto_augment"] = check_auto_augment(cfg["auto_augment"]) or ""
    if "crop_pct" in cfg and not 0 < cfg["crop_pct"] <= 1:
        raise UserError(f"--crop-pct must be in (0, 1], got {cfg['crop_pct']}")
    if "crop_scale" in cfg:
        cs = cfg["crop_scale"]
        if len(cs) != 2 or not 0 < cs[0] <= cs[1] <= 1:
            raise UserError(f"--crop-scale takes two values 0 < lo <= hi <= 1, got {_show(cs)}")
    if "pat_afp_stage" in cfg:
        bad = [s for s in cfg["pat_afp_stage"] if s not in (1, 2, 3, 4)]
        if bad or len(set(cfg["pat_afp_stage"])) != len(cfg["pat_afp_stage"]):
            raise UserError(f"--pat-afp-stage takes distinct stages among 1,2,3,4, got {_show(cfg['pat_afp_stage'])}")
    for name in ("ofa_stages", "fitnet_stages"):
        stages = cfg.get(name)
        if stages is not None and (not stages or any(s not in (1, 2, 3, 4) for s in stages)
                                   or len(set(stages)) != len(stages)):
            raise UserError(f"{flag(name)} takes distinct stages among 1,2,3,4, got {_show(stages)}")
    if cfg.get("ofa_eps") is not None and any(e < 0 for e in cfg["ofa_eps"]):
        raise UserError(f"--ofa-eps values must be >= 0, got {_show(cfg['ofa_eps'])}")
    if cfg.get("ofa_eps") is not None and len(cfg["ofa_eps"]) not in (1, len(cfg.get("ofa_stages") or []) + 1):
        raise UserError(f"--ofa-eps takes one value, or one per --ofa-stages stage plus one for the logits "
                        f"({len(cfg['ofa_stages']) + 1}), got {_show(cfg['ofa_eps'])}")
    if "pat_dim" in cfg and cfg["pat_dim"] % cfg["pat_heads"]:
        raise UserError(f"--pat-dim {cfg['pat_dim']} is not divisible by --pat-heads {cfg['pat_heads']}")
    for name in ("teacher_mean", "teacher_std"):
        if cfg.get(name) is not None and len(cfg[name]) != 3:
            raise UserError(f"{flag(name)} takes 3 values, got {_show(cfg[name])}")
    for name in ("student_stages", "teacher_stages", "teacher_prompt_points"):
        if cfg.get(name) is not None and len(cfg[name]) != 4:
            raise UserError(f"{flag(name)} takes exactly 4 module names, got {len(cfg[name])}")
    if cfg.get("warmup_epochs") is not None and cfg.get("epochs") and cfg["warmup_epochs"] > cfg["epochs"]:
        cfg["warmup_epochs"] = cfg["epochs"]  # short runs: warm up over the whole run at most
