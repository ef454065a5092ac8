"""`fleetlearn aggregator`, `fleetlearn model build` and `fleetlearn model inspect`.

`build` needs TensorFlow (the `build` extra) and says so in one line when it is missing;
`inspect` reads any .tflite without TensorFlow or LiteRT. Both import their work modules in the
handler, so `fleetlearn --help` stays fast.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path
from typing import Any

from fleetlearn.shared.errors import ConfigError
from fleetlearn.shared.tflite.manifest import Task


def register(sub: Any) -> None:
    register_aggregator(sub)
    model = sub.add_parser(
        "model",
        help="build and inspect the fleet's TFLite model",
        description="Build the TFLite model from a spec (needs TensorFlow) or inspect one.",
    )
    commands = model.add_subparsers(dest="model_command", metavar="SUBCOMMAND", required=True)

    b = commands.add_parser(
        "build",
        help="build a model from a spec file (needs: pip install 'fleetlearn[build]')",
        description=(
            "Build the MLP classifier a spec describes, or a Keras model (--keras: a "
            "classifier, a regressor or an autoencoder, --task), as a "
            "builtin-ops-only .tflite with signatures train, infer, get_weights and "
            "set_weights, and embed its version-1 manifest. Without --spec or --keras, builds "
            "the predictive-maintenance default. A Keras model is translated layer by layer "
            "(docs/models.md lists the supported layers) and checked against Keras."
        ),
    )
    source = b.add_mutually_exclusive_group()
    source.add_argument(
        "--spec", type=Path, help="model spec (TOML); default: the shipped pdm spec"
    )
    source.add_argument("--keras", type=Path, help="a saved Keras model (.keras or .h5)")
    b.add_argument("--out", type=Path, required=True, help="where to write the .tflite")
    b.add_argument("--id", help="--keras: the model id (default: from the Keras model's name)")
    b.add_argument("--labels", help="--keras: comma-separated class names (default class_0..)")
    b.add_argument("--batch", type=int, help="--keras: training batch (default 32)")
    b.add_argument(
        "--optimizer", choices=("sgd", "adam"), help="--keras: device optimizer (default sgd)"
    )
    b.add_argument(
        "--task",
        choices=[t.value for t in Task],
        help="--keras: what the model's output is (default classification; anomaly: an "
        "autoencoder)",
    )
    b.add_argument(
        "--loss",
        help="--keras: the training loss (classification: crossentropy; regression: mse or "
        "huber; anomaly: mse)",
    )
    b.set_defaults(handler=run_build)

    p = commands.add_parser(
        "pretrain",
        help="train a built model centrally on proxy data (LiteRT; no TensorFlow)",
        description=(
            "Cold start: train a model from `fleetlearn model build` on proxy data with the "
            "same LiteRT steps devices run, and write it as the initial model (version 1, "
            "same id, layout, labels and task) for the aggregator's model.initial. Prints the "
            "task's figures on held-out rows before and after."
        ),
    )
    p.add_argument("--model", type=Path, required=True, help="the built .tflite")
    p.add_argument(
        "--data",
        type=Path,
        required=True,
        help="proxy data, .npz or .csv (docs/data.md): labels; for a regressor an .npz with "
        "float targets; for an autoencoder none needed",
    )
    p.add_argument("--epochs", type=int, required=True, help="passes over the training rows")
    p.add_argument("--out", type=Path, required=True, help="where to write the pretrained model")
    p.add_argument("--learning-rate", type=float, default=0.05, help="default 0.05")
    p.add_argument("--seed", type=int, default=0, help="shuffling seed (default 0)")
    p.add_argument(
        "--label", default=dataset_label(), help="label column of a .csv (default 'label')"
    )
    p.add_argument(
        "--eval-fraction",
        type=float,
        default=0.2,
        help="rows held out to judge the model, chosen as devices choose theirs (default 0.2)",
    )
    p.set_defaults(handler=run_pretrain)

    i = commands.add_parser(
        "inspect",
        help="print a .tflite's signatures, ops, variables and manifest",
        description="Read a .tflite without TensorFlow: signatures, ops, variables, manifest.",
    )
    i.add_argument("file", type=Path, help="the .tflite file")
    i.set_defaults(handler=run_inspect)


def run_build(args: argparse.Namespace) -> int:
    from fleetlearn.aggregator import model_build  # imports TensorFlow only when it builds
    from fleetlearn.shared.settings import writable_dir

    if args.out.is_dir():
        raise ConfigError("--out", f"{args.out} is a directory; give the .tflite file's name")
    writable_dir(args.out.parent, "--out")  # before minutes of building, not after
    if args.keras is not None:
        return _build_keras(args)
    for flag in ("id", "labels", "batch", "optimizer", "task", "loss"):
        if getattr(args, flag) is not None:
            raise ConfigError(f"--{flag}", "applies to --keras builds; a spec sets it in its file")
    spec = model_build.load_spec(args.spec)
    manifest = model_build.build_to_file(spec, args.out)
    size = args.out.stat().st_size
    print(
        f"wrote {args.out}: {spec.model_id} v{manifest.version}, "
        f"{manifest.parameter_count:,} parameters, {size:,} bytes, "
        f"content hash {manifest.content_hash.hex()[:16]}"
    )
    return 0


def _build_keras(args: argparse.Namespace) -> int:
    from fleetlearn.aggregator import model_keras

    labels = None
    if args.labels is not None:
        labels = [name.strip() for name in args.labels.split(",")]
        if not all(labels):
            raise ConfigError("--labels", "an empty class name")
    data, manifest, parity = model_keras.build_keras_model(
        args.keras,
        model_id=args.id,
        labels=labels,
        batch=32 if args.batch is None else args.batch,
        optimizer=args.optimizer or "sgd",
        task=Task(args.task or Task.CLASSIFICATION.value),
        loss=args.loss,
    )
    tmp = args.out.with_name(args.out.name + ".tmp")
    try:
        tmp.write_bytes(data)
        tmp.replace(args.out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigError("--out", f"cannot write {args.out}: {exc.strerror or exc}") from None
    step = "not compared" if parity.step is None else f"{parity.step:.1e}"
    print(
        f"wrote {args.out}: {manifest.model_id} v{manifest.version}, "
        f"{manifest.parameter_count:,} parameters, {len(data):,} bytes, "
        f"content hash {manifest.content_hash.hex()[:16]}; {manifest.task.value}; against "
        f"Keras: output within "
        f"{parity.infer:.1e}, weights after one step within {step}"
    )
    return 0


def dataset_label() -> str:
    from fleetlearn.shared.dataset import DEFAULT_LABEL_COLUMN

    return DEFAULT_LABEL_COLUMN


def run_pretrain(args: argparse.Namespace) -> int:

    from fleetlearn.aggregator.pretrain import check_settings, pretrain
    from fleetlearn.shared import dataset
    from fleetlearn.shared.settings import writable_dir

    check_settings(  # every flag before any work
        epochs=args.epochs,
        learning_rate=args.learning_rate,
        seed=args.seed,
        eval_fraction=args.eval_fraction,
    )
    if args.out.is_dir():
        raise ConfigError("--out", f"{args.out} is a directory; give the .tflite file's name")
    writable_dir(args.out.parent, "--out")
    try:
        model = args.model.read_bytes()
    except OSError as exc:
        raise ConfigError("--model", f"cannot read {args.model}: {exc.strerror or exc}") from None
    data = dataset.load(args.data, label=args.label)
    result = pretrain(
        model,
        data.x,
        data.y,
        epochs=args.epochs,
        learning_rate=args.learning_rate,
        seed=args.seed,
        eval_fraction=args.eval_fraction,
    )
    tmp = args.out.with_name(args.out.name + ".tmp")
    try:
        tmp.write_bytes(result.model)
        tmp.replace(args.out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigError("--out", f"cannot write {args.out}: {exc.strerror or exc}") from None
    task = result.manifest.task

    def figures(e: Any) -> str:
        if e.samples == 0:
            return "no held-out rows"
        if task is Task.REGRESSION:
            return f"mean absolute error {e.loss:.4f}"
        if task is Task.ANOMALY:
            return f"reconstruction error {e.loss:.4f}, judged right {e.accuracy:.3f}"
        return f"accuracy {e.accuracy:.3f}, loss {e.loss:.4f}"

    print(
        f"wrote {args.out}: {result.manifest.model_id} v1 ({task.value}) pretrained on "
        f"{result.trained_rows:,} rows of {args.data}, {result.steps:,} steps; on "
        f"{result.held_out:,} held-out rows: {figures(result.before)} -> "
        f"{figures(result.after)}; content hash {result.manifest.content_hash.hex()[:16]}"
    )
    return 0


def run_inspect(args: argparse.Namespace) -> int:

    try:
        data = args.file.read_bytes()
    except OSError as exc:
        raise ConfigError("FILE", f"cannot read {args.file}: {exc.strerror or exc}") from None
    print(format_model(data, str(args.file)))
    return 0


def _shape(shape: tuple[int, ...]) -> str:
    return "[" + ",".join("?" if d < 0 else str(d) for d in shape) + "]"


def format_model(data: bytes, name: str) -> str:
    """The `inspect` report: what a field engineer needs to know about one model file."""
    from fleetlearn.shared import tflite

    info = tflite.describe_model(data)
    lines = [f"{name}: {info.size:,} bytes, TFLite schema {info.schema_version}"]

    lines.append("signatures:")
    for sig in info.signatures:
        ins = ", ".join(f"{t.name}: {t.dtype}{_shape(t.shape)}" for t in sig.inputs)
        outs = ", ".join(f"{t.name}: {t.dtype}{_shape(t.shape)}" for t in sig.outputs)
        lines.append(f"  {sig.key}({ins}) -> {outs}")

    counts = Counter(op for sg in info.subgraphs for op in sg.ops)
    kind = f"custom: {', '.join(info.custom_ops)}" if info.custom_ops else "all builtin"
    lines.append(f"ops ({len(info.op_codes)} kinds, {kind}):")
    lines.append("  " + ", ".join(f"{op} x{n}" for op, n in sorted(counts.items())))
    subgraphs = []
    for index, sg in enumerate(info.subgraphs):
        tag = " [initializer]" if index == info.initializer else ""
        subgraphs.append(f"{sg.name or index}{tag} ({len(sg.ops)} ops)")
    lines.append("subgraphs: " + ", ".join(subgraphs))

    lines.append(f"variables ({len(info.variables)}):")
    width = max((len(v.name) for v in info.variables), default=4)
    for var in info.variables:
        where = f"buffer #{var.buffer}" if var.buffer is not None else "not a constant"
        note = f"  SHARED with {', '.join(var.shared_with)}" if var.shared_with else ""
        lines.append(
            f"  {var.name:<{width}}  {var.dtype}{_shape(var.shape):<12} {where}, "
            f"{var.nbytes:,} bytes{note}"
        )

    manifest = tflite.read_manifest(data)
    if manifest is None:
        lines.append("manifest: none (not built by `fleetlearn model build`)")
    else:
        ok = tflite.content_hash(data) == manifest.content_hash
        lines.append(
            f"manifest: {manifest.model_id} v{manifest.version}, {manifest.task.value}, "
            f"{manifest.parameter_count:,} parameters in {len(manifest.layout)} weights"
        )
        lines.append(
            f"  content hash {manifest.content_hash.hex()} "
            + ("(matches the file)" if ok else "(DOES NOT MATCH the file: patched or corrupt)")
        )
        if manifest.labels:
            lines.append(f"  labels: {', '.join(manifest.labels)}")
        lines.append(
            "  layout: " + ", ".join(f"{w.name}{_shape(w.shape)}" for w in manifest.layout)
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------ aggregator


def register_aggregator(sub: Any) -> None:
    a = sub.add_parser(
        "aggregator",
        help="run the fleet's aggregator: rounds, secure aggregation, signed releases",
        description=(
            "Run federated rounds for one fleet over MQTT: select cohorts, drive SecAgg+ (or "
            "plain robust aggregation), publish each new signed model release. Settings come "
            "from --config (TOML), then FLEETLEARN_<SECTION>_<KEY> environment variables, then "
            "--set section.key=value and the flags below; --print-config shows the result."
        ),
    )
    a.add_argument("--config", type=Path, help="TOML settings file")
    a.add_argument("--broker", help="mqtt://HOST:PORT (broker.url)")
    a.add_argument("--fleet", help="fleet id (fleet.id)")
    a.add_argument("--fleet-dir", help="provisioned fleet directory (fleet.dir)")
    a.add_argument("--state-dir", help="sqlite + model files (state.dir)")
    a.add_argument("--rounds", help="rounds to run, 0 = until stopped (rounds.count)")
    a.add_argument("--mode", help="secure, plain, async or async-secure (rounds.mode)")
    a.add_argument("--cohort", help="devices per round (rounds.cohort)")
    a.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any setting, e.g. --set compression.density=0.05 (repeatable)",
    )
    a.add_argument("--print-config", action="store_true", help="print the settings and exit")
    a.set_defaults(handler=run_aggregator)


_FLAG_KEYS = {
    "broker": "broker.url",
    "fleet": "fleet.id",
    "fleet_dir": "fleet.dir",
    "state_dir": "state.dir",
    "rounds": "rounds.count",
    "mode": "rounds.mode",
    "cohort": "rounds.cohort",
}


def load_settings(args: argparse.Namespace, env: dict[str, str]) -> Any:
    from fleetlearn.aggregator.config import AggregatorSettings
    from fleetlearn.shared import settings

    text = None if args.config is None else settings.read_text(args.config, "--config")
    sets = settings.parse_sets(args.set)
    for attr, key in _FLAG_KEYS.items():
        value = getattr(args, attr)
        if value is not None:
            sets[key] = str(value)
    loaded = settings.load(
        AggregatorSettings, toml_text=text, source=str(args.config), env=env, sets=sets
    )
    loaded.engine_config()  # validates the cross-field rules now, with the key named
    loaded.optimizer_config()
    return loaded


def run_aggregator(args: argparse.Namespace) -> int:
    import asyncio
    import contextlib
    import os
    import signal
    import sys

    from fleetlearn.aggregator.service import AggregatorService, RoundSummary
    from fleetlearn.shared import fleetdir as prov
    from fleetlearn.shared import settings as settings_mod
    from fleetlearn.transport import check_ca_file

    loaded = load_settings(args, dict(os.environ))
    if args.print_config:
        print(settings_mod.to_toml(loaded), end="")
        return 0
    if loaded.broker.ca_file:
        check_ca_file(loaded.broker.ca_file, "broker.ca_file")
    creds = prov.load_aggregator(loaded.fleet.dir)
    registry = prov.load_registry(loaded.fleet.dir)

    def report(summary: RoundSummary) -> None:
        m = summary.metrics
        acc, mae = m.get("accuracy"), m.get("mae")
        print(
            f"round {summary.round_id}: {summary.state}"
            + (
                f" -> model v{summary.new_version}"
                if summary.new_version
                else f" ({m.get('reason')})"
            )
            + f", {m.get('survivors', 0)}/{m.get('cohort', 0)} devices"
            + (f", accuracy {acc:.3f}" if isinstance(acc, float) else "")
            + (f", mean absolute error {mae:.4g}" if isinstance(mae, float) else "")
            + f", {m.get('duration_s', 0):.1f} s",
            flush=True,
        )

    service = AggregatorService(loaded, creds, registry, on_round=report)

    signals = 0

    def on_signal() -> None:
        # The first SIGINT/SIGTERM stops cleanly (a running round is aborted and recorded);
        # a second one does not wait for that. The state directory survives a hard stop.
        nonlocal signals
        signals += 1
        if signals == 1:
            print("stopping (signal again to stop at once)", file=sys.stderr, flush=True)
            service.stop()
        else:
            print("stopped at once", file=sys.stderr, flush=True)
            os._exit(130)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, on_signal)
        await service.run()
        if service.budget_spent:
            print(f"stopped: {service.budget_spent}", flush=True)

    print(
        f"aggregator for fleet {loaded.fleet.id} -> {loaded.broker.url} "
        f"({loaded.rounds.mode}, cohort {loaded.rounds.cohort}); Ctrl-C to stop",
        flush=True,
    )
    asyncio.run(main())
    return 0
