"""Drive a real headless ComfyUI over its HTTP API, with tiny random FLUX models, for the test tier.

`ComfyServer` lays out a models tree and a custom-nodes folder (the repo as pack `x2edit`, plus the
test support pack), starts `main.py --cpu` on a free port and stops it. `ComfyClient` queues API-format
prompts and waits for their history entries, raising with the server's own error text.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parents[1]
REPO_ROOT = TESTS_DIR.parent
SUPPORT_PACK_DIR = Path(__file__).resolve().parent / "support_pack"

if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

import tiny_models  # noqa: E402  (needs TESTS_DIR on sys.path)

DEFAULT_COMFYUI_ROOT = "/opt/ComfyUI"

# Names of the tiny models every server gets (keys of ComfyClient.models).
TINY_MODEL_FILES = {
    "dev": ("diffusion_models", "x2edit_tiny_flux_dev.safetensors"),
    "kontext": ("diffusion_models", "x2edit_tiny_flux_kontext.safetensors"),
    "fill": ("diffusion_models", "x2edit_tiny_flux_fill.safetensors"),
    "vae": ("vae", "x2edit_tiny_vae.safetensors"),
    "fill_lora": ("loras", "x2edit_tiny_fill_lora.safetensors"),
}


class ComfyError(RuntimeError):
    """ComfyUI rejected or failed a prompt; the message carries the server's own error text."""


class ComfyValidationError(ComfyError):
    """POST /prompt answered with an error (HTTP 400): the body is in the message verbatim."""

    def __init__(self, body: str):
        super().__init__(f"ComfyUI rejected the prompt:\n{body}")
        self.body = body
        try:
            self.data = json.loads(body)
        except ValueError:
            self.data = None


class ComfyExecutionError(ComfyError):
    """The prompt was queued but failed while running; `messages` are the history status messages."""

    def __init__(self, prompt_id: str, messages: list):
        detail = ""
        for name, data in messages:
            if name == "execution_error":
                detail = (
                    f"node {data.get('node_id')} ({data.get('node_type')}): "
                    f"{data.get('exception_type')}: {data.get('exception_message')}\n"
                    + "".join(data.get("traceback", []))
                )
        super().__init__(
            f"ComfyUI prompt {prompt_id} failed: {detail}\nstatus messages: {json.dumps(messages, indent=1)}"
        )
        self.prompt_id = prompt_id
        self.messages = messages


@dataclass(frozen=True)
class ComfyInstall:
    root: Path
    python: Path

    @property
    def available(self) -> bool:
        return (self.root / "main.py").is_file() and self.python.is_file()

    @property
    def missing_reason(self) -> str:
        if not (self.root / "main.py").is_file():
            return f"ComfyUI tier skipped: no ComfyUI checkout at {self.root} (set COMFYUI_ROOT)"
        if not self.python.is_file():
            return f"ComfyUI tier skipped: no ComfyUI python at {self.python} (set COMFYUI_PYTHON)"
        return ""


def host_roots() -> list[Path]:
    """ComfyUI releases laid out by scripts/setup_hosts.sh (X2EDIT_HOSTS_DIR), oldest release first."""
    base = Path(os.environ.get("X2EDIT_HOSTS_DIR") or Path.home() / ".cache" / "x2edit" / "hosts")
    roots = [p for p in base.glob("ComfyUI-*") if (p / "main.py").is_file() and any(p.glob(".x2edit-host-*"))]
    return sorted(roots, key=lambda p: tuple(int(x) if x.isdigit() else 0 for x in p.name[8:].split(".")))


def find_comfyui() -> ComfyInstall:
    """ComfyUI at COMFYUI_ROOT, else the newest release laid out by scripts/setup_hosts.sh, else
    /opt/ComfyUI; run by COMFYUI_PYTHON (default ROOT/.venv/bin/python)."""
    if os.environ.get("COMFYUI_ROOT"):
        root = Path(os.environ["COMFYUI_ROOT"])
    else:
        hosts = host_roots()
        root = hosts[-1] if hosts else Path(DEFAULT_COMFYUI_ROOT)
    python = Path(os.environ.get("COMFYUI_PYTHON") or root / ".venv" / "bin" / "python")
    return ComfyInstall(root, python)


def comfyui_version(root: Path) -> str:
    """The release of the checkout at `root` (comfyui_version.py), or "unknown"."""
    try:
        text = (Path(root) / "comfyui_version.py").read_text()
    except OSError:
        return "unknown"
    for line in text.splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("\"'")
    return "unknown"


