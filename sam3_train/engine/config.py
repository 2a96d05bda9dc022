"""Engine configs: one ``sam3-train`` YAML with a ``DataEngine`` callback entry (settings.py).

    cfg, settings = load_config("configs/engine_shapes.yaml", ["trainer.max_steps=50", "engine.rounds=1"])

Overrides are OmegaConf dot-list entries (``key=value``, values parsed as YAML); ``engine.<name>``
sets the DataEngine entry's ``init_args.<name>``. A round's fit gets a copy of the config with its
own output paths and training shards (:func:`round_fit_config`), written next to the round's
checkpoint and instantiated through ``sam3_train.cli.Sam3CLI``, the same parser and links as
``sam3-train fit``.
"""

from __future__ import annotations

import copy
import importlib
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from sam3_train.engine.settings import DataEngine

ENGINE_CLASS = "sam3_train.engine.settings.DataEngine"


def _as_list(value: Any) -> list[Any]:
    if value is None or isinstance(value, bool):
        return []
    return value if isinstance(value, list) else [value]


def engine_entry(cfg: dict[str, Any], path: str | Path = "<config>") -> dict[str, Any]:
    """The config's DataEngine callback entry (a dict with class_path / init_args)."""
    entries = [c for c in _as_list(cfg.get("trainer", {}).get("callbacks"))
               if isinstance(c, dict) and c.get("class_path", "").rsplit(".", 1)[-1] == "DataEngine"]
    if len(entries) != 1:
        raise ValueError(f"{path}: an engine config needs exactly one trainer.callbacks entry with class_path "
                         f"{ENGINE_CLASS}, found {len(entries)}")
    entries[0].setdefault("init_args", {})
    return entries[0]


def load_config(path: str | Path, overrides: list[str] | None = None) -> tuple[dict[str, Any], DataEngine]:
    """The resolved config (a plain dict) with overrides applied, and its typed engine settings."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config {path} does not exist")
    conf = OmegaConf.load(path)
    plain, engine = [], []
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        (engine if item.startswith("engine.") else plain).append(item)
    if plain:
        conf = OmegaConf.merge(conf, OmegaConf.from_dotlist(plain))
    cfg = OmegaConf.to_container(conf, resolve=True)
    entry = engine_entry(cfg, path)
    for item in engine:
        key, value = item[len("engine."):].split("=", 1)
        entry["init_args"][key] = yaml.safe_load(value)
    return cfg, instantiate_settings(entry)


def instantiate_settings(entry: dict[str, Any]) -> DataEngine:
    """A DataEngine from its config entry, type-checked by jsonargparse (as LightningCLI would)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--engine", type=DataEngine)
    namespace = parser.parse_object({"engine": {"class_path": ENGINE_CLASS, "init_args": entry["init_args"]}})
    build = getattr(parser, "instantiate", None) or parser.instantiate_classes
    return build(namespace).engine


def init_args(section: Any) -> dict[str, Any]:
    """A component's arguments whether the config gives them flat or as class_path / init_args."""
    if isinstance(section, dict) and "class_path" in section:
        return dict(section.get("init_args") or {})
    return dict(section or {})


def instantiate(value: Any) -> Any:
    """A ``{"class_path", "init_args"}`` dict as an object (trainer strategies, plugins); others as is."""
    if not (isinstance(value, dict) and "class_path" in value):
        return value
    module, _, name = value["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    return cls(**{k: instantiate(v) for k, v in (value.get("init_args") or {}).items()})


def device_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    """The trainer settings every engine Trainer shares: where and how the processes run."""
    trainer = cfg.get("trainer", {})
    keys = ("accelerator", "devices", "num_nodes", "strategy", "precision")
    return {k: instantiate(trainer[k]) for k in keys if k in trainer}


def round_fit_config(cfg: dict[str, Any], *, round_dir: Path, train_shards: str | None, name: str,
                     test_shards: str | None = None) -> dict[str, Any]:
    """The config of one round's fit: every written path under ``round_dir/fit``, the round's training
    shards (None: the config's), the W&B run named ``name``; everything else as the engine config says."""
    out = copy.deepcopy(cfg)
    fit_dir = str(round_dir / "fit")
    trainer = out.setdefault("trainer", {})
    trainer["default_root_dir"] = fit_dir
    for logger in _as_list(trainer.get("logger")):
        if isinstance(logger, dict):
            args = logger.setdefault("init_args", {})
            args["save_dir"] = fit_dir
            if logger.get("class_path", "").endswith("WandbLogger"):
                args["name"] = name
    for callback in _as_list(trainer.get("callbacks")):
        if isinstance(callback, dict) and callback.get("class_path", "").endswith("ModelCheckpoint"):
            callback.setdefault("init_args", {})["dirpath"] = f"{fit_dir}/checkpoints"
    data = out.setdefault("data", {})
    args = data.setdefault("init_args", {}) if "class_path" in data else data
    if train_shards is not None:
        args["train_shards"] = train_shards
    if test_shards is not None:
        args["test_shards"] = test_shards
    out.pop("ckpt_path", None)
    return out


def write_config(cfg: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(cfg, sort_keys=False, width=120))
    tmp.replace(path)
