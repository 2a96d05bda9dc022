"""Shared fixtures: a small built-in shapes dataset (real shards) and one batch of it."""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest

# W&B never talks to a server in tests, and nothing leaks WANDB_MODE between tests.
os.environ.setdefault("WANDB_SILENT", "true")

SHAPES_SPLITS = {"train": 64, "val": 16, "test": 16}


def pytest_configure(config):
    """Under pytest-xdist (``-n 2``, as .ci/run runs the suite) the workers share the machine's cores:
    each worker's torch gets its share of intra-op threads instead of all of them, so two workers on
    two cores do not oversubscribe each other (subprocess CLI runs set their own OMP_NUM_THREADS)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory) -> str:
    from sam3_train.data import ensure_shapes_shards

    root = tmp_path_factory.mktemp("shapes")
    ensure_shapes_shards(root, splits=SHAPES_SPLITS, max_count=8)
    return str(root)


@pytest.fixture(scope="session")
def shapes_batch(shapes_root):
    """The first 8 validation images with up to 3 phrases each, as a Batch (eval transforms)."""
    from sam3_train.data import Sam3DataModule

    dm = Sam3DataModule(shapes_root=shapes_root, shapes_splits=SHAPES_SPLITS, image_size=224, eval_batch_size=8,
                        num_workers=0, eval_max_phrases=3)
    dm.prepare_data()
    dm.setup("validate")
    return next(iter(dm.val_dataloader()))


@pytest.fixture
def one_thread():
    """Torch on one intra-op thread for the test (restored after)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def validated_checkpoint(module, datamodule, path: Path) -> tuple[dict[str, float], Path]:
    """Validate ``module`` on ``datamodule`` with a bare CPU Trainer and save the checkpoint (its data
    settings included, as a fit's) to ``path``: (the logged metrics, ``path``)."""
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)
    (logged,) = trainer.validate(module, datamodule=datamodule)
    trainer.save_checkpoint(path)
    return logged, path


