"""``dssgd plot``, ``dssgd export``, ``dssgd eval``: get results out of a run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dssgd.options import connections
from dssgd.plot import plot_run
from dssgd.shared.config import RunConfig
from dssgd.shared.errors import ConfigError
from dssgd.shared.lifecycle import EXIT_OK
from dssgd.shared.models import set_flat
from dssgd.shared.store import RunStore
from dssgd.shared.store import connect as redis_connect
from dssgd.shared.tasks import central_test, load_task


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
    model = load_task(cfg.task).build_model()
    _, w, _ = store.read_params()
    set_flat(model, w.copy())  # parameters and buffers, by name (shared/models.py)
    return model


def write_state(state: dict[str, torch.Tensor], out: Path) -> list[Path]:
    """The state dict under the model's own names: a .pt file, and .safetensors when possible."""
    # A file for the user's own use, never a wire format: plain tensors, loadable with
    # torch.load(weights_only=True).
    torch.save(state, out)
    written = [out]
    try:
        from safetensors.torch import save_file
    except ImportError:
        return written
    save_file({k: v.contiguous() for k, v in state.items()}, str(out.with_suffix(".safetensors")))
    return [*written, out.with_suffix(".safetensors")]


def cmd_export(args: argparse.Namespace) -> int:
    store, cfg = _store_and_config(args)
    out = Path(args.out) if args.out else Path(args.runs_dir) / cfg.run_id / "model.pt"
    _check_writable(out)
    task = load_task(cfg.task)
    written = write_state(global_model(store, cfg).state_dict(), out)
    meta = {
        "task": cfg.task,
        "model": cfg.model,
        "run": cfg.run_id,
        "version": store.read_params()[0],
        "fingerprint": task.layout.fingerprint(),
        "tensors": task.layout.describe(),
    }
    out.with_suffix(".json").write_text(json.dumps(meta) + "\n")
    print(
        f"wrote {', '.join(map(str, written))} ({cfg.task}); load it with "
        f"dssgd.shared.tasks.load_task({cfg.task!r}).build_model()"
        ".load_state_dict(torch.load(path, weights_only=True))"
    )
    return EXIT_OK


def cmd_eval(args: argparse.Namespace) -> int:
    store, cfg = _store_and_config(args)
    task, model, test = central_test(cfg)
    if test is None:
        raise ConfigError(f"task {cfg.task} has no central test set (see dssgd status)")
    if args.from_file:
        try:
            state = torch.load(args.from_file, weights_only=True)
            model.load_state_dict(state)
        except FileNotFoundError:
            raise ConfigError(f"{args.from_file} does not exist") from None
        except Exception as exc:  # a corrupt file can fail inside torch's loader in any way
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(
                f"cannot load {args.from_file} as a {cfg.task} state dict ({first[:200]}); "
                f"export one with `dssgd export {cfg.run_id}`"
            ) from None
    else:
        model = global_model(store, cfg)
    with torch.inference_mode():
        m = task.metrics(model, test)
    acc, loss = m.get("accuracy", float("nan")), m.get("loss", float("nan"))
    if args.json:
        print(
            json.dumps(
                {"run_id": cfg.run_id, "accuracy": acc, "loss": loss, "examples": len(test)}
            )
        )
    else:
        print(
            f"{cfg.run_id}: test accuracy {acc:.4f}, loss {loss:.4f} "
            f"on {len(test)} test examples of {cfg.task}"
        )
    return EXIT_OK
