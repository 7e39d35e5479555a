"""`python train.py fit --config configs/train/<x>.yaml`: train what must be trained.

The model and data module are chosen in the YAML with `class_path`/`init_args`, so one entry
point serves every trainable part (editor hypernetworks, SERAC's models, UniKE's encoders, the
world backbone) as each lands.
"""

from lightning.pytorch.cli import LightningCLI

from lightning_modules.config_errors import config_errors_named


def main(args: list[str] | None = None) -> LightningCLI:
    # Parse errors are raised rather than printed, so that the config file behind them is named.
    no_exit = {"exit_on_error": False}
    with config_errors_named(args):
        return LightningCLI(
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={**no_exit, "fit": no_exit},
        )


if __name__ == "__main__":
    main()
