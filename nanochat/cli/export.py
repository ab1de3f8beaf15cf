"""Export a training checkpoint to GGUF (and the ``.mhc`` sidecar for static mHC).

    python -m nanochat.export CHECKPOINT --out model.gguf [--arch nanochat-ternary|bitnet]
                              [--mhc model.mhc | --no-mhc] [--f16] [--name NAME]

``CHECKPOINT`` is a step directory (``.../checkpoints/step-000400``) or a run directory (its
newest checkpoint is used). BitLinear weights are quantized exactly as the training forward
does. For a static-mHC config the ``.mhc`` sidecar (SPEC section 3) is written too, by default
next to the GGUF with the suffix ``.mhc``; ``--mhc PATH`` moves it, ``--no-mhc`` skips it.

Both files are written to temporary names and renamed into place only when everything
succeeded, so a failed export leaves no partial output. Bad input is one ``error:`` line on
stderr and exit code 2. Layout and metadata: ``docs/gguf.md``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nanochat.cli.common import EXIT_BAD_INPUT
from nanochat.io.atomic import atomic_path
from nanochat.io.gguf import ARCH, BITNET_ARCH, loaded_from_checkpoint, mhc_records, write_loaded


def sidecar_path(out: Path, mhc_arg: str | None, no_mhc: bool, model_cfg) -> Path | None:
    """Where the ``.mhc`` sidecar goes (None: not written); ValueError when it cannot be written."""
    static = model_cfg.n_streams > 1 and model_cfg.mhc_mode == "static"
    if no_mhc:
        return None
    if mhc_arg is not None and not static:
        why = "n_streams = 1 (no mHC)" if model_cfg.n_streams == 1 else "mhc_mode = 'dynamic' (per-token coefficients)"
        raise ValueError(f"--mhc {mhc_arg}: the checkpoint's config has {why}, and an .mhc file holds static mHC only")
    if not static:
        return None
    return Path(mhc_arg) if mhc_arg is not None else out.with_suffix(".mhc")


def export(checkpoint, out, arch=ARCH, mhc=None, no_mhc=False, float_type="f32", name=None):
    """Export ``checkpoint`` to ``out`` (and the sidecar); returns ``(WriteSummary, mhc path or None, records)``."""
    from nanochat.io.mhc import write_mhc

    out = Path(out)
    if out.is_dir():
        raise ValueError(f"--out {out}: the path is a directory; give a file name such as {out / 'model.gguf'}")
    if not out.parent.is_dir():
        raise ValueError(f"--out {out}: the directory {out.parent} does not exist")
    loaded = loaded_from_checkpoint(checkpoint)
    model = loaded.config.model
    mhc_path = sidecar_path(out, mhc, no_mhc, model)
    if mhc_path is not None:
        if mhc_path.resolve() == out.resolve():
            raise ValueError(f"--mhc {mhc_path}: the sidecar cannot overwrite the GGUF output")
        if not mhc_path.parent.is_dir():
            raise ValueError(f"--mhc {mhc_path}: the directory {mhc_path.parent} does not exist")
    records = mhc_records(loaded) if mhc_path is not None else []

    wrote_new_sidecar = False
    try:
        with atomic_path(out, suffix=".part") as tmp:  # errors name OUT, the file gets the umask's mode
            summary = write_loaded(tmp, loaded, arch=arch, float_type=float_type, name=name, label=str(out))
            if mhc_path is not None:
                wrote_new_sidecar = not mhc_path.exists()
                write_mhc(mhc_path, records, model.n_streams)  # atomic on its own
    except BaseException:
        if wrote_new_sidecar and mhc_path.exists():
            mhc_path.unlink()
        raise
    summary.path = str(out)
    return summary, mhc_path, records


def _describe(summary) -> str:
    types = ", ".join(f"{n} {t}" for t, n in sorted(summary.tensor_types.items()))
    return (f"wrote {summary.path}: architecture {summary.arch}, {summary.n_tensors} tensors ({types}), "
            f"{summary.n_bytes:,} bytes, ternary weights as {summary.ternary_encoding}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nanochat.export",
                                     description="Export a nanochat-ternary checkpoint to GGUF (docs/gguf.md).")
    parser.add_argument("checkpoint", help="checkpoint step directory, or a run directory (newest checkpoint)")
    parser.add_argument("--out", required=True, help="output .gguf file")
    parser.add_argument("--arch", choices=(ARCH, BITNET_ARCH), default=ARCH,
                        help="GGUF architecture (bitnet: plain configs only, llama.cpp tensor names)")
    sidecar = parser.add_mutually_exclusive_group()
    sidecar.add_argument("--mhc", default=None, help="where to write the .mhc sidecar (static mHC; default: OUT with .mhc)")
    sidecar.add_argument("--no-mhc", action="store_true", help="do not write the .mhc sidecar")
    parser.add_argument("--f16", action="store_true", help="store 2-D float tensors (embedding, router) as F16 (lossy)")
    parser.add_argument("--name", default=None, help="general.name of the model (default: nanochat-ternary)")
    args = parser.parse_args(argv)
    try:
        summary, mhc_path, records = export(args.checkpoint, args.out, arch=args.arch, mhc=args.mhc,
                                            no_mhc=args.no_mhc, float_type="f16" if args.f16 else "f32",
                                            name=args.name)
    except (ValueError, OSError) as exc:
        message = " ".join(str(exc).split())  # one line, whatever the message holds
        print(f"error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(_describe(summary))
    if mhc_path is not None:
        n_streams = len(records[0]["pre_logits"])
        print(f"wrote {mhc_path}: {len(records)} static mHC sub-layers, n_streams {n_streams}, "
              f"{mhc_path.stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