def comfyui_required() -> bool:
    """X2EDIT_REQUIRE_COMFYUI=1 (on in CI) turns a missing ComfyUI tier into an error."""
    return os.environ.get("X2EDIT_REQUIRE_COMFYUI", "").strip().lower() in ("1", "true", "yes")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_tiny_models(models_dir: Path) -> dict[str, str]:
    """Write the standard tiny models under models_dir; returns {key: file name as ComfyUI lists it}."""
    for folder in ("diffusion_models", "vae", "loras"):
        (models_dir / folder).mkdir(parents=True, exist_ok=True)
    names = {}
    for key, (folder, name) in TINY_MODEL_FILES.items():
        path = models_dir / folder / name
        if key in ("dev", "kontext", "fill"):
            # Different seeds so that a wrong model choice shows up in outputs.
            tiny_models.write_tiny_flux(path, variant=key, seed={"dev": 1, "kontext": 2, "fill": 3}[key])
        elif key == "vae":
            tiny_models.write_tiny_vae(path, seed=4)
        elif key == "fill_lora":
            tiny_models.write_tiny_flux_lora(path, tiny_models.tiny_flux_config("fill"), seed=5)
        names[key] = name
    return names


@dataclass
class ComfyServer:
    """One headless ComfyUI process with its own directories under `base_dir`."""

    install: ComfyInstall
    base_dir: Path
    port: int = 0
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = None
    models: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        self.base_dir = Path(self.base_dir)
        self.models_dir = self.base_dir / "models"
        self.custom_nodes_dir = self.base_dir / "custom_nodes"
        self.output_dir = self.base_dir / "output"
        self.input_dir = self.base_dir / "input"
        self.temp_dir = self.base_dir / "temp"
        self.user_dir = self.base_dir / "user"
        self.log_path = self.base_dir / "server.log"
        self.config_path = self.base_dir / "extra_model_paths.yaml"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def prepare(self) -> None:
        for d in (self.custom_nodes_dir, self.output_dir, self.input_dir, self.user_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.models = write_tiny_models(self.models_dir)
        # The repo root is the pack under test; ComfyUI logs and skips it if it fails to import.
        for name, target in (("x2edit", REPO_ROOT), ("x2edit_test_support", SUPPORT_PACK_DIR)):
            link = self.custom_nodes_dir / name
            if not link.exists():
                link.symlink_to(target, target_is_directory=True)
        folders = ["diffusion_models", "vae", "loras", "text_encoders"]
        lines = ["x2edit_tests:", f"  base_path: {json.dumps(str(self.models_dir))}"]
        lines += [f"  {f}: {f}" for f in folders]
        lines.append(f"  custom_nodes: {json.dumps(str(self.custom_nodes_dir))}")
        self.config_path.write_text("\n".join(lines) + "\n")

    def command(self) -> list[str]:
        return [
            str(self.install.python),
            "main.py",
            # X2EDIT_COMFYUI_GPU=1 (scripts/gpu_check.sh) lets ComfyUI use its GPU
            *([] if os.environ.get("X2EDIT_COMFYUI_GPU") == "1" else ["--cpu"]),
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--extra-model-paths-config",
            str(self.config_path),
            "--output-directory",
            str(self.output_dir),
            "--input-directory",
            str(self.input_dir),
            "--temp-directory",
            str(self.base_dir),  # ComfyUI appends "temp"
            "--user-directory",
            str(self.user_dir),
            "--disable-api-nodes",
            "--disable-auto-launch",
            "--preview-method",
            "none",
            "--database-url",
            "sqlite:///:memory:",
            *self.extra_args,
        ]

    def start(self, timeout: float = 180.0) -> None:
        self.prepare()
        self.port = self.port or free_port()
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        env.pop("PYTHONPATH", None)  # the project venv's paths must not leak into ComfyUI's python
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command(),
                cwd=self.install.root,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        atexit.register(self.stop)  # no orphan server if the session ends without fixture teardown
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ComfyError(
                    f"ComfyUI exited with code {self.process.returncode} while starting.\n"
                    f"command: {' '.join(self.command())}\n--- server log ---\n{self.log()}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/system_stats", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.25)
        self.stop()
        raise ComfyError(f"ComfyUI did not answer within {timeout:.0f} s.\n--- server log ---\n{self.log()}")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)  # ComfyUI shuts down cleanly on Ctrl-C
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def log(self, since: int = 0) -> str:
        """The server's combined stdout/stderr, from byte offset `since` (see `log_offset`)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                return f.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_offset(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0


class ComfyClient:
    """HTTP client for one ComfyServer; the object the `comfy` fixture yields."""

    def __init__(self, server: ComfyServer):
        self.server = server
        self.client_id = uuid.uuid4().hex
        self.url = server.url
        self.models = dict(server.models)
        self.models_dir = server.models_dir
        self.loras_dir = server.models_dir / "loras"
        self.output_dir = server.output_dir
        self.input_dir = server.input_dir
        self.temp_dir = server.temp_dir

    # --- HTTP ---

    def _request(self, method: str, path: str, payload=None, timeout: float = 30.0):
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(
            f"{self.url}{path}", data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read().decode("utf-8", errors="replace")
        return json.loads(body) if body else None

    def get(self, path: str, timeout: float = 30.0):
        return self._request("GET", path, timeout=timeout)

    def post(self, path: str, payload, timeout: float = 30.0):
        return self._request("POST", path, payload, timeout=timeout)

    # --- API ---

    def object_info(self, node_class: str | None = None) -> dict:
        """GET /object_info (all nodes) or /object_info/<class> (returns that node's entry)."""
        if node_class is None:
            return self.get("/object_info", timeout=60)
        return self.get(f"/object_info/{node_class}").get(node_class, {})

    def queue(self, prompt: dict) -> str:
        """POST /prompt; returns the prompt id. Raises ComfyValidationError with the body on HTTP 400."""
        try:
            answer = self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})
        except urllib.error.HTTPError as error:
            raise ComfyValidationError(error.read().decode("utf-8", errors="replace")) from None
        if answer.get("node_errors"):
            raise ComfyValidationError(json.dumps(answer))
        return answer["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        return self.get(f"/history/{prompt_id}").get(prompt_id)

    def wait(self, prompt_id: str, timeout: float = 120.0) -> dict:
        """Poll /history/<id> until the prompt ends; returns the history entry or raises."""
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            entry = self.history(prompt_id)
            if entry is not None:
                status = entry.get("status", {})
                if status.get("status_str") == "error":
                    raise ComfyExecutionError(prompt_id, status.get("messages", []))
                if status.get("completed", True):
                    return entry
            if not self.server.alive():
                raise ComfyError(f"ComfyUI died while running {prompt_id}.\n--- server log ---\n{self.log()}")
            if time.monotonic() > deadline:
                self.post("/interrupt", {})
                raise TimeoutError(
                    f"prompt {prompt_id} not finished after {timeout:.0f} s\n--- server log (tail) ---\n"
                    + self.log()[-5000:]
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def run(self, prompt: dict, timeout: float = 120.0) -> dict:
        """Queue `prompt` (API format) and wait for it; returns the history entry."""
        return self.wait(self.queue(prompt), timeout=timeout)

    def output_files(self, entry: dict, node_id: str | None = None, kind: str | None = None) -> list[Path]:
        """Paths of files a history entry reports (`kind` e.g. "images", "latents", "tensors")."""
        roots = {"output": self.output_dir, "temp": self.temp_dir, "input": self.input_dir}
        paths = []
        for nid, outputs in entry.get("outputs", {}).items():
            if node_id is not None and nid != str(node_id):
                continue
            for k, items in outputs.items():
                if kind is not None and k != kind:
                    continue
                for item in items:
                    if isinstance(item, dict) and "filename" in item:
                        paths.append(
                            roots[item.get("type", "output")] / item.get("subfolder", "") / item["filename"]
                        )
        return paths

    def free(self) -> None:
        """Ask ComfyUI to unload models and free memory (POST /free)."""
        self.post("/free", {"unload_models": True, "free_memory": True})

    # --- files ---

    def add_file(self, folder: str, name: str, source) -> str:
        """Put a model file in models/<folder>/ (a path to copy or a dict of tensors); returns its name."""
        dest = self.models_dir / folder / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(source, dict):
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in source.items()}, str(dest))
        else:
            shutil.copyfile(source, dest)
        return name

    def add_lora(self, name: str, source) -> str:
        """Put a LoRA file in the loras folder (path or dict of tensors); returns the LoraLoader name."""
        return self.add_file("loras", name, source)

    def add_input_file(self, name: str, source) -> str:
        """Copy a file (or write bytes) into the input directory; returns the name for LoadImage etc."""
        dest = self.input_dir / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(source, bytes):
            dest.write_bytes(source)
        else:
            shutil.copyfile(source, dest)
        return name

    def log(self, since: int = 0) -> str:
        return self.server.log(since)

    def custom_node_import_failures(self) -> dict[str, str]:
        """{pack folder name: error} for custom-node packs ComfyUI failed to import at start-up."""
        failures = {}
        for line in self.log().splitlines():
            if line.startswith("Cannot import ") and " module for custom nodes: " in line:
                path, error = line[len("Cannot import ") :].split(" module for custom nodes: ", 1)
                failures[Path(path).name] = error
        return failures

    def log_offset(self) -> int:
        return self.server.log_offset()


