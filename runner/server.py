"""ComfyUI's real server (`main.py`) with this pack, started and driven over HTTP.

Used by the demo (`scripts/demo.sh`), the thumbnails it renders, and the tests. ComfyUI is found
by `runner.host.comfyui_path` (COMFYUI_PATH, else the path `scripts/setup.sh` recorded). The server's
base directory is a scratch folder: only this pack (linked into its custom_nodes/ as a user's clone
would be) and ComfyUI's built-in nodes load, and only the models put there are listed.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from runner.host import PACK_NAME, REPO, comfyui_path, link_pack  # noqa: F401  (re-exported for the tests)


class HarnessError(RuntimeError):
    """The test set-up itself is broken (no ComfyUI, server did not start, ...)."""


class GraphError(RuntimeError):
    """A graph failed validation or a node raised; `.node_id`, `.exception_type`, `.details`."""

    def __init__(self, message: str, node_id=None, exception_type=None, details=None):
        super().__init__(message)
        self.node_id = node_id
        self.exception_type = exception_type
        self.details = details


# --- starting ComfyUI's server ----------------------------------------------------------------

def install_checkpoint(checkpoint: Path, models_dir: Path) -> str:
    """Make a checkpoint visible in models_dir/checkpoints; return the name ComfyUI lists."""
    folder = models_dir / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / checkpoint.name
    if not target.exists():
        target.symlink_to(checkpoint)
    return checkpoint.name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """ComfyUI's real server (`main.py`) in a subprocess, on loopback, CPU only.

    Its base directory is a temp folder: models/checkpoints holds the given checkpoints and
    custom_nodes/<PACK_NAME> links to this checkout (where a registry install puts the pack), so only this
    pack and ComfyUI's built-ins load. Use as a context manager; the process group is killed on
    exit. The server log is in `log_path`.

    `python` runs the server (default: this interpreter); with `link_checkout=False` the base
    folder's custom_nodes/ is left as the caller filled it (an installed archive, say).
    """

    def __init__(self, base_dir: Path, checkpoints: list[Path] = (), start_timeout: float = 120.0,
                 extra_args: list[str] = (), threads: int | None = None, python: str | Path = sys.executable,
                 link_checkout: bool = True):
        self.base_dir = Path(base_dir)
        self.python = str(python)
        self.link_checkout = link_checkout
        self.checkpoints = list(checkpoints)
        self.start_timeout = start_timeout
        self.extra_args = list(extra_args)
        self.threads = threads  # torch CPU threads of the server; None: torch's default (every core)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base_dir / "server.log"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "ComfyServer":
        comfy_path = comfyui_path()
        for name in self.checkpoints:
            install_checkpoint(name, self.base_dir / "models")
        if self.link_checkout:
            link_pack(self.base_dir / "custom_nodes")
        cmd = [
            self.python, "main.py", "--cpu", "--use-pytorch-cross-attention",
            "--listen", "127.0.0.1", "--port", str(self.port),
            "--base-directory", str(self.base_dir), "--database-url", "sqlite:///:memory:",
            "--disable-auto-launch", "--disable-api-nodes", *self.extra_args,
        ]
        # Nothing from this process's import path: the server imports what its own Python has.
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        env.update(PYTHONUNBUFFERED="1", DO_NOT_TRACK="1")
        if self.threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(self.threads)
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            cmd, cwd=comfy_path, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, start_new_session=True,
        )
        try:
            self._wait_until_up()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            pgid = os.getpgid(self.process.pid)
            os.killpg(pgid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(pgid, signal.SIGKILL)
                self.process.wait(timeout=15)
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise HarnessError(f"ComfyUI exited with {self.process.returncode} while starting:\n{self.log_tail()}")
            try:
                self.get("/system_stats", timeout=2)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.25)
        raise HarnessError(f"ComfyUI did not answer /system_stats within {self.start_timeout:.0f} s:\n{self.log_tail()}")

    def get(self, route: str, timeout: float = 10):
        with urllib.request.urlopen(self.url + route, timeout=timeout) as r:
            return json.loads(r.read())

    def post(self, route: str, payload: dict, timeout: float = 10):
        request = urllib.request.Request(
            self.url + route, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:  # ComfyUI answers 400 with the validation errors
            raise GraphError(f"POST {route} -> {e.code}: {e.read().decode(errors='replace')}") from None

    def submit(self, prompt: dict) -> str:
        """Queue an API-format graph (POST /prompt); returns its prompt_id."""
        return self.post("/prompt", {"prompt": prompt, "client_id": "ace-tests"})["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 120.0) -> dict:
        """Poll /history/<id> until the prompt is done; returns its history entry
        (`outputs`, `status` with `status_str`, `completed` and `messages`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            if self.process.poll() is not None:
                raise HarnessError(f"ComfyUI exited while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.2)
        raise HarnessError(f"prompt {prompt_id} not done within {timeout:.0f} s:\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 120.0) -> dict:
        """submit + wait: the finished history entry."""
        return self.wait(self.submit(prompt), timeout)

    def image_path(self, image: dict) -> Path:
        """Where the server wrote an image listed in a history entry's outputs
        (`{"filename", "subfolder", "type": "output" | "temp"}`)."""
        return self.base_dir / image["type"] / image["subfolder"] / image["filename"]
