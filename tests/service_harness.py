"""A real ``bentoml serve`` for the service's fuzz and fault tests, and a small model to serve.

Not a test module: ``tests/test_service_fuzz.py`` and ``tests/test_service_faults.py`` share it.
The model is an AOL ``xxs`` network trained for a moment on scikit-learn's digits (8×8), exported
once per test session into a temporary folder (:func:`digits_model`); the tests copy it and make
broken copies beside it. :class:`Server` runs ``bentoml serve`` on a free loopback port with its
own ``BENTOML_HOME`` and ``LIPCERT_MODELS`` and exposes the processes, so tests can kill a worker
or send SIGTERM and measure RSS.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]

#: Server settings for tests: one worker (the fault tests kill and measure it), one ONNX Runtime
#: thread, a short load profile, CPU only.
BASE_ENV = {
    "LIPCERT_WORKERS": "1",
    "LIPCERT_ORT_THREADS": "1",
    "LIPCERT_PROFILE_RUNS": "2",
    "LIPCERT_PROVIDERS": "CPUExecutionProvider",
    "OMP_NUM_THREADS": "1",
    "BENTOML_DO_NOT_TRACK": "True",
}


def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as ``(N, 1, 8, 8)`` float32 in [0, 1] and int64 labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32)[:, None], d.target.astype(np.int64)


def train_digits(model: Any, x: np.ndarray, y: np.ndarray, steps: int = 200) -> None:
    """A few seconds of Adam on scaled cross-entropy: enough for meaningful labels and radii.

    Batches of 128 drawn with a per-step seed, so a run is reproducible; ends in eval mode.
    """
    import torch

    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(xt), (128,), generator=torch.Generator().manual_seed(step))
        loss = torch.nn.functional.cross_entropy(model(xt[idx]) * 8, yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@functools.cache
def digits_model() -> Path:
    """An exported AOL ``xxs`` digits model (trained 60 Adam steps), made once per session.

    Returns:
        The ONNX file, in a temporary folder removed at interpreter exit.
    """
    import atexit

    import torch

    import models
    from certify.artifact import to_onnx

    root = Path(tempfile.mkdtemp(prefix="lipcert-harness-"))
    atexit.register(shutil.rmtree, root, True)
    x, y = digits()
    torch.manual_seed(0)
    model = models.create_model("aol", "xxs", 1, 10, 8)
    train_digits(model, x, y, steps=60)
    return to_onnx(model, root / "aol-digits.onnx", input_shape=(1, 8, 8),
                   metadata={"dataset": "digits", "classes": [str(i) for i in range(10)]})


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``bentoml serve`` (the bentofile's service) on a free loopback port; a context manager.

    Args:
        models: the ``LIPCERT_MODELS`` folder.
        home: a folder for ``BENTOML_HOME`` and the server log (``serve.log``).
        env: extra environment (limits, ...), over :data:`BASE_ENV`.
        ready_timeout_s: how long to wait for ``/readyz`` to answer at all.
    """

    def __init__(self, models: Path, home: Path, env: Mapping[str, str] | None = None,
                 ready_timeout_s: float = 120.0) -> None:
        self.models = models
        self.home = home
        self.env = {**os.environ, **BASE_ENV, **(env or {}), "LIPCERT_MODELS": str(models),
                    "BENTOML_HOME": str(home)}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ready_timeout_s = ready_timeout_s
        self.log_path = home / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Server:
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bentoml", "serve", "--host", "127.0.0.1",
                 "--port", str(self.port)],
                cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            )
        try:
            self.wait_answering(self.ready_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self) -> str:
        """The server's output so far."""
        return self.log_path.read_text(errors="replace")

    def wait_answering(self, timeout_s: float) -> float:
        """Wait until ``/readyz`` answers (200, or 503 without a servable model).

        Returns:
            The seconds waited.

        Raises:
            RuntimeError: the server exited.
            TimeoutError: no answer within ``timeout_s``.
        """
        import httpx

        start = time.monotonic()
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"bentoml serve exited: {self.log()[-3000:]}")
            try:
                httpx.get(f"{self.url}/readyz", timeout=2)
                return time.monotonic() - start
            except httpx.TransportError:
                pass
            if time.monotonic() - start > timeout_s:
                raise TimeoutError(f"bentoml serve did not answer in {timeout_s} s")
            time.sleep(0.2)

    def workers(self) -> list[int]:
        """Process ids of the service's worker processes (children of ``bentoml serve``)."""
        import psutil

        assert self.proc is not None
        return [p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)
                if "_bentoml_impl.worker" in " ".join(p.cmdline())]

    def rss_bytes(self) -> int:
        """Resident memory of the server and all its processes."""
        import psutil

        assert self.proc is not None
        procs = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(True)]
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout_s``; the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
