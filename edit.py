"""`python edit.py test --config configs/edit/<method>.yaml`: edit a VLM and score the edits."""

from lightning_modules.edit_cli import EditCLI


def main(args: list[str] | None = None) -> EditCLI:
    return EditCLI(args=args)


if __name__ == "__main__":
    main()
