"""``dssgd plot``, ``dssgd export``, ``dssgd eval``: get results out of a run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dssgd.cli import connections
from dssgd.plot import plot_run
from shared.config import RunConfig
from shared.data import load_mnist, prepare
from shared.errors import ConfigError
from shared.lifecycle import EXIT_OK
from shared.models import build_model, set_flat
from shared.store import RunStore
from shared.store import connect as redis_connect
from shared.training import evaluate, labels_tensor


def _store_and_config(args: argparse.Namespace) -> tuple[RunStore, RunConfig]:
    store = RunStore(redis_connect(connections(args).redis_url), args.run_id)
    cfg = store.load_config()
    if cfg is None:
        raise ConfigError(f"run {args.run_id!r} does not exist (dssgd runs lists them)")
    return store, cfg


def title_of(cfg: RunConfig) -> str:
    return (
        f"{cfg.run_id}: {cfg.model}, N={cfg.participants}, {cfg.order}, "
        f"rule {cfg.effective_rule}, θu={cfg.theta_u}, θd={cfg.theta_d}"
    )


def write_plot(store: RunStore, cfg: RunConfig, out: Path) -> Path:
    points = store.metrics()
    if not points:
        raise ConfigError(f"run {cfg.run_id!r} has no accuracy measurements yet")
    return plot_run(points, out, title_of(cfg))


def _check_writable(out: Path) -> None:
    """Say in one line that a result cannot be written, before any work is done."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = out.parent / f".{out.name}.write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"cannot write {out}: {exc.strerror}; choose another --out") from None
    if out.is_dir():
        raise ConfigError(f"cannot write {out}: it is a directory; give a file name to --out")


def cmd_plot(args: argparse.Namespace) -> int:
    store, cfg = _store_and_config(args)
    out = Path(args.out) if args.out else Path(args.runs_dir) / cfg.run_id / "accuracy.png"
    _check_writable(out)
    print(write_plot(store, cfg, out))
    return EXIT_OK


def global_model(store: RunStore, cfg: RunConfig) -> torch.nn.Module:
    model = build_model(cfg.model)
    _, w, _ = store.read_params()
    set_flat(model, w.copy())
    return model


def cmd_export(args: argparse.Namespace) -> int:
    store, cfg = _store_and_config(args)
    out = Path(args.out) if args.out else Path(args.runs_dir) / cfg.run_id / "model.pt"
    _check_writable(out)
    model = global_model(store, cfg)
    # A file for the user's own use, never a wire format: plain tensors, loadable with
    # torch.load(weights_only=True).
    torch.save(model.state_dict(), out)
    (out.with_suffix(".json")).write_text(
        json.dumps({"model": cfg.model, "run": cfg.run_id, "version": store.read_params()[0]})
        + "\n"
    )
    print(
        f"wrote {out} ({cfg.model}); load it with shared.models.build_model({cfg.model!r})"
        ".load_state_dict(torch.load(path, weights_only=True))"
    )
    return EXIT_OK


def cmd_eval(args: argparse.Namespace) -> int:
    store, cfg = _store_and_config(args)
    if args.from_file:
        model = build_model(cfg.model)
        try:
            state = torch.load(args.from_file, weights_only=True)
            model.load_state_dict(state)
        except FileNotFoundError:
            raise ConfigError(f"{args.from_file} does not exist") from None
        except Exception as exc:  # a corrupt file can fail inside torch's loader in any way
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(
                f"cannot load {args.from_file} as a {cfg.model} state dict ({first[:200]}); "
                f"export one with `dssgd export {cfg.run_id}`"
            ) from None
    else:
        model = global_model(store, cfg)
    data = load_mnist(cfg.data)
    r = evaluate(model, prepare(data.test_x, cfg.model), labels_tensor(data.test_y))
    if args.json:
        print(
            json.dumps(
                {
                    "run_id": cfg.run_id,
                    "accuracy": r.accuracy,
                    "loss": r.loss,
                    "examples": r.examples,
                }
            )
        )
    else:
        print(
            f"{cfg.run_id}: test accuracy {r.accuracy:.4f}, loss {r.loss:.4f} "
            f"on {r.examples} MNIST test images"
        )
    return EXIT_OK
