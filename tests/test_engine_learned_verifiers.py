"""Learned verifiers (sam3_train/engine/learned/, audit.py): training learns a separable case through
the real ``fit-verifier`` CLI and configs (on Sam3CLI: safe checkpoint I/O, preemption), the Verifier
contract inside a VerifierChain, examples with hand-counted labels, the engine stage resumed after
an interruption, one clear error for a bad checkpoint, and the audit of a chain on hand-made proposals."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from conftest import write_shards
from PIL import Image

from sam3_train.data import rle as rle_ops
from sam3_train.engine import (Candidate, ExhaustivityVerifier, HardNegativeMiner, ScoreVerifier, StabilityVerifier,
                               VerifierChain)
from sam3_train.engine.audit import verifier_quality
from sam3_train.engine.candidates import candidate_record
from sam3_train.atomic import write_json_atomic
from sam3_train.engine.learned import (
    Examples,
    LearnedExhaustivityVerifier,
    LearnedMaskVerifier,
    bind_round_verifiers,
    fit_verifier,
    load_examples,
    make_examples,
)
from sam3_train.engine.learned.features import mask_pixels, mask_stats, phrase_tokens
from sam3_train.engine.manifest import EXAMPLES_FILES, PROPOSALS, PROPOSED
from sam3_train.engine.proposal_files import ProposalFileWriter

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]
REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO / "configs" / "verifiers" / "base.yaml"  # read first, then one of the two overlays
MV_CONFIG, EV_CONFIG = REPO / "configs" / "verifiers" / "mv.yaml", REPO / "configs" / "verifiers" / "ev.yaml"
MV_FILE, EV_FILE = EXAMPLES_FILES["mask"], EXAMPLES_FILES["exhaustivity"]
H = W = 32


# ---------------------------------------------------------------------------------------- crafted data
def red_square_scene(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A dark noisy image with one red square: (image [3, H, W] uint8, its mask, the mask shifted off it)."""
    image = (torch.rand(3, H, W, generator=gen) * 60).to(torch.uint8)
    side = int(torch.randint(6, 12, (1,), generator=gen))
    y, x = (int(v) for v in torch.randint(0, H - side, (2,), generator=gen))
    image[0, y:y + side, x:x + side] = 220
    mask = torch.zeros(H, W, dtype=torch.bool)
    mask[y:y + side, x:x + side] = True
    shifted = torch.roll(mask, shifts=side if y + 2 * side <= H else -side, dims=0)
    return image, mask, shifted


def separable_rows(n: int, seed: int) -> Examples:
    """n scenes, each an accepted true mask and a rejected shifted one (no detector statistics)."""
    gen, rows = torch.Generator().manual_seed(seed), Examples("mask")
    for i in range(n):
        image, mask, shifted = red_square_scene(gen)
        masks = torch.stack([mask, shifted])
        rows.add(mask_pixels(image, masks), torch.cat([mask_stats(m[None]) for m in masks]), [1.0, 0.0],
                 key=f"s{seed}_{i:04d}", phrase="red square", source="crafted")
    return rows


def accuracy(module, rows: dict) -> float:
    with torch.no_grad():
        p = module.eval()({"pixels": rows["pixels"], "stats": rows["stats"],
                           "tokens": phrase_tokens(rows["phrases"])}).sigmoid()
    return float(((p >= 0.5).float() == rows["labels"]).float().mean())


def box(x0, y0, x1, y1) -> torch.Tensor:
    m = torch.zeros(H, W, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def instance(mask: torch.Tensor) -> dict:
    ys, xs = mask.nonzero(as_tuple=True)
    return {"box": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)],
            "rle": rle_ops.encode(mask.numpy().astype(np.uint8))}


def png(image: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, format="PNG")
    return buf.getvalue()


def candidate(key: str, phrase: str, scores: list[float], masks: list[torch.Tensor], presence: float = 0.9):
    n = len(scores)
    stack = torch.stack(masks) if n else torch.zeros(0, H, W, dtype=torch.bool)
    return Candidate(key=key, phrase=phrase, height=H, width=W, presence=presence,
                     scores=torch.tensor(scores, dtype=torch.float32).reshape(n), boxes=torch.zeros(n, 4),
                     masks=stack, masks_loose=stack, masks_tight=stack, flip_masks=stack)


