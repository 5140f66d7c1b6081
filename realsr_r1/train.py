"""`python -m realsr_r1.train`: training, each kind in realsr_r1/training/.

    python -m realsr_r1.train --config configs/grpo.yaml [--resume] [--set key=value ...]   GRPO of the policy
    python -m realsr_r1.train filter --config configs/grpo.yaml --keep 0.3 [--out DIR]      IRPO data filtering
    python -m realsr_r1.train restorer --config configs/restorer-fr.yaml [--resume]         RL of the restorer
    python -m realsr_r1.train joint --config configs/joint-tiny.yaml [--resume]             both, in turn
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from .profiles import ConfigError, load_config
from .vlm import PolicyLoadError

# command → (its module in realsr_r1/training, what --config takes)
COMMANDS = {
    "train": ("grpo", "a YAML file (configs/grpo.yaml, configs/grpo-realsr-r1.yaml…)"),
    "filter": ("irpo_filter", "a YAML file (configs/grpo.yaml, configs/grpo-realsr-r1.yaml…)"),
    "restorer": ("restorers", "a YAML file (configs/restorer-fr.yaml, restorer-nr.yaml, restorer-onestep.yaml, "
                              "restorer-tiny.yaml…)"),
    "joint": ("joint", "a YAML file (configs/joint-tiny.yaml)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
    name, config_help = COMMANDS[command]
    module = importlib.import_module(f".training.{name}", __package__)
    from .cli import Parser

    p = Parser(prog=f"python -m realsr_r1.train{'' if command == 'train' else ' ' + command}",
               description=module.__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help=config_help)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set trainer.learning_rate=1e-5 (repeatable)")
    p.add_argument("--verbose", action="store_true", help="also show the libraries' logs and warnings")
    if command == "filter":
        p.add_argument("--keep", type=float, default=0.3, help="fraction of inputs to keep (IRPO: 0.3)")
        p.add_argument("--out", help="output folder (default: DATA-hardestNN)")
    else:
        again = p.add_mutually_exclusive_group()
        again.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
        again.add_argument("--overwrite", action="store_true",
                           help="start again in output_dir, removing an earlier run's checkpoint-N folders")
    args = p.parse_args(argv)
    from . import quiet
    from .training.common import main_process, show_library_warnings_once

    quiet.configure(args.verbose)
    show_library_warnings_once()
    try:
        if command == "joint":  # its sides are configs by name: expanded first, so --set policy.x=… reaches them
            from .profiles import apply_overrides

            cfg = apply_overrides(module.expand(load_config(args.config)), args.overrides)
        else:
            cfg = load_config(args.config, args.overrides)
        if command == "filter":
            module.filter_dataset(cfg, args.keep, Path(args.out) if args.out else None,
                                  log=lambda m: print(m, file=sys.stderr))
        elif command == "joint":
            message = module.main_message(cfg, *module.train(cfg, resume=args.resume, overwrite=args.overwrite))
            if main_process():
                print(message, file=sys.stderr)
        else:
            out = module.train(cfg, resume=args.resume, overwrite=args.overwrite)
            if main_process():
                print(module.saved_message(cfg, out), file=sys.stderr)
    except (ConfigError, ValueError, FileNotFoundError, ImportError, PolicyLoadError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