# --- ready-made API-format prompts on the tiny models (node ids are strings, as ComfyUI wants) ---


def tiny_fill_inpaint_prompt(
    models: dict[str, str],
    width: int = 64,
    height: int = 64,
    steps: int = 3,
    seed: int = 0,
    guidance: float = 30.0,
    prefix: str = "x2edit_test/fill",
) -> dict:
    """Tiny FLUX Fill inpainting of the right half of a noise image, all core nodes plus the test ones.

    Node ids: "1" UNETLoader, "2" VAELoader, "3"/"4" positive/negative X2EditTestConditioning,
    "5" X2EditTestNoiseImage, "6"-"8" right-half mask, "9" InpaintModelConditioning, "10" KSampler,
    "11" VAEDecode, "12" SaveImage, "13" SaveLatent.
    """
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": models["fill"], "weight_dtype": "default"}},
        "2": {"class_type": "VAELoader", "inputs": {"vae_name": models["vae"]}},
        "3": {
            "class_type": "X2EditTestConditioning",
            "inputs": {
                "seed": 1,
                "text": "make it red",
                "tokens": 8,
                "guidance": guidance,
                "context_dim": 32,
                "pooled_dim": 16,
                "model": ["1", 0],
            },
        },
        "4": {
            "class_type": "X2EditTestConditioning",
            "inputs": {
                "seed": 2,
                "text": "",
                "tokens": 8,
                "guidance": guidance,
                "context_dim": 32,
                "pooled_dim": 16,
                "model": ["1", 0],
            },
        },
        "5": {
            "class_type": "X2EditTestNoiseImage",
            "inputs": {"width": width, "height": height, "batch_size": 1, "seed": 7},
        },
        "6": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": width, "height": height}},
        "7": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": width // 2, "height": height}},
        "8": {
            "class_type": "MaskComposite",
            "inputs": {
                "destination": ["6", 0],
                "source": ["7", 0],
                "x": width // 2,
                "y": 0,
                "operation": "add",
            },
        },
        "9": {
            "class_type": "InpaintModelConditioning",
            "inputs": {
                "positive": ["3", 0],
                "negative": ["4", 0],
                "vae": ["2", 0],
                "pixels": ["5", 0],
                "mask": ["8", 0],
                "noise_mask": True,
            },
        },
        "10": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["1", 0],
                "seed": seed,
                "steps": steps,
                "cfg": 1.0,
                "sampler_name": "euler",
                "scheduler": "simple",
                "positive": ["9", 0],
                "negative": ["9", 1],
                "latent_image": ["9", 2],
                "denoise": 1.0,
            },
        },
        "11": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["2", 0]}},
        "12": {"class_type": "SaveImage", "inputs": {"images": ["11", 0], "filename_prefix": prefix}},
        "13": {"class_type": "SaveLatent", "inputs": {"samples": ["10", 0], "filename_prefix": prefix}},
    }


