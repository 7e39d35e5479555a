"""`python train.py fit --config configs/train/<x>.yaml`: train what must be trained.

The model and data module are chosen in the YAML with `class_path`/`init_args` (trainable editors:
`EditorTraining` + `EditorTrainData`; the world backbone: `WorldBackboneTraining` + `WorldTrainData`);
`configs/train/base.yaml` is read first. See `lightning_modules/train_cli.py`.
"""

from lightning_modules.train_cli import TrainCLI


def main(args: list[str] | None = None) -> TrainCLI:
    return TrainCLI(args=args)


if __name__ == "__main__":
    main()
