"""`python -m world.build --config configs/world/demo.yaml --out data/world/demo`: write a world.

Cached: when OUT/manifest.json holds the same config digest, nothing is redrawn (pass --force to
rebuild). The same config writes byte-identical files, so a cached folder and a rebuilt one agree.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from world.config import WorldConfig, load_world_config
from world.generate import generate_world
from world.writers import write_world


def is_built(out: str | Path, config: WorldConfig) -> bool:
    manifest = Path(out) / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text()).get("digest") == config.digest()
    except json.JSONDecodeError:
        return False


def build_world(config: WorldConfig, out: str | Path, force: bool = False, verbose: bool = True) -> dict:
    """Write the world of `config` into `out` unless it is already there; returns the manifest."""
    out = Path(out)
    if not force and is_built(out, config):
        if verbose:
            print(f"world: {out} is up to date (digest {config.digest()})", flush=True)
        return json.loads((out / "manifest.json").read_text())
    start = time.perf_counter()
    # Remove only what a previous build wrote, so a stale image from an older config cannot linger.
    for name in ("images", "mmedit", "vlkeb"):
        if (out / name).exists():
            shutil.rmtree(out / name)
    out.mkdir(parents=True, exist_ok=True)
    manifest = write_world(generate_world(config), out)
    if verbose:
        n = manifest["n_entities"]
        print(
            f"world: wrote {out} in {time.perf_counter() - start:.1f}s: entities {n}, images {manifest['n_images']}, "
            f"withheld facts {manifest['n_withheld_facts']}, triplet capacity {manifest['triplet_capacity']}",
            flush=True,
        )
    return manifest


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", default=None, help="world YAML (configs/world/*.yaml); default sizes if left out"
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=None, help="override the config's seed")
    parser.add_argument("--force", action="store_true", help="rebuild even when the folder is up to date")
    args = parser.parse_args(argv)
    overrides = {} if args.seed is None else {"seed": args.seed}
    return build_world(load_world_config(args.config, **overrides), args.out, force=args.force)


if __name__ == "__main__":
    main()
