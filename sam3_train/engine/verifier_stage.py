"""The round's ``verifiers`` stage: train the learned verifiers on the labelled set, between propose and
write, when ``engine.verifier_training`` is set (docs/data_engine.md, "Learned verifiers").

    round_dir/verifiers/
      proposals-rank000/ ...    the proposing model (round k-1's) on the labelled images, their own phrases
      proposals.json            that step's marker
      mv-examples.pt, ev-examples.pt     verifier_examples.make_examples (mv written last: both done)
      mask-config.yaml, mask/   the MV fit's config (engine.verifier_training.mask_config, outputs
                                redirected here, examples and save_to set) and its logs
      mask.ckpt                 the trained MV (written atomically at the end of its fit)
      exhaustivity-config.yaml, exhaustivity/, exhaustivity.ckpt     the same for EV
    round_dir/verifiers.json    the stage's marker: inputs, checkpoints {path, sha256}, example counts,
                                held-out accuracy of each verifier

Each step is skipped when its file exists, so a killed stage resumes at the step it was in (every
step's output depends only on its inputs: the fits are seeded by their configs). What the stage
depends on is recorded in ``verifiers/inputs.json``; when it differs on a re-run the folder is
cleared first. The write stage then binds the chain's learned verifiers that name no checkpoint to
``mask.ckpt`` / ``exhaustivity.ckpt`` (:func:`bind_round_verifiers`).

Multi-process runs: every rank proposes; rank 0 alone makes the examples and fits (tiny, CPU), in a
subprocess under DDP (a Lightning Trainer inside a running process group would join it); the others
wait at the barrier.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from sam3_train.cli import redirect_outputs
from sam3_train.dist import barrier, on_rank_zero, rank_and_world
from sam3_train.engine.manifest import (
    PROPOSED,
    fault_point,
    file_sha256,
    proposals_dir_name,
    read_json,
    write_json_atomic,
)
from sam3_train.engine.verifier_examples import EV_FILE, MV_FILE, make_examples

STAGE_DIR = "verifiers"
MARKER = "verifiers.json"
KINDS = ("mask", "exhaustivity")
DIST_VARS = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_PORT", "MASTER_ADDR")


def checkpoint_path(round_dir: str | os.PathLike, kind: str) -> Path:
    return Path(round_dir) / STAGE_DIR / f"{kind}.ckpt"


def verifier_config(config: str | os.PathLike, *, out_dir: Path, examples: Path, save_to: Path) -> dict[str, Any]:
    """A ``fit-verifier`` config file as a dict (OmegaConf-resolved), its outputs under ``out_dir``."""
    from omegaconf import OmegaConf

    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"verifier config {path} does not exist (engine.verifier_training)")
    cfg = redirect_outputs(OmegaConf.to_container(OmegaConf.load(path), resolve=True), out_dir)
    cfg.setdefault("data", {})["examples"] = str(examples)
    cfg["save_to"] = str(save_to)
    return cfg


def run_fit_verifier(config_path: Path, *, subprocess_run: bool) -> None:
    """``sam3-train fit-verifier --config config_path``, in this process or in a fresh one (DDP)."""
    if not subprocess_run:
        from sam3_train.engine.learned import fit_verifier

        fit_verifier(["--config", str(config_path)])
        return
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    proc = subprocess.run([sys.executable, "-m", "sam3_train.cli", "fit-verifier", "--config", str(config_path)],
                          env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"fit-verifier --config {config_path} failed (rc {proc.returncode}):\n"
                           f"{(proc.stdout + proc.stderr)[-4000:]}")


def stage_inputs(engine: Any, checkpoint: Path, index: int) -> dict[str, Any]:
    """What the stage's outputs depend on (recorded in its marker; rounds.py checks it on a re-run)."""
    settings = engine.settings
    training = settings.verifier_training
    reviewed = [str(engine.round_dir(i)) for i in range(1, index)] if training.reviewed else []
    inputs = {"checkpoint": on_rank_zero(lambda: {"path": str(checkpoint), "sha256": file_sha256(checkpoint)}),
              "labelled": engine.labelled, "reviewed_rounds": reviewed, "training": training.params(),
              "propose": settings.propose_params()}
    return json.loads(json.dumps(inputs))


