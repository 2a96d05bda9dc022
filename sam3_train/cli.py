"""``sam3-train``: the LightningCLI front (fit, validate, test, predict).

    sam3-train fit --config configs/shapes_tiny.yaml
    sam3-train validate --config configs/shapes_tiny.yaml --ckpt_path runs/shapes_tiny/checkpoints/last.ckpt
    sam3-train fit --config configs/shapes_tiny.yaml --print_config

Configs are OmegaConf YAML (``${...}`` interpolation within a file). Derived values are linked, not
repeated: the model's input size follows ``data.image_size``.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from sam3_train.data import Sam3DataModule
from sam3_train.lit import Sam3LitModule


class Sam3CLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.image_size", "model.image_size")


def main(args: list[str] | None = None) -> None:
    Sam3CLI(
        Sam3LitModule,
        Sam3DataModule,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
