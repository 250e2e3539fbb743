"""`fedjob`: the command line, and the entrypoint of every pod the operator creates."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import yaml

from fedjob.errors import EXIT_PERMANENT, PermanentError, write_termination_message
from fedjob.spec import FederatedJob, SpecError, load_job, local_path_problems
from fedjob_cli.parent_watch import watch_parent_from_env

DEFAULT_CACHE = Path(os.environ.get("FEDJOB_CACHE", Path.home() / ".cache" / "fedjob"))


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    # DeepSpeed and friends are chatty at INFO.
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _job(
    path: str,
    check_paths: bool = True,
    silos: list[str] | None = None,
    overrides: list[str] | None = None,
    report: list[str] | None = None,
) -> FederatedJob:
    """The job (with `--set` overrides), its folders, model and (the given silos') data checked when
    `check_paths`: a mistake no restart can fix is refused here, with its reason, before anything starts."""
    job = load_job(path, overrides or ())
    if check_paths:
        problems = local_path_problems(job, silos=silos)
        if not problems:
            from fedjob.preflight import preflight_problems

            problems = preflight_problems(job, silos, report=report)
        if problems:
            raise SpecError(path, tuple(problems))
    return job


def cmd_validate(args: argparse.Namespace) -> int:
    report: list[str] = []
    job = _job(args.file, check_paths=args.check_paths, overrides=args.set, report=report)
    print(
        f"{args.file}: valid FederatedJob {job.name!r} ({len(job.spec.silos)} silos, "
        f"{job.spec.rounds} rounds, mode {job.spec.training.mode})"
    )
    if args.check_paths:
        from fedjob.silo_data import layout
        from fedjob.tokenization import tokenizer_kind

        t = job.spec.training
        print(
            f"  tokenizer: {tokenizer_kind(job)}; sequenceLength {t.sequence_length}; examples {layout(job)}"
        )
        for line in report:
            print(f"  {line}")
    if job.external_silos():
        print(
            f"  external silos (they enroll with a bootstrap token; their data is set on their side): "
            f"{', '.join(job.external_silos())}"
        )
    if job.spec.aggregation.silos_per_round is not None:
        print(f"  sampling: {job.spec.silos_per_round} of {len(job.spec.silos)} silos train each round")
    if job.spec.privacy.dp is not None:
        from fedjob.privacy_budget import plan_for

        dp = job.spec.privacy.dp
        plan = plan_for(job.spec).describe()
        print(f"  differential privacy ({dp.noise} noise, clip norm {dp.clip_norm:g}): {plan}")
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    from fedjob.tls import write_job_certs

    job = _job(args.file, check_paths=False)
    # External silos make their own keys and enroll: none is made for them here.
    files = write_job_certs(Path(args.out), job.name, job.hosted_silos(), job.metadata.namespace, args.days)
    for p in sorted(files.root.iterdir()):
        print(p)
    return 0


def cmd_aggregator(args: argparse.Namespace) -> int:
    from fedjob_aggregator.server import AggregatorOptions, serve

    job = _job(args.file, check_paths=args.check_paths, silos=[])
    return serve(
        job,
        AggregatorOptions(
            certs=Path(args.certs),
            workdir=Path(args.workdir),
            host=args.host,
            port=args.port,
            metrics_port=args.metrics_port,
            enrollment_port=args.enrollment_port,
            linger_seconds=args.exit_after,
        ),
    )


def cmd_worker(args: argparse.Namespace) -> int:
    from fedjob_worker.runner import WorkerOptions, run_silo

    job = _job(args.file, check_paths=False)
    try:
        job.silo(args.silo)
    except KeyError as exc:
        raise SpecError(args.file, (f"--silo: {exc.args[0]}",)) from None
    problems = local_path_problems(job, silos=[args.silo], with_eval=False)
    if not problems:
        from fedjob.preflight import preflight_problems

        problems = preflight_problems(job, [args.silo])
    if problems:
        raise SpecError(args.file, tuple(problems))
    return run_silo(
        job,
        WorkerOptions(
            silo=args.silo,
            address=args.aggregator,
            certs=Path(args.certs),
            server_name=args.server_name,
            state=Path(args.state) if args.state else None,
        ),
    )


def cmd_silo_join(args: argparse.Namespace) -> int:
    from rich.console import Console

    from fedjob.silo_spec import parse_silo
    from fedjob_cli.silo_join import join

    try:
        doc = yaml.safe_load(Path(args.file).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SpecError(args.file, (f"cannot read: {exc}",)) from None
    silo = parse_silo(doc, args.file)
    token = Path(args.token_file).read_text().strip() if args.token_file else os.environ.get("FEDJOB_TOKEN")
    workdir = Path(args.workdir or f"silo-{silo.spec.silo}")
    return join(silo, workdir, token, Console())


def cmd_operator(args: argparse.Namespace) -> int:
    from fedjob_operator.main import run_operator

    namespaces = [n for n in (args.namespace or []) if n]
    return run_operator(namespaces, args.metrics_port, args.liveness or None)


def cmd_run(args: argparse.Namespace) -> int:
    from fedjob_cli.local_run import run_local

    job = _job(args.file, overrides=args.set)
    out = Path(args.out) if args.out else Path("runs") / job.name
    return run_local(
        Path(args.file), job, out, fresh=args.fresh, max_restarts=args.max_restarts, overridden=bool(args.set)
    )


def cmd_example(args: argparse.Namespace) -> int:
    from fedjob.corpora import python_docstrings, write_silo_folders
    from fedjob.modeling import build_tiny_model

    out = Path(args.out)
    model = out / "models" / "tiny-gpt2"
    if args.which in ("all", "text") and (not (model / "config.json").exists() or args.force):
        build_tiny_model(model, pretrain_text=python_docstrings(300_000))
        print(f"built {model} (pre-trained briefly on standard-library docstrings)")
    if args.which in ("all", "text") and (not (out / "data" / "eval").exists() or args.force):
        for name, folder in write_silo_folders(out / "data").items():
            print(f"wrote {name}: {folder}")
    if args.which == "text":
        return 0
    from fedjob.chat_example import build_tiny_chat_model, write_chat_silos

    chat = out / "models" / "tiny-chat"
    if not (chat / "config.json").exists() or args.force:
        build_tiny_chat_model(chat)
        print(f"built {chat} (a BPE tokenizer with a chat template, pre-trained briefly on docstrings)")
    if not (out / "data" / "chat").exists() or args.force:
        for name, folder in write_chat_silos(out / "data" / "chat").items():
            print(f"wrote chat silo {name}: {folder / 'train.jsonl'}")
    return 0


def cmd_crd(args: argparse.Namespace) -> int:
    from fedjob.crd import crd_manifest, silo_crd_manifest

    if args.kind == "FederatedSilo":
        text = "# Generated from fedjob/silo_spec.py by `make crds`. Do not edit.\n"
        text += yaml.safe_dump(silo_crd_manifest(), sort_keys=False)
    else:
        text = "# Generated from fedjob/spec.py by `fedjob crd` (make crds). Do not edit.\n"
        text += yaml.safe_dump(crd_manifest(), sort_keys=False)
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_data_split(args: argparse.Namespace) -> int:
    from fedjob.split import read_sources, split_sources

    summary = split_sources(
        read_sources([Path(p) for p in args.sources]),
        args.silos,
        Path(args.out),
        alpha=args.alpha,
        by_source=args.by_source,
        seed=args.seed,
    )
    print(summary.table())
    return 0


def cmd_warmup(args: argparse.Namespace) -> int:
    """Compile DeepSpeed's CPU communication op once, into the cache."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(DEFAULT_CACHE / "torch_extensions"))
    from fedjob_worker.runner import free_port
    from fedjob_worker.trainer import init_distributed

    init_distributed(0, 1, free_port())
    print("DeepSpeed is ready (extensions cached in", os.environ["TORCH_EXTENSIONS_DIR"] + ")")
    return 0


JOB_FILE = "the FederatedJob YAML file (relative paths in it resolve against its folder)"
SET_HELP = (
    "override one field for this run, as PATH=VALUE with a YAML value: spec.rounds=4, "
    "spec.training.lora.r=16, spec.silos[0].localSteps=5 (repeatable)"
)
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedjob", description="Federated training of language models.")
    p.add_argument(
        "--log-level",
        type=str.lower,
        choices=LOG_LEVELS,
        default=os.environ.get("FEDJOB_LOG_LEVEL", "info").lower(),
        help="logging threshold of every component (default: info, or $FEDJOB_LOG_LEVEL)",
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("run", help="run a whole FederatedJob on this machine (aggregator + every silo)")
    s.add_argument("file", help=JOB_FILE)
    s.add_argument("--out", help="output folder (default runs/<job name>)")
    s.add_argument("--fresh", action="store_true", help="discard an earlier run's checkpoints in --out")
    s.add_argument(
        "--max-restarts",
        type=int,
        default=10,
        help="restart a crashed aggregator or silo this many times (default 10)",
    )
    s.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help=SET_HELP)
    s.set_defaults(fn=cmd_run)

    s = sub.add_parser("validate", help="check a FederatedJob file and list every problem")
    s.add_argument("file", help=JOB_FILE)
    s.add_argument(
        "--check-paths",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also check the model and data on this machine: folders exist, config.json parses and "
        "names a known model type, weights are there, sequenceLength and the vocabulary fit the model, "
        "every adapter target module exists, each silo's text is UTF-8 and at least one window long",
    )
    s.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help=SET_HELP)
    s.set_defaults(fn=cmd_validate)

    s = sub.add_parser("certs", help="create the job CA and every certificate")
    s.add_argument("file", help=JOB_FILE)
    s.add_argument("--out", required=True, help="folder for ca.crt/key, aggregator, observer and silo pairs")
    s.add_argument("--days", type=int, default=365, help="validity of every certificate (default 365)")
    s.set_defaults(fn=cmd_certs)

    s = sub.add_parser("aggregator", help="serve the aggregator of a job")
    s.add_argument("file", help=JOB_FILE)
    s.add_argument("--certs", required=True, help="folder written by `fedjob certs` (or the mounted Secret)")
    s.add_argument("--workdir", required=True, help="checkpoints, metrics and the result go here")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=50051, help="gRPC port (default 50051; 0: any free port)")
    s.add_argument(
        "--metrics-port", type=int, default=9090, help="Prometheus /metrics port (default 9090; 0: any)"
    )
    s.add_argument(
        "--enrollment-port",
        type=int,
        default=50052,
        help="where external silos enroll, when the job has any (default 50052; 0: any)",
    )
    s.add_argument(
        "--exit-after",
        type=float,
        metavar="SECONDS",
        help="exit this long after the job ends (default: keep serving status until stopped)",
    )
    s.add_argument(
        "--check-paths",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="check the model folder before serving (default: on)",
    )
    s.set_defaults(fn=cmd_aggregator)

    s = sub.add_parser("worker", help="run one silo of a job")
    s.add_argument("file", help=JOB_FILE)
    s.add_argument("--silo", required=True, help="which of spec.silos this process is")
    s.add_argument("--certs", required=True, help="folder with ca.crt and silo-<name>.crt/key")
    s.add_argument("--aggregator", required=True, help="host:port of the aggregator")
    s.add_argument("--server-name", help="TLS name to expect on the aggregator's certificate")
    s.add_argument(
        "--state",
        help="folder that keeps the silo's update-stage state (topk's residual) across restarts",
    )
    s.set_defaults(fn=cmd_worker)

    silo = sub.add_parser("silo", help="an external silo's side").add_subparsers(
        dest="silo_command", required=True
    )
    s = silo.add_parser(
        "join", help="enroll (key made here, never sent) and train, from a FederatedSilo file"
    )
    s.add_argument("file", help="a FederatedSilo YAML file")
    s.add_argument("--token-file", help="the bootstrap token from the job's owner (or FEDJOB_TOKEN)")
    s.add_argument("--workdir", help="key, certificate, job and logs (default silo-<name>)")
    s.set_defaults(fn=cmd_silo_join)

    s = sub.add_parser("operator", help="run the Kubernetes operator (Kopf)")
    s.add_argument("--namespace", action="append", help="namespace to watch (repeatable; default: all)")
    s.add_argument(
        "--metrics-port",
        type=int,
        default=8080,
        help="Prometheus /metrics port of the operator (default 8080)",
    )
    s.add_argument("--liveness", default="http://0.0.0.0:8081/healthz", help="Kopf liveness endpoint")
    s.set_defaults(fn=cmd_operator)

    s = sub.add_parser("example", help="build the tiny example model and the example silo data")
    s.add_argument("--out", default="examples", help="folder for models/ and data/ (default examples)")
    s.add_argument("--force", action="store_true", help="rebuild even if they exist")
    s.add_argument(
        "--which",
        choices=["all", "text", "chat"],
        default="all",
        help="text: the byte-level GPT-2 and text silos (quickstart.yaml); chat: the Llama-shaped chat "
        "model with its tokenizer and the chat silos (chat-lora.yaml); all (default): both",
    )
    s.set_defaults(fn=cmd_example)

    data = sub.add_parser("data", help="data tooling").add_subparsers(dest="data_command", required=True)
    s = data.add_parser("split", help="non-IID silo folders from several sources (Dirichlet or by source)")
    s.add_argument("sources", nargs="+", help="one folder (or .txt file) per source")
    s.add_argument("--silos", type=int, required=True, help="how many silo folders to make")
    s.add_argument("--out", required=True, help="folder for silo-0, silo-1, ...")
    s.add_argument("--alpha", type=float, default=1.0, help="Dirichlet concentration: small = more skewed")
    s.add_argument("--by-source", action="store_true", help="silo i gets exactly source i")
    s.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    s.set_defaults(fn=cmd_data_split)

    s = sub.add_parser("crd", help="print a CustomResourceDefinition (FederatedJob or FederatedSilo)")
    s.add_argument("--out", help="write to this file instead of standard output")
    s.add_argument(
        "--kind",
        choices=["FederatedJob", "FederatedSilo"],
        default="FederatedJob",
        help="which CRD (default FederatedJob)",
    )
    s.set_defaults(fn=cmd_crd)

    s = sub.add_parser("warmup", help="compile DeepSpeed's CPU ops into the cache")
    s.set_defaults(fn=cmd_warmup)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    watch_parent_from_env()
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(DEFAULT_CACHE / "torch_extensions"))
    try:
        return int(args.fn(args))
    except (SpecError, PermanentError) as exc:
        # No restart can fix these: say why, once, where the supervisor looks, and exit 2.
        print(str(exc), file=sys.stderr)
        write_termination_message(str(exc))
        return EXIT_PERMANENT


if __name__ == "__main__":
    sys.exit(main())
