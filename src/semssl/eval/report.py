"""What every ``semssl eval`` command shares: its model options, the models it evaluates (a checkpoint, or the
random-init baselines), the result table it prints (rich) and the JSON it writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional


def print_table(title: str, columns: dict[str, dict[str, Any]], out: Optional[str], payload: dict,
                digits: int = 2) -> None:
    """One table: a row per metric, a column per evaluated model (``model`` -> "value"; the random-init baselines
    by their labels), floats with ``digits`` decimals; ``payload`` written as JSON to ``out``."""
    from rich.console import Console
    from rich.table import Table

    from semssl.eval.evaluate import BASELINE_LABELS

    table = Table(title=title)
    table.add_column("metric")
    for name in columns:
        table.add_column("value" if name == "model" else BASELINE_LABELS.get(name, name), justify="right")
    for key in dict.fromkeys(k for rows in columns.values() for k in rows):
        values = [rows.get(key) for rows in columns.values()]
        table.add_row(key, *(f"{v:.{digits}f}" if isinstance(v, float) else "-" if v is None else str(v)
                             for v in values))
    Console().print(table)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(payload, indent=2, default=float))
        print(f"wrote {out}")


def add_model_options(parser: Any, random_init_help: str) -> None:
    """The model options every ``semssl eval`` command shares: which checkpoint (or the random-init baselines),
    the architecture of a plain state_dict / random init, and which branch."""
    parser.add_argument("--checkpoint", help="run folder, semssl .ckpt, or plain torchvision ResNet state_dict (.pth)")
    parser.add_argument("--random-init", action="store_true", help=random_init_help)
    parser.add_argument("--arch", choices=["resnet18", "resnet34", "resnet50", "resnet101"],
                        help="architecture of a plain state_dict / random init (inferred from a state_dict's keys; "
                             "resnet50 for random init if omitted)")
    parser.add_argument("--small-input", action="store_true", help="random init only: the small-input stem")
    parser.add_argument("--width", type=int, default=64,
                        help="random init only: ResNet base width (64 = torchvision's; a checkpoint's is read from it)")
    parser.add_argument("--branch", choices=["online", "teacher"],
                        help="which network of a semssl checkpoint (default: the method's: teacher for DINO/SCFS)")


def models_for_eval(args: Any, calibrate: Any) -> tuple[dict[str, tuple[Any, dict]], Any]:
    """``{name: (model, info)}``: a checkpoint's model under ``model``, or with ``--random-init`` the baselines
    ``calibrate(random_model)`` builds (``{name: model}``); and the checkpoint's config (None otherwise)."""
    if not args.random_init:
        from semssl.checkpoints import load_model

        if not args.checkpoint:
            raise SystemExit("semssl eval: give --checkpoint (a run folder, a .ckpt, or a torchvision state_dict)"
                             " or --random-init")
        model, info, cfg = load_model(args.checkpoint, arch=args.arch)
        info["branch"] = model.resolve_branch(args.branch)
        return {"model": (model, info)}, cfg
    import torch

    from semssl.eval.evaluate import BASELINE_LABELS
    from semssl.models.backbones import BackboneModel, ResNetBackbone

    arch = args.arch or "resnet50"
    torch.manual_seed(args.seed)
    random_model = BackboneModel(ResNetBackbone(arch, small_input=args.small_input, width=args.width)).eval()
    network = {"arch": arch, "width": args.width, "small_input": args.small_input}
    out = {}
    for name, model in calibrate(random_model).items():
        info = {"source": BASELINE_LABELS.get(name, name), "seed": args.seed, "method": None,
                "default_branch": "online", "branch": "online", **(network if name != "pixels" else {})}
        out[name] = (model, info)
    return out, None


def payload_of(results: dict[str, dict], **extra: Any) -> dict:
    """One model: its result at the top level; the random-init baselines: ``{name: result}``."""
    body = results["model"] if set(results) == {"model"} else results
    return {**body, **extra}