# One labelled image: "square" (exhaustive) has A and B, "circle" (not exhaustive) has C, "star" is absent.
A, B, C = box(2, 2, 10, 10), box(20, 20, 28, 28), box(2, 20, 8, 26)
A_DUP, B_NEAR, JUNK = box(3, 2, 10, 9), box(20, 21, 28, 28), box(12, 12, 18, 18)  # IoU with A 0.77, with B 0.88


def hand_made(tmp_path: Path) -> tuple[list[str], Path]:
    """(labelled shard paths, proposals folder) of the image above with its hand-made proposals."""
    image = torch.full((3, H, W), 30, dtype=torch.uint8)
    for m in (A, B):
        image[0][m] = 220
    image[2][C] = 220
    meta = {"image_id": 0, "width": W, "height": H, "queries": [
        {"phrase": "square", "exhaustive": True, "instances": [instance(A), instance(B)]},
        {"phrase": "circle", "exhaustive": False, "instances": [instance(C)]},
        {"phrase": "star", "exhaustive": True, "instances": []}]}
    labelled = write_shards(tmp_path / "labelled", "labelled", {"img0": meta}, png(image))
    folder = tmp_path / "proposals-rank000"
    folder.mkdir()
    pairs = [candidate("img0", "square", [0.9, 0.8, 0.65, 0.6], [A, A_DUP, JUNK, B_NEAR]),
             candidate("img0", "circle", [0.9, 0.5], [C, JUNK]),
             candidate("img0", "star", [0.4], [JUNK], presence=0.2)]
    with ProposalFileWriter(folder / PROPOSALS) as out:
        out.write({"key": "img0", "height": H, "width": W, "pairs": [candidate_record(c) for c in pairs]})
    return labelled, folder


def labelled_scenes(out_dir: Path, n: int, seed: int) -> list[str]:
    """n red-square scenes as labelled shards: "red square" exhaustive with its one instance."""
    gen, samples, images = torch.Generator().manual_seed(seed), {}, {}
    for i in range(n):
        image, mask, _ = red_square_scene(gen)
        samples[f"r{seed}_{i:04d}"] = {"image_id": i, "width": W, "height": H, "queries": [
            {"phrase": "red square", "exhaustive": True, "instances": [instance(mask)]}]}
        images[f"r{seed}_{i:04d}"] = png(image)
    from sam3_train.data.shards import ShardSink

    with ShardSink(out_dir=out_dir, prefix="labelled", max_count=1000) as sink:
        for key, meta in samples.items():
            sink.write(key, images[key], "png", meta)
    return sorted(str(p) for p in out_dir.glob("labelled-*.tar"))


