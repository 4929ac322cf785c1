"""``python -m bench``: the command line of the benchmarks (thin: parsing and printing only)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    lay = sub.add_parser("layers", help="time, memory and FLOPs per method × size")
    lay.add_argument("--methods", default=None, help="comma list (default: every registered)")
    lay.add_argument("--sizes", default="xs", help="comma list of sizes (default: xs)")
    lay.add_argument("--batch", type=int, default=64, help="training batch (default 64)")
    lay.add_argument("--infer-batches", default="1,256", help="inference batches (default 1,256)")
    lay.add_argument("--input", default="3x32x32", help="CxHxW (default 3x32x32)")
    lay.add_argument("--classes", type=int, default=10, help="number of classes (default 10)")
    lay.add_argument("--repeats", type=int, default=5, help="timed repeats, median (default 5)")
    lay.add_argument("--warmup", type=int, default=1, help="untimed calls first (default 1)")
    lay.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    lay.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    lay.add_argument("--no-onnx", action="store_true", help="skip ONNX export and ORT timing")
    lay.add_argument("--out", type=Path, default=Path("bench_results/layers"))

    rep = sub.add_parser("report", help="join training reports and bench results; plots")
    rep.add_argument("runs", nargs="+", type=Path,
                     help="run folders, report.json files, folders to search, or layers.json")
    rep.add_argument("--bench", type=Path, action="append", default=[],
                     help="a bench layers.json (repeatable; also found among RUNS)")
    rep.add_argument("--out", type=Path, default=Path("bench_results/report"))
    rep.add_argument("--epsilon", default=None,
                     help="ε of the RA axis as in the reports (default: 36/255 or the smallest)")

    srv = sub.add_parser("service", help="load-test a running lipcert service on loopback")
    srv.add_argument("--url", required=True, help="http://127.0.0.1:PORT (loopback only)")
    srv.add_argument("--model", default=None, help="model name (default: the first listed)")
    srv.add_argument("--requests", type=int, default=200, help="max requests per level")
    srv.add_argument("--seconds", type=float, default=10.0, help="max seconds per level")
    srv.add_argument("--concurrency", default="1,8,32,64", help="comma list (default 1,8,32,64)")
    srv.add_argument("--batch", type=int, default=1, help="images per request (default 1)")
    srv.add_argument("--input", default=None, help="CxHxW (default: from the model list)")
    srv.add_argument("--onnx", type=Path, default=None, help="the model's ONNX file, for ORT")
    srv.add_argument("--timeout", type=float, default=30.0, help="per-request timeout seconds")
    srv.add_argument("--out", type=Path, default=Path("bench_results/service"))

    ld = sub.add_parser("load", help="cost of the re-audit when a server loads a model")
    ld.add_argument("--methods", default=None, help="comma list (default: every registered)")
    ld.add_argument("--size", default="xs", help="network size (default: xs)")
    ld.add_argument("--input", default="3x32x32", help="CxHxW (default 3x32x32)")
    ld.add_argument("--classes", type=int, default=10, help="number of classes (default 10)")
    ld.add_argument("--threads", type=int, default=1, help="threads of the loading process")
    ld.add_argument("--out", type=Path, default=Path("bench_results/load"))
    frm = sub.add_parser("forms", help="every ONNX graph form of one network, timed in turns")
    frm.add_argument("--methods", default="standard,lot", help="comma list (default standard,lot)")
    frm.add_argument("--size", default="s", help="network size (default: s)")
    frm.add_argument("--input", default="3x32x32", help="CxHxW (default 3x32x32)")
    frm.add_argument("--classes", type=int, default=10, help="number of classes (default 10)")
    frm.add_argument("--batches", default="1,256", help="inference batches (default 1,256)")
    frm.add_argument("--repeats", type=int, default=5, help="samples each, median (default 5)")
    frm.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads (default 1)")
    frm.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                     help="cuda: ONNX Runtime's CUDA provider first")
    frm.add_argument("--out", type=Path, default=Path("bench_results/forms"))
    ref = sub.add_parser(
        "reference", help="training step of each layer against the comparison paper's own code"
    )
    ref.add_argument("--reference-dir", type=Path, required=True,
                     help="a checkout of berndprach/1LipschitzLayersCompared")
    ref.add_argument("--methods", default=None, help="comma list (default: every one it has)")
    ref.add_argument("--batch", type=int, default=64, help="batch (default 64)")
    ref.add_argument("--channels", type=int, default=32, help="channels (default 32)")
    ref.add_argument("--size", type=int, default=16, help="height = width (default 16)")
    ref.add_argument("--repeats", type=int, default=20, help="timed repeats each (default 20)")
    ref.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    ref.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ref.add_argument("--out", type=Path, default=Path("bench_results/reference"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        if args.command == "layers":
            from bench.layers import config_from_args, parse_list, parse_shape, run_layers

            cfg = config_from_args(
                parse_list(args.methods) if args.methods else None,
                parse_list(args.sizes),
                batch=args.batch,
                infer_batches=parse_list(args.infer_batches, int),
                input_shape=parse_shape(args.input),
                num_classes=args.classes,
                repeats=args.repeats,
                warmup=args.warmup,
                device=args.device,
                memory=not args.no_memory,
                onnx=not args.no_onnx,
                out=args.out,
            )
            run_layers(cfg)
            print((args.out / "layers.md").read_text(encoding="utf-8"))
            print(f"wrote {args.out}/layers.json, layers.csv, layers.md")
        elif args.command == "report":
            from bench.report import build_report

            doc = build_report(args.runs, args.bench, args.out, epsilon=args.epsilon)
            print((args.out / "report.md").read_text(encoding="utf-8"))
            print("wrote " + ", ".join(str(p) for p in doc["files"].values()))
        elif args.command == "service":
            from bench.layers import parse_list, parse_shape
            from bench.service_load import ServiceLoadConfig, run_service_load

            cfg = ServiceLoadConfig(
                url=args.url,
                model=args.model,
                requests=args.requests,
                seconds=args.seconds,
                concurrency=parse_list(args.concurrency, int),
                batch=args.batch,
                input_shape=parse_shape(args.input) if args.input else None,
                onnx=args.onnx,
                timeout=args.timeout,
                out=args.out,
            )
            run_service_load(cfg)
            print((args.out / "service.md").read_text(encoding="utf-8"))
            print(f"wrote {args.out}/service.json, service.csv, service.md")
        elif args.command == "load":
            from bench.layers import parse_list, parse_shape
            from bench.load_time import LoadTimeConfig, run_load_time
            from models.registry import list_methods

            methods = parse_list(args.methods) if args.methods else list_methods()
            run_load_time(LoadTimeConfig(tuple(methods), args.size, parse_shape(args.input),
                                         args.classes, args.threads, args.out))
            print((args.out / "load.md").read_text(encoding="utf-8"))
            print(f"wrote {args.out}/load.json, load.csv, load.md")
        elif args.command == "forms":
            from bench.forms import FormsConfig, run_forms
            from bench.layers import parse_list, parse_shape

            run_forms(FormsConfig(
                tuple(parse_list(args.methods)), args.size, parse_shape(args.input),
                args.classes, tuple(parse_list(args.batches, int)), args.repeats, args.threads,
                args.device, out=args.out,
            ))
            print((args.out / "forms.md").read_text(encoding="utf-8"))
            print(f"wrote {args.out}/forms.json, forms.md")
        elif args.command == "reference":
            from bench.layers import parse_list
            from bench.reference import run_reference

            run_reference(
                args.reference_dir,
                parse_list(args.methods) if args.methods else None,
                batch=args.batch, channels=args.channels, size=args.size,
                repeats=args.repeats, warmup=args.warmup, threads=args.threads, out=args.out,
            )
            print((args.out / "reference.md").read_text(encoding="utf-8"))
            print(f"wrote {args.out}/reference.json, reference.md")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