def tiny_dev_txt2img_prompt(
    models: dict[str, str],
    width: int = 64,
    height: int = 48,
    steps: int = 3,
    seed: int = 0,
    guidance: float = 3.5,
    model_key: str = "dev",
    prefix: str = "x2edit_test/dev",
) -> dict:
    """Tiny FLUX dev text-to-image from an empty 16-channel latent.

    Node ids: "1" UNETLoader, "2" VAELoader, "3"/"4" conditionings, "5" EmptySD3LatentImage,
    "6" KSampler, "7" VAEDecode, "8" SaveImage, "9" SaveLatent.
    """
    return {
        "1": {
            "class_type": "UNETLoader",
            "inputs": {"unet_name": models[model_key], "weight_dtype": "default"},
        },
        "2": {"class_type": "VAELoader", "inputs": {"vae_name": models["vae"]}},
        "3": {
            "class_type": "X2EditTestConditioning",
            "inputs": {
                "seed": 1,
                "text": "a cat",
                "tokens": 8,
                "guidance": guidance,
                "context_dim": 32,
                "pooled_dim": 16,
                "model": ["1", 0],
            },
        },
        "4": {
            "class_type": "X2EditTestConditioning",
            "inputs": {
                "seed": 2,
                "text": "",
                "tokens": 8,
                "guidance": guidance,
                "context_dim": 32,
                "pooled_dim": 16,
                "model": ["1", 0],
            },
        },
        "5": {
            "class_type": "EmptySD3LatentImage",
            "inputs": {"width": width, "height": height, "batch_size": 1},
        },
        "6": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["1", 0],
                "seed": seed,
                "steps": steps,
                "cfg": 1.0,
                "sampler_name": "euler",
                "scheduler": "simple",
                "positive": ["3", 0],
                "negative": ["4", 0],
                "latent_image": ["5", 0],
                "denoise": 1.0,
            },
        },
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["2", 0]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": prefix}},
        "9": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": prefix}},
    }