def fit(config: Path, examples: Path, save_to: Path, steps: int) -> None:
    fit_verifier(["--config", str(BASE_CONFIG), "--config", str(config), f"--data.examples={examples}",
                  f"--save_to={save_to}", f"--trainer.max_steps={steps}", "--trainer.enable_model_summary=false"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An MV trained (through the CLI and configs/verifiers/base.yaml + mv.yaml) on the separable case, an EV on
    examples made from labelled red-square scenes; run in their own folder (the configs' log paths)."""
    root = tmp_path_factory.mktemp("learned")
    before = Path.cwd()
    import os

    os.chdir(root)
    try:
        separable_rows(96, seed=0).write(root / "mv-train.pt")
        separable_rows(32, seed=1).write(root / "mv-test.pt")
        fit(MV_CONFIG, root / "mv-train.pt", root / "mv.ckpt", steps=60)
        scenes = labelled_scenes(root / "scenes", 24, seed=2)
        counts = make_examples(out_dir=root / "examples", labelled=scenes, proposals=[])
        fit(EV_CONFIG, root / "examples" / EV_FILE, root / "ev.ckpt", steps=40)
    finally:
        os.chdir(before)
    return SimpleNamespace(root=root, mv=root / "mv.ckpt", ev=root / "ev.ckpt", counts=counts)


# ---------------------------------------------------------------------------------------- training
def test_training_learns_accept_versus_shifted_masks(trained):
    from sam3_train.engine.learned import VerifierModule

    held_out = load_examples(trained.root / "mv-test.pt")
    torch.manual_seed(0)
    untrained = accuracy(VerifierModule(kind="mask"), held_out)
    assert 0.3 <= untrained <= 0.7  # chance: half accepts, half rejects
    assert accuracy(LearnedMaskVerifier(checkpoint=str(trained.mv))._module, held_out) >= 0.95
    assert (trained.root / "runs" / "verifier_mv" / "csv").is_dir()  # the config's own logger wrote


class TrainerProbe(L.Callback):
    """Writes what the fit's trainer was built with (its checkpoint I/O, its callbacks) to ``out``."""

    def __init__(self, out: str):
        self.out = out

    def on_fit_start(self, trainer, pl_module) -> None:
        Path(self.out).write_text(json.dumps({"checkpoint_io": type(trainer.strategy.checkpoint_io).__name__,
                                              "callbacks": [type(c).__name__ for c in trainer.callbacks]}))


def test_fit_verifier_is_built_on_the_cli_class_of_fit(trained, tmp_path, monkeypatch, capsys):
    """``sam3-train fit-verifier`` (the console's route) gets what ``sam3-train fit`` gets: atomic,
    safely loaded checkpoints, preemption handling, a checked --ckpt_path, suggested options."""
    from sam3_train.checkpointing import load_checkpoint_file
    from sam3_train.console import main as sam3_train

    monkeypatch.chdir(tmp_path)
    probe = {"class_path": f"{__name__}.TrainerProbe", "init_args": {"out": str(tmp_path / "trainer.json")}}
    base = ["fit-verifier", "--config", str(BASE_CONFIG), "--config", str(MV_CONFIG),
            f"--data.examples={trained.root / 'mv-train.pt'}", "--trainer.max_steps=2",
            "--trainer.enable_model_summary=false"]
    with pytest.raises(SystemExit) as done:
        sam3_train([*base, f"--save_to={tmp_path / 'mv.ckpt'}", f"--trainer.callbacks=[{json.dumps(probe)}]"])
    assert done.value.code == 0
    built = json.loads((tmp_path / "trainer.json").read_text())
    assert built["checkpoint_io"] == "SafeCheckpointIO" and "Preemption" in built["callbacks"]
    saved = load_checkpoint_file(tmp_path / "mv.ckpt")
    assert saved["global_step"] == 2 and saved["hyper_parameters"]["kind"] == "mask"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["mv.ckpt", "trainer.json"]  # no partial left

    with pytest.raises(SystemExit, match=r"--ckpt_path: .*missing\.ckpt"):
        sam3_train([*base, f"--ckpt_path={tmp_path / 'missing.ckpt'}"])
    with pytest.raises(SystemExit):
        sam3_train([*base, "--data.exampels=x.pt"])
    assert "Did you mean 'data.examples'?" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- the Verifier contract
def test_learned_verifiers_in_a_chain_are_verifiers(trained):
    gen = torch.Generator().manual_seed(5)
    image, mask, shifted = red_square_scene(gen)
    c = candidate("00000001_img", "red square", [0.9, 0.8], [mask, shifted])
    mv = LearnedMaskVerifier(checkpoint=str(trained.mv))
    ev = LearnedExhaustivityVerifier(checkpoint=str(trained.ev))
    verdict = mv(c, image=image)
    assert verdict.keep.dtype == torch.bool and verdict.keep.tolist() == [True, False] and verdict.exhaustive is None
    first, again = mv.probabilities(c, image=png(image)), mv.probabilities(c, image=image)
    assert torch.equal(first, again)  # eval mode, no randomness; bytes and tensors give the same input
    e = ev(c, image=image)
    assert e.keep.tolist() == [True, True] and isinstance(e.exhaustive, bool)

    chain = VerifierChain(verifiers=[ScoreVerifier(min_score=0.5), mv, ev])
    verified = chain(c, image=png(image))
    assert verified.keep.tolist() == [True, False] and verified.rejected_by == [None, "learned_mask"]
    assert verified.kept == {"score": 2, "learned_mask": 1, "learned_exhaustivity": 1}
    assert verified.exhaustive is False  # a mask check dropped an instance the score check kept
    assert chain.thresholds()["learned_mask"] == {"checkpoint": str(trained.mv), "min_prob": 0.5}
    chain.images = {c.key: image}  # what the write stage sets (learned.ShardImages)
    assert chain(c).keep.tolist() == [True, False]
    with pytest.raises(ValueError, match="needs the image of 00000001_img"):
        VerifierChain(verifiers=[mv])(c)
    assert mv(candidate("k", "red square", [], [])).keep.shape == (0,)


def test_a_bad_checkpoint_gives_one_clear_error(trained, tmp_path):
    with pytest.raises(ValueError, match=r"LearnedMaskVerifier: cannot load checkpoint .*missing\.ckpt.*fit-verifier"):
        LearnedMaskVerifier(checkpoint=str(tmp_path / "missing.ckpt"))
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"cannot load checkpoint .*junk\.ckpt"):
        LearnedExhaustivityVerifier(checkpoint=str(tmp_path / "junk.ckpt"))
    with pytest.raises(ValueError, match="holds no mask verifier"):
        LearnedMaskVerifier(checkpoint=str(trained.ev))  # an EV checkpoint where an MV is expected
    with pytest.raises(ValueError, match="no checkpoint"):
        LearnedMaskVerifier()(candidate("k", "x", [0.9], [A]), image=torch.zeros(3, H, W, dtype=torch.uint8))


# ---------------------------------------------------------------------------------------- examples
def test_examples_from_proposals_and_ground_truth_have_the_expected_labels(tmp_path):
    labelled, folder = hand_made(tmp_path)
    counts = make_examples(out_dir=tmp_path / "ex", labelled=labelled, proposals=[folder], seed=0)
    mv, ev = load_examples(tmp_path / "ex" / MV_FILE), load_examples(tmp_path / "ex" / EV_FILE)

    def labels(rows, phrase, source):
        return [int(v) for v, p, s in zip(rows["labels"], rows["phrases"], rows["sources"])
                if p == phrase and s == f"labelled/{source}"]

    # square: A claims A, its duplicate finds A claimed, junk matches nothing, B_NEAR claims B.
    assert labels(mv, "square", "proposals") == [1, 0, 0, 1]
    assert labels(mv, "circle", "proposals") == [1]  # not exhaustive: its unmatched junk is no reject
    assert labels(mv, "star", "proposals") == [0]
    # ground truth: A and B accepted; shifted and eroded copies of each and the two merges rejected;
    # C accepted, its shifted and eroded copies rejected.
    assert labels(mv, "square", "ground_truth") == [1, 1, 0, 0, 0, 0, 0, 0]
    assert labels(mv, "circle", "ground_truth") == [1, 0, 0]
    assert mv["pixels"].shape[1:] == (4, 32, 32) and mv["stats"][:, 0].tolist().count(1.0) == 4 + 1 + 1
    # EV, square, sets in sorted order: kept at >= 0.7 {A, A_DUP}: B missed; at >= 0.3 / 0.5 all four;
    # the matched set {A, B_NEAR}. Star: the matched (empty) set and {JUNK} both cover nothing: complete.
    assert labels(ev, "square", "proposals") == [0, 1, 1] and labels(ev, "star", "proposals") == [1, 1]
    assert labels(ev, "square", "ground_truth") == [1, 0] and labels(ev, "star", "ground_truth") == [1]
    assert labels(ev, "circle", "proposals") == labels(ev, "circle", "ground_truth") == []  # not exhaustive
    assert counts["mask"]["by_source"]["labelled/proposals"] == {"accept": 3, "reject": 3}
    # The same inputs give the same bytes (a resumed stage equals an uninterrupted one).
    make_examples(out_dir=tmp_path / "again", labelled=labelled, proposals=[folder], seed=0)
    assert (tmp_path / "again" / MV_FILE).read_bytes() == (tmp_path / "ex" / MV_FILE).read_bytes()


# ---------------------------------------------------------------------------------------- audit
def test_audit_scores_any_chain_on_the_same_proposals(tmp_path, trained):
    labelled, folder = hand_made(tmp_path)
    chain = VerifierChain(verifiers=[ScoreVerifier(min_score=0.7)])
    q = verifier_quality(proposals=[folder], labelled=labelled, chain=chain)
    # square: kept A, A_DUP; correct A, B_NEAR. star: JUNK dropped. circle: not exhaustive, not scored.
    assert q["mask"] == {"proposals": 5, "kept": 2, "correct": 2, "kept_correct": 1, "true": 2,
                         "precision": 0.5, "recall": 0.5, "reachable": 1.0}
    # square said exhaustive, B missing: wrong; star said exhaustive with nothing kept: right.
    assert q["exhaustivity"] == {"pairs": 2, "right": 1, "said": 2, "said_right": 1, "complete": 1,
                                 "accuracy": 0.5, "precision": 0.5, "recall": 1.0}
    assert q["images"] == 1 and q["pairs"] == 2
    none = verifier_quality(proposals=[folder], labelled=labelled, chain=chain, max_images=0)  # a sample's bound
    assert none["images"] == 0 and none["pairs"] == 0 and none["mask"]["proposals"] == 0
    heuristic = VerifierChain(verifiers=[ScoreVerifier(min_score=0.5), ExhaustivityVerifier(low=0.2, high=0.7)])
    learned = VerifierChain(verifiers=[ScoreVerifier(min_score=0.5), LearnedMaskVerifier(checkpoint=str(trained.mv)),
                                       LearnedExhaustivityVerifier(checkpoint=str(trained.ev))])
    for chain in (heuristic, learned):
        result = verifier_quality(proposals=[folder], labelled=labelled, chain=chain)
        assert result["pairs"] == 2 and result["mask"]["proposals"] == 5 and result["verifiers"] == chain.names
    # Mined hard negatives against the labels: with every instance dropped and a wide firing band, square
    # (top 0.9, presence 0.9; it has A and B) is mined wrongly and star (top 0.4, presence 0.2; absent)
    # rightly; the presence guard at 0.3 keeps only star, at 0.2 or below neither (presence must be below it).
    strict = VerifierChain(verifiers=[ScoreVerifier(min_score=0.95)])
    miner = HardNegativeMiner(fire_low=0.05, fire_high=0.95, max_presence=1.0)
    negatives = verifier_quality(proposals=[folder], labelled=labelled, chain=strict, miner=miner)["negatives"]
    # the chain's own negatives (exhaustive, nothing kept): square (wrong) and star (right)
    assert negatives == {"absent_pairs": 1, "chain": {"pairs": 2, "wrong": 1, "wrong_share": 0.5},
                         "as_given": {"mined": 2, "wrong": 1, "wrong_share": 0.5},
                         "max_presence 0.05": {"mined": 0, "wrong": 0, "wrong_share": None},
                         "max_presence 0.1": {"mined": 0, "wrong": 0, "wrong_share": None},
                         "max_presence 0.2": {"mined": 0, "wrong": 0, "wrong_share": None},
                         "max_presence 0.3": {"mined": 1, "wrong": 0, "wrong_share": 0.0},
                         # no verifier doubted either pair
                         "skip_doubted": {"mined": 2, "wrong": 1, "wrong_share": 0.5}}
    assert verifier_quality(proposals=[folder], labelled=labelled, chain=strict)["negatives"] is None
    # The guard: an exhaustivity band (0.5, 0.7) doubts square (0.65 and 0.6 in it), not star (0.4). As
    # given, both are mined (square wrongly); skipping doubted pairs, only star.
    doubting = VerifierChain(verifiers=[ScoreVerifier(min_score=0.95), ExhaustivityVerifier(low=0.5, high=0.7)])
    guarded = verifier_quality(proposals=[folder], labelled=labelled, chain=doubting, miner=miner)["negatives"]
    assert guarded["as_given"] == {"mined": 2, "wrong": 1, "wrong_share": 0.5}
    assert guarded["skip_doubted"] == {"mined": 1, "wrong": 0, "wrong_share": 0.0}
    assert guarded["chain"] == {"pairs": 1, "wrong": 0, "wrong_share": 0.0}  # star only: square was doubted
    # A pair a mask check emptied is no doubt: square's instances dropped by a stability check that can
    # never pass (IoU >= 1.01) is still mined with the guard (no exhaustivity verifier judged it).
    masking = VerifierChain(verifiers=[ScoreVerifier(min_score=0.5), StabilityVerifier(min_iou=1.01)])
    emptied = verifier_quality(proposals=[folder], labelled=labelled, chain=masking, miner=miner)["negatives"]
    assert emptied["as_given"] == emptied["skip_doubted"] == {"mined": 2, "wrong": 1, "wrong_share": 0.5}
    assert HardNegativeMiner(skip_doubted=True).params()["skip_doubted"] is True
    assert "skip_doubted" not in miner.params()  # rounds recorded before the option keep their thresholds


# ---------------------------------------------------------------------------------------- the engine stage
class FakeEngine:
    """What learned.stage.run_stage uses of rounds.Engine; its propose writes the hand-made proposals."""

    def __init__(self, work: Path, labelled: list[str], proposals: Path, settings):
        self.work, self.labelled, self.source, self.settings, self.proposed = work, labelled, proposals, settings, 0

    def round_dir(self, index: int) -> Path:
        return self.work / f"round-{index:03d}"

    def propose(self, folder, checkpoint, inputs, *, pool, phrases, kill_point):
        import shutil

        assert pool == self.labelled and phrases is None
        self.proposed += 1
        shutil.copytree(self.source, Path(folder) / "proposals-rank000")
        write_json_atomic(Path(folder) / PROPOSED, {"inputs": inputs, "world_size": 1, "counts": {}})


def stage_settings(tmp_path: Path):
    from sam3_train.engine.settings import DataEngine, VerifierTraining

    small = {}
    for name, config in (("mv", MV_CONFIG), ("ev", EV_CONFIG)):  # the repo overlays, shorter, logging under tmp
        text = config.read_text().replace("max_steps: 600", "max_steps: 8").replace("max_steps: 400", "max_steps: 8")
        small[name] = tmp_path / f"{name}.yaml"
        small[name].write_text(text)
    training = VerifierTraining(base_config=str(BASE_CONFIG), mask_config=str(small["mv"]),
                                exhaustivity_config=str(small["ev"]))
    return DataEngine(verifier_training=training, verifiers=[ScoreVerifier(min_score=0.5), LearnedMaskVerifier()])


def test_verifiers_stage_resumes_from_its_files_after_an_interruption(tmp_path, monkeypatch):
    from sam3_train.engine.learned import stage

    labelled, proposals = hand_made(tmp_path)
    checkpoint = tmp_path / "previous.ckpt"
    checkpoint.write_bytes(b"weights of round k-1")
    runs = {}
    for name, interrupt in (("a", False), ("b", True)):
        work = tmp_path / name
        engine = FakeEngine(work, labelled, proposals, stage_settings(tmp_path))
        round_dir = engine.round_dir(1)
        round_dir.mkdir(parents=True)
        monkeypatch.chdir(work)
        if interrupt:  # the first verifier fit dies (a kill at the same point: SAM3_ENGINE_KILL_AT=verifiers-examples)
            def crash(*args, **kwargs):
                raise RuntimeError("killed")

            monkeypatch.setattr(stage, "run_fit_verifier", crash)
            with pytest.raises(RuntimeError, match="killed"):
                stage.run_stage(engine, round_dir, checkpoint, 1)
            folder = round_dir / "verifiers"
            assert (folder / MV_FILE).is_file() and not (round_dir / "verifiers.json").exists()
            made = {p: p.stat().st_mtime_ns for p in (folder / MV_FILE, folder / EV_FILE)}
            monkeypatch.undo()
            monkeypatch.chdir(work)
            calls = []
            monkeypatch.setattr(stage, "make_examples", lambda **kw: calls.append(kw))
        stage.run_stage(engine, round_dir, checkpoint, 1)
        marker = __import__("json").loads((round_dir / "verifiers.json").read_text())
        runs[name] = (round_dir, marker)
        if interrupt:
            assert engine.proposed == 1 and calls == []  # proposals and examples reused
            assert {p: p.stat().st_mtime_ns for p in made} == made
    (_, a), (b_dir, b) = runs["a"], runs["b"]
    assert a["checkpoints"] == b["checkpoints"]  # the same bytes: seeded fits of the same examples
    assert a["held_out"] == b["held_out"] and a["examples"] == b["examples"]
    assert a["examples"]["mask"]["rows"] == 6 + 11  # the hand-made test's proposal and ground-truth rows
    assert set(a["held_out"]) == {"mask", "exhaustivity"} and a["held_out"]["mask"]["rows"] > 0
    # The write stage's chain: the learned verifier without a checkpoint gets the round's own.
    chain = stage_settings(tmp_path).chain()
    bind_round_verifiers(chain, b_dir)
    assert chain.verifiers[1]._module is not None and chain.thresholds()["learned_mask"]["checkpoint"] is None
    with pytest.raises(FileNotFoundError, match="mask.ckpt does not exist"):
        bind_round_verifiers(stage_settings(tmp_path).chain(), tmp_path / "elsewhere")
    # A precision target instead of a threshold: calibrated on the round's held-out proposals when bound.
    from sam3_train.engine.learned.data import VerifierData
    from sam3_train.engine.learned.module import precision_threshold

    targeted = LearnedMaskVerifier(target_precision=0.5)
    with pytest.raises(ValueError, match="was not calibrated"):
        targeted._threshold()
    chain = VerifierChain(verifiers=[targeted])
    bind_round_verifiers(chain, b_dir)
    direct = precision_threshold(targeted._module, VerifierData(examples=str(b_dir / "verifiers" / MV_FILE)), 0.5)
    assert targeted.calibration == direct and direct["target"] == 0.5 and direct["min_score"] == 0.0
    gated = LearnedMaskVerifier(target_precision=0.5)  # behind a score check: calibrated on what passes it
    bind_round_verifiers(VerifierChain(verifiers=[ScoreVerifier(min_score=0.3), gated]), b_dir)
    assert gated.calibration == precision_threshold(
        gated._module, VerifierData(examples=str(b_dir / "verifiers" / MV_FILE)), 0.5, min_score=0.3)
    assert gated.calibration["rows"] <= direct["rows"] and gated.calibration["min_score"] == 0.3
    assert chain.thresholds()["learned_mask"] == {"checkpoint": None, "min_prob": 0.5, "target_precision": 0.5}
    with pytest.raises(ValueError, match="leave checkpoint unset"):
        LearnedMaskVerifier(checkpoint=str(b_dir / "verifiers" / "mask.ckpt"), target_precision=0.9)


def test_precision_threshold_is_the_lowest_cut_that_reaches_the_target():
    """Held-out rows made from proposals (evidence 1) only, sorted by probability: the deepest cut whose
    precision reaches the target, tied probabilities cut together; by hand."""
    from torch import nn

    from sam3_train.engine.learned.module import precision_threshold

    class Fixed(nn.Module):  # the "net": each row's logit is given
        def forward(self, batch):
            return batch["logit"]

    def data(rows):  # (probability, label, evidence)
        parts = {"val": [{"logit": torch.logit(torch.tensor(p)), "labels": torch.tensor(float(y)),
                          "stats": torch.tensor([float(e), 0.0])} for p, y, e in rows]}
        return SimpleNamespace(setup=lambda stage: None, parts=parts)

    rows = [(0.95, 0, 0), (0.9, 1, 1), (0.8, 1, 1), (0.7, 0, 1), (0.6, 1, 1), (0.5, 0, 1), (0.4, 1, 1)]
    # precision at each cut: 1/1, 2/2, 2/3, 3/4, 3/5, 4/6 (the 0.95 row is ground truth: left out)
    found = precision_threshold(Fixed(), data(rows), 0.75)
    assert found["min_prob"] == pytest.approx(0.6) and found["precision"] == 0.75 and found["recall"] == 0.75
    assert found["rows"] == 6 and found["positives"] == 4
    assert precision_threshold(Fixed(), data(rows), 1.0)["min_prob"] == pytest.approx(0.8)
    tied = [(0.9, 1, 1), (0.7, 0, 1), (0.7, 1, 1)]  # 0.7 keeps both tied rows: 2/3
    assert precision_threshold(Fixed(), data(tied), 0.75)["min_prob"] == pytest.approx(0.9)
    assert precision_threshold(Fixed(), data([(0.9, 0, 1)]), 0.5)["min_prob"] is None  # no positive


def test_learned_verifiers_without_checkpoint_need_verifier_training():
    from sam3_train.engine.settings import DataEngine

    with pytest.raises(ValueError, match="LearnedMaskVerifier name no checkpoint"):
        DataEngine(verifiers=[ScoreVerifier(min_score=0.5), LearnedMaskVerifier()])
    assert "verifier_training" not in DataEngine().thresholds()  # the heuristic default is unchanged


def test_the_learned_overlay_replaces_the_heuristic_chain_and_trains_the_verifiers():
    """configs/engine/shapes_learned.yaml on top of the demonstration's files: its list replaces the
    heuristic chain whole, and the stage trains from the shipped verifier configs."""
    from sam3_train.engine.settings import load_config

    files = [REPO / "configs" / "shapes_tiny.yaml", REPO / "configs" / "engine" / "shapes.yaml",
             REPO / "configs" / "engine" / "shapes_learned.yaml"]
    _, settings = load_config(files)
    assert settings.chain().names == ["score", "learned_mask", "learned_exhaustivity"]
    assert settings.chain().needs_image
    assert (REPO / settings.verifier_training.base_config) == BASE_CONFIG
    assert (REPO / settings.verifier_training.mask_config) == MV_CONFIG
    assert (REPO / settings.verifier_training.exhaustivity_config) == EV_CONFIG
    _, heuristic = load_config(files[:2])
    assert "learned_mask" not in heuristic.chain().names and heuristic.verifier_training is None
    overlays = [REPO / "configs" / "engine" / f"shapes_{name}.yaml" for name in ("learned_precision", "instances_only")]
    _, instances = load_config([*files, *overlays])  # the MV at its precision target, then instances only
    assert instances.chain().names == ["score", "learned_mask", "instances_only"]
    assert instances.chain().verifiers[1].target_precision == 0.85 and instances.negatives.max_per_image == 0


# ---------------------------------------------------------------------------------------- through the engine's front
@pytest.mark.slow
def test_engine_round_with_learned_verifiers_killed_in_the_stage_then_rerun(tmp_path, shapes_root):
    """tools/data_engine.py with engine.verifier_training and a learned chain: killed (SIGKILL) after the
    stage made its examples, rerun: the stage resumes (proposals and examples kept) and the round
    finishes with shards written by the round's own verifiers."""
    import json

    from test_engine_rounds import engine_config, run_tool

    from sam3_train.engine import read_manifest, round_finished

    config = engine_config(tmp_path, shapes_root)
    learned = json.dumps([
        {"class_path": "sam3_train.engine.verifiers.ScoreVerifier", "init_args": {"min_score": 0.25}},
        {"class_path": "sam3_train.engine.learned.LearnedMaskVerifier", "init_args": {"min_prob": 0.5}},
        {"class_path": "sam3_train.engine.learned.LearnedExhaustivityVerifier", "init_args": {"min_prob": 0.5}}])
    short = {"base_config": str(BASE_CONFIG), "mask_config": str(tmp_path / "mv.yaml"),
             "exhaustivity_config": str(tmp_path / "ev.yaml")}
    for name, source in (("mv.yaml", MV_CONFIG), ("ev.yaml", EV_CONFIG)):
        (tmp_path / name).write_text(source.read_text().replace("max_steps: 600", "max_steps: 5")
                                     .replace("max_steps: 400", "max_steps: 5"))
    args = ["run", *config, "--quiet", f"engine.verifiers={learned}", f"engine.verifier_training={json.dumps(short)}"]
    rc, output = run_tool(args, tmp_path / "run", kill_at="verifiers-examples", check=False)
    assert rc == -9, output[-3000:]
    stage = tmp_path / "run" / "engine" / "round-001" / "verifiers"
    made = (stage / MV_FILE).stat().st_mtime_ns
    _, output = run_tool(args, tmp_path / "run")
    round_dir = tmp_path / "run" / "engine" / "round-001"
    assert "verifiers: propose with" not in output and (stage / MV_FILE).stat().st_mtime_ns == made
    assert round_finished(round_dir) and (stage / "mask.ckpt").is_file() and (round_dir / "verifiers.json").is_file()
    manifest = read_manifest(round_dir)
    assert set(manifest["counts"]["kept"]) == {"score", "learned_mask", "learned_exhaustivity"}
    assert manifest["thresholds"]["verifier_training"]["mask_config"] == short["mask_config"]
