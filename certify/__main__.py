"""Command line: ``python -m certify evaluate MODEL.onnx --dataset NAME`` and ``audit MODEL.onnx``.

Both load the file exactly as the service does (:func:`certify.artifact.load`: bytes read once,
the graph re-audited, metadata only cross-checked) and exit 2 with a one-line reason when it is
refused. ``evaluate`` runs the test set through ONNX Runtime, prints clean accuracy and
the certified robust accuracy (CRA) at the standard radii, writes ``<model>.certify.json`` and a
CRA-vs-ε curve ``<model>.cra.png`` next to the model, prints the audit table and runs the attack
check on the first certified points. ``audit`` prints the per-layer audit table. User errors
(missing file, not ONNX, no lipcert metadata, unknown dataset) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np


def _curve(logits: np.ndarray, labels: np.ndarray, kwargs: dict, path: Path) -> list[list[float]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from certify.radius import certified_radius

    radius = certified_radius(logits, **kwargs)
    correct = logits.argmax(axis=1) == labels
    eps = np.linspace(0.0, max(1.0, float(radius.max()) if radius.size else 1.0), 101)
    cra = [float((correct & (radius > e)).mean()) for e in eps]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(eps, cra)
    ax.set_xlabel("L2 radius ε (pixels in [0, 1])")
    ax.set_ylabel("certified robust accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(path.stem)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [[float(e), c] for e, c in zip(eps, cra, strict=True)]


def cmd_audit(args: argparse.Namespace) -> int:
    from certify.artifact import load
    from certify.audit import audit

    artifact = load(args.model, threads=args.threads)
    # The load proved the bound; the table adds power-iteration lower estimates beside it.
    print(audit(artifact.twin, artifact.input_shape).table())
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from certify.artifact import load
    from certify.attack import attack_check
    from certify.audit import audit
    from certify.radius import STANDARD_EPS, certified_accuracy, eps_key
    from data import load_dataset

    path = Path(args.model)
    artifact = load(path, threads=args.threads)
    meta = artifact.metadata
    data = load_dataset(args.dataset)
    images, labels = data.test_images, data.test_labels
    if args.limit is not None:
        images, labels = images[: args.limit], labels[: args.limit]
    y = labels.numpy()
    logits = artifact.logits(images)
    kwargs = artifact.certificate_kwargs()
    acc = certified_accuracy(logits, y, STANDARD_EPS, **kwargs)
    kind = f"{meta['method']} {meta['size']}, {meta['certificate']} certificate"
    print(f"model        {path}  ({kind})")
    print(f"points       {len(y)} ({args.dataset} test)")
    print(f"clean        {acc['clean']:.4f}")
    print("eps          CRA")
    for e in STANDARD_EPS:
        print(f"{e:<12.4f} {acc[eps_key(e)]:.4f}")
    stem = path.with_suffix("")
    png = Path(f"{stem}.cra.png")
    curve = _curve(logits, y, kwargs, png)
    result = audit(artifact.twin, artifact.input_shape)
    print(result.table())
    attack = attack_check(artifact, images, labels, steps=args.attack_steps, restarts=2,
                          max_points=args.attack_points)
    print(
        f"attack check {attack['attacked']} of {attack['certified']} certified points attacked, "
        f"{attack['flipped']} flipped, max ‖δ‖/r {attack['max_relative_norm']:.4f}"
    )
    flipped = attack["flipped"]
    curvature = None
    if args.curvature:
        curvature = _curvature(artifact, images, labels, args)
        flipped += curvature["attack"]["flipped"]
    report = dict(
        model=str(path), dataset=args.dataset, points=int(len(y)), method=meta["method"],
        size=meta["size"], certificate=meta["certificate"], lipschitz_bound=meta["lipschitz_bound"],
        accuracy=acc, cra_curve=curve, audit=result.to_dict(), attack=attack, curve_png=str(png),
    )
    if curvature is not None:
        report["curvature"] = curvature
    out = Path(f"{stem}.certify.json")
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote        {out}, {png}")
    return 0 if flipped == 0 else 1


def _curvature(artifact: Any, images: Any, labels: Any, args: argparse.Namespace) -> dict:
    """The CRC-Lip curvature certificate (python only: it needs the features): CRA + attack."""
    from certify.attack import attack_check
    from certify.curvature import curvature_radii
    from certify.radius import STANDARD_EPS, eps_key
    from models.heads import PlainCRCHead

    twin = artifact.twin
    head = getattr(getattr(twin, "head", None), "head", None)
    if not isinstance(head, PlainCRCHead):
        raise ValueError(
            f"--curvature needs a model with a CRC-Lip head; {artifact.source} has a "
            f"{type(head).__name__} head ({artifact.metadata.get('certificate')!r} certificate)"
        )
    radii, pred = curvature_radii(twin, images, body_bound=artifact.audit.body_bound)
    ok = pred == labels
    cra = {eps_key(e): float(((radii > e) & ok).double().mean()) for e in STANDARD_EPS}
    print("curvature certificate (CRC-Lip, features in torch)")
    for e in STANDARD_EPS:
        print(f"{e:<12.4f} {cra[eps_key(e)]:.4f}")
    attack = attack_check(artifact, images, labels, steps=args.attack_steps, restarts=2,
                          max_points=args.attack_points, radii=radii)
    print(
        f"attack check {attack['attacked']} of {attack['certified']} curvature-certified points "
        f"attacked, {attack['flipped']} flipped, max ‖δ‖/r {attack['max_relative_norm']:.4f}"
    )
    return dict(accuracy=cra, attack=attack)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m certify", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("evaluate", help="accuracy, certified accuracy, audit and attack check")
    ev.add_argument("model")
    ev.add_argument("--dataset", required=True, choices=["digits", "fashion-mnist"])
    ev.add_argument("--limit", type=int, default=None, help="first N test points only")
    ev.add_argument("--attack-points", type=int, default=64)
    ev.add_argument("--attack-steps", type=int, default=100)
    ev.add_argument("--threads", type=int, default=None)
    ev.add_argument("--curvature", action="store_true",
                    help="CRC-Lip models: also the curvature certificate, attack-checked")
    ev.set_defaults(func=cmd_evaluate)
    au = sub.add_parser("audit", help="per-layer Lipschitz audit table")
    au.add_argument("model")
    au.add_argument("--threads", type=int, default=None)
    au.set_defaults(func=cmd_audit)
    return parser


def main(argv: list[str] | None = None) -> int:
    from certify.artifact import ExportError, ModelVerificationError
    from certify.audit import AuditError

    args = build_parser().parse_args(argv)
    if getattr(args, "limit", None) is not None and args.limit < 1:
        print(f"error: --limit must be >= 1, got {args.limit}", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (ModelVerificationError, ExportError, AuditError, ValueError, OSError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
