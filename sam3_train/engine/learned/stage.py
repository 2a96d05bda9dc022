"""The round's ``verifiers`` stage: train the learned verifiers on the labelled set, between propose and
write, when ``engine.verifier_training`` is set (docs/data_engine.md, "Learned verifiers").

    round_dir/verifiers/
      inputs.json               what the files below were made from
      proposals-rank000/ ...    the proposing model (round k-1's) on the labelled images, their own phrases
      proposals.json            that step's marker
      mv-examples.pt, ev-examples.pt     examples.make_examples (mv written last: both done)
      examples.json             their counts
      mask-config.yaml, mask/   the MV fit's config (engine.verifier_training's base_config and
                                mask_config read as one, outputs redirected here, examples and
                                save_to set) and its logs
      mask.ckpt                 the trained MV (written atomically at the end of its fit)
      exhaustivity-config.yaml, exhaustivity/, exhaustivity.ckpt     the same for EV
    round_dir/verifiers.json    the stage's marker: inputs, checkpoints {path, sha256}, example counts,
                                held-out accuracy of each verifier

Each step is skipped when its file exists, so a killed stage resumes at the step it was in (every
step's output depends only on its inputs: the fits are seeded by their configs). What the stage
depends on is recorded in ``verifiers/inputs.json``; when it differs on a re-run the folder is
cleared first. The write stage then binds the chain's learned verifiers that name no checkpoint to
``mask.ckpt`` / ``exhaustivity.ckpt`` (chain.bind_round_verifiers). The names: manifest.py.

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

from sam3_train.atomic import write_bytes_atomic, write_json_atomic
from sam3_train.cli import redirect_outputs
from sam3_train.dist import barrier, env_without_dist, on_rank_zero, rank_and_world
from sam3_train.engine.learned.chain import load_verifier
from sam3_train.engine.learned.cli import fit_verifier, read_verifier_config
from sam3_train.engine.learned.data import VerifierData
from sam3_train.engine.learned.examples import make_examples
from sam3_train.engine.learned.module import score_examples
from sam3_train.engine.manifest import (
    EXAMPLE_COUNTS,
    EXAMPLES_FILES,
    PROPOSED,
    VERIFIED,
    VERIFIER_INPUTS,
    VERIFIERS_DIR,
    fault_point,
    file_sha256,
    proposals_dir_name,
    read_json,
    verifier_checkpoint,
    verifier_config_name,
)

KINDS = ("mask", "exhaustivity")


def verifier_config(configs: list[str | os.PathLike], *, out_dir: Path, examples: Path, save_to: Path
                    ) -> dict[str, Any]:
    """The ``fit-verifier`` config files ``configs`` (base, then overlay) as one dict, its outputs under
    ``out_dir``, its examples and ``save_to`` set."""
    cfg = redirect_outputs(read_verifier_config(configs), out_dir)
    cfg.setdefault("data", {})["examples"] = str(examples)
    cfg["save_to"] = str(save_to)
    return cfg


def run_fit_verifier(config_path: Path, *, subprocess_run: bool) -> None:
    """``sam3-train fit-verifier --config config_path``, in this process or in a fresh one (DDP)."""
    if not subprocess_run:
        fit_verifier(["--config", str(config_path)])
        return
    proc = subprocess.run([sys.executable, "-m", "sam3_train.console", "fit-verifier", "--config", str(config_path)],
                          env=env_without_dist(), capture_output=True, text=True, check=False)
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
    folder = round_dir / VERIFIERS_DIR
    inputs = stage_inputs(engine, checkpoint, index)
    reviewed = inputs["reviewed_rounds"]

    def prepare() -> bool:
        recorded = read_json(folder / VERIFIER_INPUTS)
        if recorded is not None and recorded != inputs and folder.exists():
            shutil.rmtree(folder)  # made from other inputs: nothing in it can be reused
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(folder / VERIFIER_INPUTS, inputs)
        return (folder / PROPOSED).is_file()

    if not on_rank_zero(prepare):
        engine.propose(folder, checkpoint, {"checkpoint": inputs["checkpoint"], "labelled": engine.labelled},
                       pool=engine.labelled, phrases=None, kill_point="verifiers-propose")
    barrier()
    _, world = rank_and_world()

    def train() -> None:  # rank 0; an error there stops every rank (on_rank_zero)
        if not all((folder / name).is_file() for name in EXAMPLES_FILES.values()):
            proposers = read_json(folder / PROPOSED)["world_size"]
            counts = make_examples(out_dir=folder, labelled=engine.labelled,
                                   proposals=[folder / proposals_dir_name(r) for r in range(proposers)],
                                   reviewed_rounds=reviewed, accept_iou=training.accept_iou,
                                   min_score=training.min_score, max_rejects_per_pair=training.max_rejects_per_pair,
                                   perturb=training.perturb, seed=training.seed)
            write_json_atomic(folder / EXAMPLE_COUNTS, counts)
        fault_point("verifiers-examples")
        overlays = {"mask": training.mask_config, "exhaustivity": training.exhaustivity_config}
        for kind in KINDS:
            ckpt = verifier_checkpoint(round_dir, kind)
            if ckpt.is_file():
                continue
            cfg = verifier_config([training.base_config, overlays[kind]], out_dir=folder / kind,
                                  examples=folder / EXAMPLES_FILES[kind], save_to=ckpt)
            config_path = folder / verifier_config_name(kind)
            write_bytes_atomic(config_path, yaml.safe_dump(cfg, sort_keys=False).encode())
            if (folder / kind).exists():  # logs of a killed fit: it restarts from its first step
                shutil.rmtree(folder / kind)
            run_fit_verifier(config_path, subprocess_run=world > 1)
            fault_point(f"verifiers-{kind}")
        held_out = {}
        for kind in KINDS:
            module = load_verifier(verifier_checkpoint(round_dir, kind), kind, "verifiers stage")
            config = yaml.safe_load((folder / verifier_config_name(kind)).read_text())
            held_out[kind] = score_examples(module, VerifierData(**copy.deepcopy(config.get("data", {}))))
        write_json_atomic(round_dir / VERIFIED, {
            "inputs": inputs, "examples": read_json(folder / EXAMPLE_COUNTS), "held_out": held_out,
            "checkpoints": {k: {"path": str(verifier_checkpoint(round_dir, k).relative_to(round_dir)),
                                "sha256": file_sha256(verifier_checkpoint(round_dir, k))} for k in KINDS}})

    on_rank_zero(train)
    barrier()
    fault_point("verifiers")
