"""``x2edit-run``: run a ComfyUI workflow (UI or API format) on one image from the command line.

    x2edit-run workflows/icedit_moe_lora.json --image in.png --instruction "remove the cup" --output out.png

It converts the workflow with the server's /object_info (x2edit_core.workflow_api), uploads the image,
substitutes the instruction, seed, model file names and any ``--set NODE.input=value``, queues the prompt,
reports progress, and writes the first saved image to ``--output`` (more images of a batch get
``_2``, ``_3``, ... suffixes). Server errors are printed verbatim. Exit codes: 0 done, 2 bad arguments or
workflow, 3 ComfyUI rejected or failed the prompt (or could not be reached).

Server: ``--url`` (default $COMFYUI_URL or http://127.0.0.1:8188). Without ``--url``, ``--comfyui-root``
(default $COMFYUI_ROOT) starts a headless ComfyUI from that checkout for this run when nothing answers.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import X2EditError
from .workflow_api import (
    MODEL_ROLES,
    ComfyAPI,
    ComfyServerError,
    ProgressListener,
    WorkflowError,
    check_combo_values,
    output_images,
    parse_assignment,
    replace_node_type,
    set_image,
    set_input,
    set_instruction,
    set_role_model,
    set_seed,
    widget_value_mismatches,
    workflow_to_prompt,
)

DEFAULT_URL = "http://127.0.0.1:8188"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="x2edit-run",
        description="Run a ComfyUI workflow (e.g. one of x2edit's workflows/) on an image with an edit "
        "instruction and write the result image.",
    )
    p.add_argument("workflow", help="Workflow JSON: ComfyUI's saved (UI) format or an API-format prompt.")
    p.add_argument("--image", help="Input image; uploaded to ComfyUI and set on every LoadImage node.")
    p.add_argument(
        "--instruction",
        help="Edit instruction; set on every node that reads it (X2Edit ICEdit Prompt, Text Encode, Task "
        "Router, Early Filter).",
    )
    p.add_argument("--seed", type=int, help="Seed for every sampler seed input (default: the workflow's).")
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="ROLE=FILE",
        help=f"Model file for a role, as ComfyUI lists it. Roles: {', '.join(MODEL_ROLES)} "
        "(lora sets every LoRA / MoE-LoRA loader). Repeatable.",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NODE.INPUT=VALUE",
        help="Set any input; NODE is a node id, title or type, e.g. --set KSampler.steps=20. Repeatable.",
    )
    p.add_argument(
        "--replace-node-type",
        action="append",
        default=[],
        metavar="OLD=NEW",
        help="Testing/debugging aid: run every OLD node as a NEW node type (inputs both have are kept).",
    )
    p.add_argument("--output", "-o", help="Where to write the result image (PNG as ComfyUI saved it).")
    p.add_argument("--url", help=f"URL of a running ComfyUI (default $COMFYUI_URL or {DEFAULT_URL}).")
    p.add_argument(
        "--comfyui-root",
        default=None,
        help="ComfyUI checkout to start headless when no server answers (default $COMFYUI_ROOT).",
    )
    p.add_argument(
        "--comfyui-python",
        help="Python for a started ComfyUI (default $COMFYUI_PYTHON, ROOT/.venv, this one).",
    )
    p.add_argument(
        "--server-args",
        default="",
        help="Extra arguments for a started ComfyUI, e.g. --server-args=--cpu (write the = for one flag).",
    )
    p.add_argument(
        "--timeout", type=float, default=3600.0, help="Seconds to wait for the result (default 3600)."
    )
    p.add_argument(
        "--print-prompt", action="store_true", help="Print the API prompt that would be queued, and stop."
    )
    p.add_argument("--quiet", "-q", action="store_true", help="No progress lines.")
    return p


def _split_pair(text: str, flag: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise WorkflowError(f"{flag} expects KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


def load_workflow(path: str) -> dict:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise WorkflowError(f"cannot read the workflow {path!r}: {e.strerror or e}") from None
    try:
        return json.loads(text)
    except ValueError as e:
        raise WorkflowError(f"the workflow {path!r} is not valid JSON: {e}") from None


def prepare_prompt(args, workflow: dict, object_info: dict, api: ComfyAPI | None, log) -> dict:
    """The API prompt with every substitution the arguments ask for (uploads the image through ``api``)."""
    prompt = workflow_to_prompt(workflow, object_info)
    for problem in widget_value_mismatches(workflow, object_info):
        log(f"warning: {problem}; the workflow was saved with another version of this node, check its inputs")
    for pair in args.replace_node_type:
        old, new = _split_pair(pair, "--replace-node-type")
        ids = replace_node_type(prompt, object_info, old, new)
        log(f"replaced {old} with {new} in node(s) {', '.join(ids)}")
    for pair in args.model:
        role, name = _split_pair(pair, "--model")
        set_role_model(prompt, role, name)
    if args.instruction is not None:
        set_instruction(prompt, args.instruction)
    if args.seed is not None:
        set_seed(prompt, object_info, args.seed)
    for assignment in args.set:
        ref, name, value = parse_assignment(assignment)
        set_input(prompt, object_info, ref, name, value)
    check_combo_values(prompt, object_info)
    if args.image is not None:
        if not Path(args.image).is_file():
            raise WorkflowError(f"the input image {args.image!r} does not exist")
        if api is None:
            set_image(prompt, Path(args.image).name)
        else:
            set_image(prompt, "")  # fail on a workflow without LoadImage before uploading anything
            set_image(prompt, api.upload_image(args.image))
    return prompt


class StartedServer:
    """A headless ComfyUI started for one run, stopped at its end."""

    def __init__(self, root: str, python: str | None, extra: str, log):
        self.root = Path(root)
        if not (self.root / "main.py").is_file():
            raise WorkflowError(f"--comfyui-root {root!r} is not a ComfyUI checkout (no main.py)")
        venv_python = self.root / ".venv" / "bin" / "python"
        self.python = (
            python
            or os.environ.get("COMFYUI_PYTHON")
            or (str(venv_python) if venv_python.is_file() else sys.executable)
        )
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_file = tempfile.NamedTemporaryFile(prefix="x2edit-run-comfyui-", suffix=".log", delete=False)
        command = [self.python, "main.py", "--listen", "127.0.0.1", "--port", str(self.port)]
        command += ["--disable-auto-launch", *shlex.split(extra)]
        log(f"starting ComfyUI: {' '.join(command)} (log: {self.log_file.name})")
        self.process = subprocess.Popen(
            command, cwd=self.root, stdout=self.log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )

    def wait_ready(self, timeout: float = 600.0) -> None:
        api = ComfyAPI(self.url, timeout=5)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ComfyServerError(
                    f"ComfyUI exited with code {self.process.returncode} while starting:\n{self.log_tail()}"
                )
            if api.alive():
                return
            time.sleep(0.5)
        self.stop()
        raise ComfyServerError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        try:
            return Path(self.log_file.name).read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # nothing to save: this server only ran our prompt
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.log_file.close()


def _write_images(api: ComfyAPI, entry: dict, output: str, log) -> list[Path]:
    images = output_images(entry)
    if not images:
        raise ComfyServerError(
            "the workflow finished but saved no image (does it have a SaveImage or PreviewImage node?)"
        )
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for i, item in enumerate(images):
        if i and item.get("type", "output") != "output":
            break  # previews after the saved images are not results
        path = out if i == 0 else out.with_name(f"{out.stem}_{i + 1}{out.suffix}")
        path.write_bytes(
            api.download(item["filename"], item.get("subfolder", ""), item.get("type", "output"))
        )
        written.append(path)
    return written


def _report_texts(entry: dict, prompt: dict, log) -> None:
    """Text outputs (e.g. Preview Any showing the chosen task) are worth a line each."""
    for nid, outputs in (entry.get("outputs") or {}).items():
        for text in outputs.get("text", []) or []:
            title = (prompt.get(nid, {}).get("_meta") or {}).get("title") or prompt.get(nid, {}).get(
                "class_type"
            )
            log(f"{title}: {text}")


def run(args, log) -> list[Path]:
    workflow = load_workflow(args.workflow)
    if args.output is None and not args.print_prompt:
        raise WorkflowError("--output is required (where to write the result image)")
    url = args.url or os.environ.get("COMFYUI_URL") or DEFAULT_URL
    root = args.comfyui_root or (None if args.url else os.environ.get("COMFYUI_ROOT"))
    server = None
    api = ComfyAPI(url)
    if args.url is None and root and (args.comfyui_root or not api.alive()):
        server = StartedServer(root, args.comfyui_python, args.server_args, log)
    try:
        if server is not None:
            server.wait_ready()
            api = ComfyAPI(server.url)
        object_info = api.object_info()
        prompt = prepare_prompt(args, workflow, object_info, None if args.print_prompt else api, log)
        if args.print_prompt:
            print(json.dumps(prompt, indent=1, ensure_ascii=False))
            return []
        listener = ProgressListener(api.url, api.client_id, log, prompt)
        listening = not args.quiet and listener.start()
        if not args.quiet and not listening:
            log(listener.unavailable or "polling the queue for progress")
        try:
            prompt_id = api.queue(prompt)
            listener.prompt_id = prompt_id
            log(f"queued prompt {prompt_id} on {api.url}")
            started = time.monotonic()
            try:
                entry = api.wait(prompt_id, timeout=args.timeout, progress=None if listening else log)
            except KeyboardInterrupt:
                api.interrupt(prompt_id)  # do not leave the server busy with an abandoned prompt
                raise
        finally:
            listener.stop()
        _report_texts(entry, prompt, log)
        written = _write_images(api, entry, args.output, log)
        log(f"done in {time.monotonic() - started:.1f} s")
        return written
    finally:
        if server is not None:
            server.stop()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def log(line: str) -> None:
        if not args.quiet:
            print(f"[x2edit-run] {line}", file=sys.stderr, flush=True)

    try:
        written = run(args, log)
    except WorkflowError as e:
        print(f"x2edit-run: error: {e}", file=sys.stderr)
        return 2
    except ComfyServerError as e:
        print(f"x2edit-run: error: {e}", file=sys.stderr)
        return 3
    except X2EditError as e:
        print(f"x2edit-run: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("x2edit-run: interrupted", file=sys.stderr)
        return 130
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