def run_stage(engine: Any, round_dir: Path, checkpoint: Path, index: int) -> None:
    """The stage for round ``index`` of ``engine`` (rounds.Engine), proposing with ``checkpoint``."""
    training = engine.settings.verifier_training
    folder = round_dir / STAGE_DIR
    inputs = stage_inputs(engine, checkpoint, index)
    reviewed = inputs["reviewed_rounds"]

    def prepare() -> bool:
        recorded = read_json(folder / "inputs.json")
        if recorded is not None and recorded != inputs and folder.exists():
            shutil.rmtree(folder)  # made from other inputs: nothing in it can be reused
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(folder / "inputs.json", inputs)
        return (folder / PROPOSED).is_file()

    if not on_rank_zero(prepare):
        engine.propose(folder, checkpoint, {"checkpoint": inputs["checkpoint"], "labelled": engine.labelled},
                       pool=engine.labelled, phrases=None, kill_point="verifiers-propose")
    barrier()
    _, world = rank_and_world()

    def train() -> None:  # rank 0; an error there stops every rank (on_rank_zero)
        if not (folder / MV_FILE).is_file() or not (folder / EV_FILE).is_file():
            proposers = read_json(folder / PROPOSED)["world_size"]
            counts = make_examples(out_dir=folder, labelled=engine.labelled,
                                   proposals=[folder / proposals_dir_name(r) for r in range(proposers)],
                                   reviewed_rounds=reviewed, accept_iou=training.accept_iou,
                                   min_score=training.min_score, max_rejects_per_pair=training.max_rejects_per_pair,
                                   perturb=training.perturb, seed=training.seed)
            write_json_atomic(folder / "examples.json", counts)
        fault_point("verifiers-examples")
        configs = {"mask": training.mask_config, "exhaustivity": training.exhaustivity_config}
        for kind in KINDS:
            ckpt = checkpoint_path(round_dir, kind)
            if ckpt.is_file():
                continue
            examples = folder / (MV_FILE if kind == "mask" else EV_FILE)
            cfg = verifier_config(configs[kind], out_dir=folder / kind, examples=examples, save_to=ckpt)
            config_path = folder / f"{kind}-config.yaml"
            config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            if (folder / kind).exists():  # logs of a killed fit: it restarts from its first step
                shutil.rmtree(folder / kind)
            run_fit_verifier(config_path, subprocess_run=world > 1)
            fault_point(f"verifiers-{kind}")
        from sam3_train.engine.learned import VerifierData, load_verifier, score_examples

        held_out = {}
        for kind in KINDS:
            module = load_verifier(checkpoint_path(round_dir, kind), kind, "verifiers stage")
            data_args = copy.deepcopy(yaml.safe_load((folder / f"{kind}-config.yaml").read_text()).get("data", {}))
            held_out[kind] = score_examples(module, VerifierData(**data_args))
        write_json_atomic(round_dir / MARKER, {
            "inputs": inputs, "examples": read_json(folder / "examples.json"), "held_out": held_out,
            "checkpoints": {k: {"path": str(checkpoint_path(round_dir, k).relative_to(round_dir)),
                                "sha256": file_sha256(checkpoint_path(round_dir, k))} for k in KINDS}})

    on_rank_zero(train)
    barrier()
    fault_point("verifiers")


def bind_round_verifiers(chain: Any, round_dir: str | os.PathLike) -> None:
    """Point the chain's learned verifiers that name no checkpoint at the ones the round trained;
    fails naming the round when it trained none."""
    from sam3_train.engine.learned import LearnedExhaustivityVerifier, LearnedMaskVerifier

    for verifier in chain.verifiers:
        if isinstance(verifier, (LearnedMaskVerifier, LearnedExhaustivityVerifier)) and verifier.checkpoint is None:
            path = checkpoint_path(round_dir, verifier.kind)
            if not path.is_file():
                raise FileNotFoundError(f"{type(verifier).__name__} has no checkpoint and {path} does not exist: "
                                        "set its checkpoint or engine.verifier_training")
            verifier.bind(path)
