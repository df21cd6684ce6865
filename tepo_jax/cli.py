"""The `tepo_jax` command. Subcommands register themselves in `SUBCOMMANDS`.

    tepo_jax size --model Qwen2.5-7B --mesh 1,8,1 --devices 8 --device-memory 95GB \
        --slots 64 --cache-len 4096 --batch 8 --seq-len 4096 --remat
    tepo_jax size --config configs/tpu_v5p.py:qwen25_7b_grpo --model Qwen2.5-7B --devices 32 \
        --device-kind tpu-v5p      # model, mesh and workload of each phase from the config

Exit codes: 0 = fits, 1 = does not fit (MemoryBudgetError), 2 = bad arguments.
"""
from __future__ import annotations

# JAX and the model code are imported inside the subcommands, not here: `tepo_jax --help`,
# a bad flag or a bad config answers at once instead of after importing JAX (seconds).
import argparse
import sys
from typing import Callable, Optional, Sequence

def _mesh(text: str):
    from tepo_jax.sharding import MeshConfig
    try:
        data, fsdp, tensor = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--mesh wants data,fsdp,tensor (e.g. 1,8,1 or 1,-1,2), got {text!r}")
    return MeshConfig(data, fsdp, tensor)


def _dtype(text: str):
    import jax.numpy as jnp

    from tepo_jax.models.config import dtype_named
    try:
        return jnp.dtype(dtype_named(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_size_parser(sub) -> None:
    p = sub.add_parser("size", help="per-device memory of a model + mesh + workload; exit 1 if it does not fit",
                       description="Per-device memory of params, optimizer state, gradients, KV cache and "
                                   "activations (see tepo_jax/sizing.py for the formulas).")
    p.add_argument("--config", default=None, help="an experiment config (configs/X.py, configs/X.py:VARIANT for a "
                                                  "family): model, mesh and the workload of each phase come from "
                                                  "it; the workload flags are ignored")
    p.add_argument("--model", default=None, help="preset name, e.g. Qwen2.5-7B (tepo_jax.models.presets); with "
                                                 "--config, the shape to use instead of the config's model")
    p.add_argument("--mesh", type=_mesh, default=None, help="data,fsdp,tensor; one may be -1 (default 1,-1,1)")
    p.add_argument("--devices", type=int, default=None, help="global device count (default: local jax devices)")
    p.add_argument("--device-memory", default=None, help="per-device memory, e.g. 95GB or 16GiB")
    p.add_argument("--device-kind", default=None, help="look the memory up: tpu-v4, tpu-v5e, tpu-v5p, "
                                                       "tpu-v6e, h100, h200, a100-40gb, a100-80gb")
    p.add_argument("--headroom", type=float, default=0.9, help="usable fraction of device memory")
    p.add_argument("--dtype", type=_dtype, default="bfloat16", help="compute dtype")
    p.add_argument("--param-dtype", type=_dtype, default="bfloat16")
    p.add_argument("--master-fp32", action="store_true", help="fp32 master params in the optimizer")
    p.add_argument("--moment-dtype", type=_dtype, default="float32", help="AdamW moment dtype")
    p.add_argument("--cache-dtype", type=_dtype, default=None, help="KV cache dtype (default: --dtype)")
    p.add_argument("--slots", type=int, default=0, help="sampler slots (global)")
    p.add_argument("--cache-len", type=int, default=0, help="KV cache length per slot")
    p.add_argument("--batch", type=int, default=1, help="train micro-batch (global sequences)")
    p.add_argument("--seq-len", type=int, default=1024, help="train sequence length")
    p.add_argument("--logits-chunk", type=int, default=None, help="tokens per logits chunk")
    p.add_argument("--optimizer", choices=("adamw", "none"), default="adamw",
                   help="none: frozen weights only (reference model, sampler-only process)")
    p.add_argument("--remat", action="store_true", help="rematerialise each block in the backward pass")
    p.set_defaults(func=run_size)


# (flag, attribute, smallest value): counts and lengths of `tepo_jax size`; None = not given
_SIZE_MINIMA = (("--devices", "devices", 1), ("--batch", "batch", 1), ("--seq-len", "seq_len", 1),
                ("--slots", "slots", 0), ("--cache-len", "cache_len", 0), ("--logits-chunk", "logits_chunk", 1))


def check_size_args(args: argparse.Namespace) -> None:
    """ValueError naming the flag for a count, length, headroom or memory size that cannot be
    meant (a negative device count would print negative GiB and "fits")."""
    from tepo_jax import sizing

    for flag, attr, low in _SIZE_MINIMA:
        value = getattr(args, attr)
        if value is not None and value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    for flag, check, value in (("--headroom", sizing.check_headroom, args.headroom),
                               ("--device-memory", sizing.parse_bytes, args.device_memory)):
        try:
            if value is not None:
                check(value)
        except ValueError as e:
            raise ValueError(f"{flag}: {e}") from None


def run_size(args: argparse.Namespace) -> int:
    from tepo_jax import sizing

    try:
        check_size_args(args)
        if args.config:
            return _size_config(args)
        if not args.model:
            raise ValueError("pass --model PRESET or --config configs/X.py[:VARIANT]")
        return _size_model(args)
    except sizing.MemoryBudgetError as e:
        print(f"does not fit: {e}")
        return 1
    except (KeyError, ValueError) as e:  # unknown preset, bad mesh or memory size, unreadable checkpoint
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2


def _devices_and_mesh(args, mesh_cfg):
    import jax
    from tepo_jax import sizing

    devices = jax.device_count() if args.devices is None else args.devices
    return devices, sizing.abstract_mesh(mesh_cfg, devices)


def _size_model(args) -> int:
    from tepo_jax import sizing
    from tepo_jax.models.presets import preset
    from tepo_jax.sharding import MeshConfig

    cfg = preset(args.model, dtype=args.dtype, param_dtype=args.param_dtype)
    devices, mesh = _devices_and_mesh(args, args.mesh or MeshConfig())
    workload = sizing.Workload(batch=args.batch, seq_len=args.seq_len, slots=args.slots,
                               cache_len=args.cache_len, remat=args.remat, master_fp32=args.master_fp32,
                               moment_dtype=args.moment_dtype, cache_dtype=args.cache_dtype,
                               logits_chunk=args.logits_chunk, optimizer=args.optimizer)
    print(f"{args.model}: {cfg.num_params / 1e9:.2f}B params, mesh {dict(mesh.shape)} over {devices} devices")
    est = sizing.check_fits(cfg, mesh, workload, args.device_memory, args.headroom, args.device_kind)
    print(est.table())
    return 0


def _size_config(args) -> int:
    """Each phase the config runs, sized with its own model, mesh and workload."""
    import jax.numpy as jnp
    from tepo_jax import policy, sizing
    from tepo_jax.config import validate
    from tepo_jax.models.presets import preset
    from tepo_jax.sharding import MeshConfig

    config = validate(load_config_file(args.config))
    if args.model:
        m = config.model
        cfg = preset(args.model, dtype=jnp.dtype(m.dtype), param_dtype=jnp.dtype(m.param_dtype))
    else:
        cfg = policy.target_model_config(config)
    m = config.mesh
    devices, mesh = _devices_and_mesh(args, args.mesh or MeshConfig(m.data, m.fsdp, m.tensor))
    print(f"{args.config}: {cfg.num_params / 1e9:.2f}B params, mesh {dict(mesh.shape)} over {devices} devices")
    if config.model.tiny and not args.model:
        print(f"note: tiny model sized with a vocabulary of {policy.TINY_VOCAB_BOUND} (an upper bound)")
    failed = 0
    for phase, workload in policy.config_workloads(config).items():
        print(f"-- {phase}: batch {workload.batch} x {workload.seq_len} tokens, {workload.slots} sampler slots")
        try:
            print(sizing.check_fits(cfg, mesh, workload, args.device_memory, args.headroom,
                                    args.device_kind).table())
        except sizing.MemoryBudgetError as e:
            print(f"does not fit: {e}")
            failed = 1
    return failed


def split_config_arg(arg: str) -> tuple[str, Optional[str]]:
    """'configs/tpu_v5p.py:qwen25_7b_grpo' -> ('configs/tpu_v5p.py', 'qwen25_7b_grpo'); the variant
    is None without a colon (ml_collections' config flag splits it the same way)."""
    path, colon, variant = arg.partition(":")
    return path, (variant if colon else None)


def load_config_file(arg: str):
    """The config an experiment file builds: `get_config()` of configs/X.py, or, for a family of
    configs (a file with a `VARIANTS` table, e.g. configs/tpu_v5p.py), `get_config(VARIANT)` for
    configs/X.py:VARIANT. A missing file, or a variant that is missing, unknown or given to a file
    without variants, is a ValueError of one line (listing the variants there are)."""
    import difflib
    import importlib.util
    import os

    path, variant = split_config_arg(arg)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such config file")
    spec = importlib.util.spec_from_file_location("tepo_jax_config_file", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    variants = getattr(module, "VARIANTS", None)
    if variants is None:
        if variant is not None:
            raise ValueError(f"{path} has no variants: pass --config {path} without ':{variant}'")
        return module.get_config()
    if variant in variants:
        return module.get_config(variant)
    names = ", ".join(variants)
    if not variant:
        raise ValueError(f"{path} is a family of configs: pass --config {path}:VARIANT, VARIANT one of {names}")
    close = difflib.get_close_matches(variant, list(variants), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise ValueError(f"{path}: unknown variant {variant!r}{hint}; the variants are {names}")


def config_arg(argv: Sequence[str]) -> Optional[str]:
    """The value of `--config=X` or `--config X` in `argv`, or None."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def flag_error(argv: Sequence[str], exc: Exception) -> str:
    """One line for a failed flag parse: the first `--config.a.b=...` override that names no
    field of the config file, else the first line of what the parser said."""
    from tepo_jax.config import unknown_field
    try:
        config = load_config_file(config_arg(argv) or "")
    except Exception:  # noqa: BLE001 — the file itself is the problem; the parser's message says so
        config = None
    for arg in argv:
        if config is not None and arg.startswith("--config."):
            message = unknown_field(config, arg[len("--config."):].split("=", 1)[0])
            if message:
                return message
    return first_line(exc)


def first_line(exc: Exception) -> str:
    text = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)  # KeyError: no repr quotes
    return (text.strip() or type(exc).__name__).splitlines()[0]


def parse_config_flags(argv: list[str], flag_values=None) -> list[str]:
    """absl's flag parsing for a program with an ml_collections `--config` file flag
    (tepo_jax.train, tepo_jax.evaluate): `--config=configs/X.py[:VARIANT]` then `--config.a.b=v`
    overrides. A missing file, a missing or unknown variant, a bad flag or override exits with
    one `error: ...` line instead of absl's traceback or usage text."""
    from absl import flags

    arg = config_arg(argv[1:])
    if arg is not None:
        try:  # the file and its variant first: config_flags would fail later, in a traceback
            load_config_file(arg)
        except Exception as e:  # noqa: BLE001 — a broken config file is one line too
            sys.exit(f"error: {first_line(e)}")
    try:
        return (flags.FLAGS if flag_values is None else flag_values)(argv)
    except Exception as e:  # noqa: BLE001 — ml_collections raises Attribute/Key/Type/ValueError
        sys.exit(f"error: {flag_error(argv[1:], e)}")


# name -> function adding a subparser (with `func` set); the lead's train/eval commands go here.
SUBCOMMANDS: dict[str, Callable] = {"size": add_size_parser}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tepo_jax", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS.values():
        add(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