@pytest.fixture
def wandb_disabled(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")


# ---------------------------------------------------------------------------------- Meta's reference
# The parity tests run Meta's own code (PyPI ``sam3``, and the hydra-core / fvcore its optimiser
# imports). CI installs all of it (tools/setup_env.sh), so there a missing package is a broken
# install and must fail; a developer who has not installed it gets a skip that says why.
META_INSTALL = "pip install --no-deps sam3==0.1.4 (tools/setup_env.sh installs it and the dev extras)"


def in_ci() -> bool:
    """True where the ``CI`` variable is set to anything but ``""``, ``0`` or ``false`` (.ci/run runs with CI=true)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false")


def meta_reference_missing(reason: str) -> NoReturn:
    """Stop a parity test whose reference code is missing: fail under CI, skip elsewhere (at module
    level too), with ``reason`` and how to install it."""
    if in_ci():
        pytest.fail(f"{reason}; CI installs it, so the install is broken: {META_INSTALL}", pytrace=False)
    pytest.skip(f"{reason}: {META_INSTALL}", allow_module_level=True)


def import_meta(module: str) -> ModuleType:
    """``module`` (``sam3.model.sam3_image``, ``hydra``, ...) imported for a parity test, or
    :func:`meta_reference_missing` when it cannot be imported."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        reason = f"Meta's reference code: cannot import {module} ({error})"
    meta_reference_missing(reason)  # outside the except block: one message, no chained traceback


# ---------------------------------------------------------------------------------------- data engine
# Hand-made inputs shared by tests/test_engine_*.py (imported as `from conftest import ...`).
def png_bytes(height: int, width: int, value: int = 0) -> bytes:
    """An encoded PNG of one grey level."""
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_shards(out_dir, prefix: str, samples: dict, image: bytes) -> list[str]:
    """``samples`` (sample key -> meta), each with ``image`` as its PNG, into ``out_dir/{prefix}-*.tar``;
    returns the shard paths, sorted."""
    from pathlib import Path

    from sam3_train.data.shards import ShardSink

    with ShardSink(out_dir=out_dir, prefix=prefix, max_count=1000) as sink:
        for key, meta in samples.items():
            sink.write(key, image, "png", meta)
    return sorted(str(p) for p in Path(out_dir).glob(f"{prefix}-*.tar"))


class EngineFrame:
    """Masks and candidates drawn in one H x W image (the engine's original-pixel frame)."""

    def __init__(self, height: int, width: int):
        self.height, self.width = height, width

    def box_mask(self, x0: int, y0: int, x1: int, y1: int):
        """[H, W] bool, on in rows y0:y1 and columns x0:x1."""
        import torch

        m = torch.zeros(self.height, self.width, dtype=torch.bool)
        m[y0:y1, x0:x1] = True
        return m

    def candidate(self, scores, masks, *, phrase: str = "star", key: str = "00000000_img", presence: float = 0.9,
                  loose=None, tight=None, flip=None):
        """A pair of n instances with the given scores and [H, W] masks: loose, tight and flip masks
        default to the mask (``flip=False``: no flip run); boxes are the masks' extents."""
        import torch

        from sam3_train.engine import Candidate

        n = len(scores)
        def stack(ms):
            return torch.stack(list(ms)) if n else torch.zeros(0, self.height, self.width, dtype=torch.bool)

        masks = stack(masks)
        boxes = torch.zeros(n, 4)
        for i, m in enumerate(masks):
            ys, xs = m.nonzero(as_tuple=True)
            if len(xs):
                boxes[i] = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
        return Candidate(key=key, phrase=phrase, height=self.height, width=self.width, presence=presence,
                         scores=torch.tensor(scores, dtype=torch.float32).reshape(n), boxes=boxes,
                         masks=masks, masks_loose=masks if loose is None else stack(loose),
                         masks_tight=masks if tight is None else stack(tight),
                         flip_masks=None if flip is False else (masks if flip is None else stack(flip)))


# ---------------------------------------------------------------------------------- a Label Studio server
# tests/test_label_studio.py and the engine's front (tests/test_engine_rounds.py) review through a real
# server. It runs from its own venv (tools/setup_label_studio.sh; .ci/run runs it): missing, it fails
# under CI and skips elsewhere, as the Meta reference does.
LABEL_STUDIO = Path(__file__).resolve().parents[1] / ".venv-ls" / "bin" / "label-studio"
LABEL_STUDIO_TOKEN = "sam3-train-test-token"
LABEL_STUDIO_STARTUP_S = 300  # a fresh data dir's migrations: ~50 s on a busy 2-core machine


def free_port() -> int:
    """A free TCP port on localhost (bound, read, released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    """A Label Studio server on a free localhost port with a throw-away data dir, a legacy API token,
    and local files served from the session's temporary folder (every ``tmp_path`` is below it);
    ``{"url", "root" (the document root), "client" (label_studio_sdk)}``. Stopped after the session
    (its process group). The startup wait is bounded; the log is shown if it fails."""
    if not LABEL_STUDIO.is_file():
        message = f"{LABEL_STUDIO} is missing: run tools/setup_label_studio.sh (.ci/run runs it)"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    import httpx

    from sam3_train.engine.label_studio.client import connect

    root = tmp_path_factory.getbasetemp()
    folder = tmp_path_factory.mktemp("label_studio")
    port = free_port()
    env = {**os.environ, "LATEST_VERSION_CHECK": "false",  # no PyPI request at start
           "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true", "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(root),
           # the concept backend runs on localhost: the ML client's check and the ML webhook's (which
           # refuses the default reserved subnets, loopback included, whatever ML_BLOCK_LOCAL_IP says)
           "ML_BLOCK_LOCAL_IP": "false", "USE_DEFAULT_BANNED_SUBNETS": "false"}
    log_path = folder / "server.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [str(LABEL_STUDIO), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port),
             "--data-dir", str(folder / "data"), "--username", "reviewer@example.com", "--password",
             "sam3-train-review", "--user-token", LABEL_STUDIO_TOKEN, "--enable-legacy-api-token"],
            cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + LABEL_STUDIO_STARTUP_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"Label Studio exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"Label Studio did not answer in {LABEL_STUDIO_STARTUP_S} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(2)
        yield {"url": url, "root": root, "client": connect(url=url, api_key=LABEL_STUDIO_TOKEN)}
    finally:
        # the server's own session: it and anything it started. A server that exited at start has no group
        # left, and its ProcessLookupError would hide the failure above that shows the server's log.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
