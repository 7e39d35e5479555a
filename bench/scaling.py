"""How evaluation cost grows: cases per second against number of cases, backbone size and K.

    python bench/scaling.py --config configs/edit/ike.yaml [--config ...] \
        [--cases 25 100 400] [--widths 32 64 128] [--ks 1 3 10]

Every point runs EditEval under a Lightning Trainer as `edit.py test` does. The cases of the
configured data file are cycled (with fresh ids) to reach large counts, so the per-case work is
the real work; only the number of distinct records is limited by the file.
"""

from __future__ import annotations

import argparse
import time

from torch.utils.data import Dataset

from backbones import LlavaVLM, TinySpec
from core.case import EditCase
from datamodules.dataset import with_id_prefix
from lightning_modules.edit_cli import EditCLI, edit_trainer
from lightning_modules.edit_eval import EditEval


class Cycled(Dataset):
    """`n` cases drawn cyclically from `base`, each with a unique id."""

    def __init__(self, base: Dataset, n: int) -> None:
        self.base, self.n = base, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> EditCase:
        return with_id_prefix(self.base[i % len(self.base)], f"r{i // len(self.base)}", i)

    def case_ids(self) -> list[str]:
        ids = self.base.case_ids()
        return [f"r{i // len(ids)}/{ids[i % len(ids)]}" for i in range(self.n)]


def cases_per_second(
    configs: list[str], n: int, width: int | None = None, k: int | None = None, accelerator: str = "cpu"
) -> float:
    args = [a for c in configs for a in ("--config", c)] + ["--trainer.logger", "false"]
    if k is not None:
        args += ["--model.mode", "sequential", "--data.batch_size", str(k)]
    cli = EditCLI(args=args, run=False)
    module: EditEval = cli.model
    if width is not None:
        spec = TinySpec(
            hidden_size=width, vision_hidden_size=width, num_layers=max(2, width // 32), num_heads=4
        )
        keep = {k: module.hparams[k] for k in ("mode", "protocol", "generation", "max_hops")}
        module = EditEval(LlavaVLM(tiny=spec), module.editor, **keep)
    data = cli.datamodule
    data.setup("test")
    data.dataset = Cycled(data.dataset, n)
    trainer = edit_trainer(accelerator=accelerator)
    start = time.perf_counter()
    trainer.test(module, datamodule=data, verbose=False)
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", required=True)
    parser.add_argument("--cases", type=int, nargs="*", default=[24, 96])
    parser.add_argument("--widths", type=int, nargs="*", default=[32, 64, 128])
    parser.add_argument("--ks", type=int, nargs="*", default=[1, 3, 6])
    parser.add_argument("--base-cases", type=int, default=24, help="cases for the width and K series")
    parser.add_argument("--accelerator", default="cpu", choices=("cpu", "gpu"))
    args = parser.parse_args(argv)
    print("\ncases/s against number of cases")
    for n in args.cases:
        print(f"  N={n:<6} {cases_per_second(args.config, n, accelerator=args.accelerator):8.2f}")
    print("cases/s against backbone width (tiny LLaVA, layers = width / 32)")
    for w in args.widths:
        print(
            f"  width={w:<4} {cases_per_second(args.config, args.base_cases, width=w, accelerator=args.accelerator):8.2f}"
        )
    print("cases/s against K (sequential editing)")
    for k in args.ks:
        print(
            f"  K={k:<6} {cases_per_second(args.config, args.base_cases, k=k, accelerator=args.accelerator):8.2f}"
        )


if __name__ == "__main__":
    main()
