"""ComfyUI workflows from the command line: UI-format workflow -> API prompt, substitutions, HTTP client.

No ComfyUI import: everything is read from a running server's ``/object_info``.

**Conversion** (``workflow_to_prompt``) does what the ComfyUI frontend does when it queues a graph:

- widget values (``widgets_values``, a list in the order of the node's widget inputs as /object_info
  lists them, or a dict by name) become inputs. The frontend adds a ``control_after_generate``
  pseudo-widget ("fixed", "randomize", ...) after an INT/COMBO input whose spec asks for one, and after
  every INT input named ``seed`` or ``noise_seed``; its value is skipped. Trailing extra values (e.g.
  LoadImage's "upload" button) are ignored.
- links become ``[source node id, output slot]``; a linked input wins over its widget value (a widget
  converted to an input).
- frontend-only nodes: Note / MarkdownNote are dropped, Reroutes are followed to their source,
  PrimitiveNode values are inlined into the inputs they feed.
- muted nodes (mode 2) are dropped, and so are the links from them; bypassed nodes (mode 4) pass the
  input of the output's type through (the input at the same slot if its type matches, else the first
  input of that type), as the frontend does.

**Substitutions** find nodes by type (model roles, the input image, instruction and seed) or by title
or id (``set_input``), coerce values to the input's type and check combo values against the server's
lists, so a missing model file fails before queueing with the names that are available.

**Client** (``ComfyAPI``): urllib only. Server errors are kept verbatim: a rejected prompt's 400 body,
an execution error's exception text and traceback from the history entry.
"""

from __future__ import annotations

import json
import mimetypes
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

from ..errors import X2EditError

# --------------------------------------------------------------------------------------------------
# Errors


class WorkflowError(X2EditError, ValueError):
    """A workflow cannot be converted, or a substitution does not fit it."""


class MissingModelError(WorkflowError):
    """A workflow names a model (or other combo value) the server does not list."""


class ComfyServerError(X2EditError, RuntimeError):
    """ComfyUI could not be reached, or rejected or failed a prompt. The message keeps the server's text."""


class PromptRejectedError(ComfyServerError):
    """POST /prompt answered 400 (validation failed); ``body`` is the server's answer verbatim."""

    def __init__(self, body: str, prompt: dict | None = None):
        self.body = body
        try:
            self.data = json.loads(body)
        except ValueError:
            self.data = None
        super().__init__(format_rejection(self.data, body, prompt))


class PromptFailedError(ComfyServerError):
    """The prompt was queued but failed while running; ``messages`` are the history status messages."""

    def __init__(self, prompt_id: str, messages: list):
        self.prompt_id = prompt_id
        self.messages = messages
        super().__init__(format_execution_error(prompt_id, messages))


# --------------------------------------------------------------------------------------------------
# Node specs as /object_info describes them

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
SEED_NAMES = ("seed", "noise_seed")
UPLOAD_FLAGS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload", "upload")
NOTE_TYPES = ("Note", "MarkdownNote")
REROUTE_TYPE = "Reroute"
PRIMITIVE_TYPE = "PrimitiveNode"
FRONTEND_ONLY = (*NOTE_TYPES, REROUTE_TYPE, PRIMITIVE_TYPE)
MODE_MUTED = 2
MODE_BYPASSED = 4


def _spec_options(spec) -> dict:
    return spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}


def spec_type(spec) -> str:
    """ "INT", "COMBO", "MODEL", ... of an /object_info input spec (a list of options is a COMBO)."""
    if not isinstance(spec, (list, tuple)) or not spec:
        return ""
    kind = spec[0]
    if isinstance(kind, (list, tuple)):
        return "COMBO"
    return str(kind)


def combo_options(spec) -> list | None:
    """The allowed values of a combo input (old list form or V3 "COMBO" with options), else None."""
    if not isinstance(spec, (list, tuple)) or not spec:
        return None
    if isinstance(spec[0], (list, tuple)):
        return list(spec[0])
    if spec[0] == "COMBO":
        return list(_spec_options(spec).get("options", []))
    return None


def is_widget(spec) -> bool:
    """Whether the frontend shows this input as a widget (a value), not only as a socket."""
    options = _spec_options(spec)
    if options.get("forceInput") or options.get("rawLink"):
        return False
    return spec_type(spec) in WIDGET_TYPES


def has_control_widget(name: str, spec) -> bool:
    """Whether the frontend adds a control_after_generate value after this widget."""
    if _spec_options(spec).get("control_after_generate"):
        return True
    return spec_type(spec) == "INT" and name in SEED_NAMES


def is_upload_input(spec) -> bool:
    options = _spec_options(spec)
    return any(options.get(flag) for flag in UPLOAD_FLAGS)


def node_inputs(info: dict) -> list[tuple[str, list, bool]]:
    """(name, spec, required) for a node type's visible inputs, in the frontend's order."""
    inputs = info.get("input", {}) or {}
    order = info.get("input_order", {}) or {}
    out = []
    for group, required in (("required", True), ("optional", False)):
        specs = inputs.get(group, {}) or {}
        names = [n for n in order.get(group, []) if n in specs] + [
            n for n in specs if n not in order.get(group, [])
        ]
        out += [(name, specs[name], required) for name in names]
    return out


def input_spec(info: dict, name: str):
    for input_name, spec, _ in node_inputs(info):
        if input_name == name:
            return spec
    return None


def widget_inputs(info: dict) -> list[tuple[str, list]]:
    return [(name, spec) for name, spec, _ in node_inputs(info) if is_widget(spec)]


# --------------------------------------------------------------------------------------------------
# UI workflow -> API prompt


def _links(workflow: dict) -> dict[int, tuple[int, int, int, int, str]]:
    """link id -> (source node, source slot, target node, target slot, type), either link layout."""
    links = {}
    for link in workflow.get("links") or []:
        if isinstance(link, dict):
            row = (link["id"], link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"])
            links[int(row[0])] = (*map(int, row[1:]), str(link.get("type", "*")))
        elif isinstance(link, (list, tuple)) and len(link) >= 5:
            link_type = str(link[5]) if len(link) > 5 else "*"
            links[int(link[0])] = (int(link[1]), int(link[2]), int(link[3]), int(link[4]), link_type)
        else:
            raise WorkflowError(f"malformed link {link!r} in the workflow")
    return links


def _types_match(a: str, b: str) -> bool:
    if a in ("*", "", None) or b in ("*", "", None):
        return True
    return bool(set(str(a).split(",")) & set(str(b).split(",")))


def _node_label(node: dict) -> str:
    title = node.get("title")
    return f"node {node.get('id')} ({node.get('type')}{f' {title!r}' if title else ''})"


def check_workflow_format(workflow) -> None:
    if not isinstance(workflow, dict):
        raise WorkflowError("the workflow must be a JSON object")
    if "nodes" not in workflow:
        if workflow and all(isinstance(v, dict) and "class_type" in v for v in workflow.values()):
            return  # already an API prompt
        raise WorkflowError(
            "this is not a ComfyUI workflow: it has no 'nodes' list (save it from ComfyUI with Workflow > "
            "Save, or Export (API) for an API prompt)"
        )
    if not isinstance(workflow["nodes"], list):
        raise WorkflowError("the workflow's 'nodes' must be a list")


def is_api_prompt(workflow: dict) -> bool:
    return "nodes" not in workflow and all(
        isinstance(v, dict) and "class_type" in v for v in workflow.values()
    )


def map_widget_values(widgets: list[tuple[str, list]], values: list) -> tuple[dict, list]:
    """({widget name: value}, values left over) for a node's positional ``widgets_values``."""
    mapped, i = {}, 0
    for name, spec in widgets:
        if i >= len(values):
            break
        mapped[name] = values[i]
        i += 1
        if has_control_widget(name, spec) and i < len(values) and values[i] in CONTROL_VALUES:
            i += 1
    return mapped, list(values[i:])


def _fits(spec, value) -> bool:
    kind = spec_type(spec)
    if kind == "INT":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "FLOAT":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "BOOLEAN":
        return isinstance(value, bool)
    if kind in ("STRING", "COMBO"):
        return isinstance(value, str)
    return True


def widget_value_mismatches(workflow: dict, object_info: dict) -> list[str]:
    """Nodes whose saved widget values do not line up with the server's inputs (values of the wrong type,
    or more values than widgets): the workflow was saved with another version of that node, and
    positional values may land on the wrong inputs."""
    problems = []
    if not isinstance(workflow, dict) or is_api_prompt(workflow):
        return problems
    for node in workflow.get("nodes") or []:
        info = object_info.get(node.get("type"))
        values = node.get("widgets_values")
        if info is None or not isinstance(values, list):
            continue
        widgets = widget_inputs(info)
        mapped, left = map_widget_values(widgets, values)
        specs = dict(widgets)
        wrong = [f"{name}={value!r}" for name, value in mapped.items() if not _fits(specs[name], value)]
        if any(is_upload_input(spec) for spec in specs.values()):
            left = left[1:]  # the upload button's value
        if wrong or left:
            detail = (
                f"values of the wrong type: {', '.join(wrong)}" if wrong else f"{len(left)} value(s) too many"
            )
            problems.append(f"{_node_label(node)}: {detail}")
    return problems


def workflow_to_prompt(workflow: dict, object_info: dict) -> dict:
    """API prompt ({id: {"class_type", "inputs", "_meta"}}) from a UI-format workflow.

    An API prompt passes through (copied). Raises WorkflowError for node types the server lacks,
    subgraphs and malformed graphs.
    """
    check_workflow_format(workflow)
    if is_api_prompt(workflow):
        return json.loads(json.dumps(workflow))
    nodes = {int(n["id"]): n for n in workflow["nodes"]}
    links = _links(workflow)
    subgraphs = {s.get("id") for s in (workflow.get("definitions", {}) or {}).get("subgraphs", []) or []}

    for node in nodes.values():
        kind = node.get("type")
        if kind in subgraphs:
            raise WorkflowError(
                f"{_node_label(node)} is a subgraph; x2edit-run does not expand subgraphs. Unpack it in "
                "ComfyUI (right-click > Unpack Subgraph) and save the workflow again."
            )
        if kind not in FRONTEND_ONLY and kind not in object_info:
            hint = " (a group node: ungroup it in ComfyUI and save again)" if "workflow>" in str(kind) else ""
            raise WorkflowError(
                f"{_node_label(node)}: ComfyUI has no node type {kind!r}{hint}. Install the node pack that "
                "provides it, or check that it loaded (the server log lists import failures)."
            )

    def resolve(link_id, seen=()):
        """("link", [id, slot]) | ("value", v) | None for what a link delivers."""
        if link_id is None:
            return None
        if link_id not in links:
            raise WorkflowError(f"the workflow refers to link {link_id}, which its 'links' list lacks")
        if link_id in seen:
            raise WorkflowError(f"link {link_id} is part of a cycle of reroutes or bypassed nodes")
        seen = (*seen, link_id)
        source_id, slot, _, _, link_type = links[link_id]
        source = nodes.get(source_id)
        if source is None:
            raise WorkflowError(f"link {link_id} comes from node {source_id}, which is not in the workflow")
        kind = source.get("type")
        mode = source.get("mode", 0)
        if mode == MODE_MUTED:
            return None
        if kind == PRIMITIVE_TYPE:
            values = source.get("widgets_values") or []
            if not values:
                raise WorkflowError(f"{_node_label(source)} has no value")
            return ("value", values[0])
        if kind == REROUTE_TYPE:
            inputs = source.get("inputs") or []
            return resolve(inputs[0].get("link"), seen) if inputs else None
        if kind in NOTE_TYPES:
            return None
        if mode == MODE_BYPASSED:
            outputs = source.get("outputs") or []
            out_type = outputs[slot].get("type", link_type) if slot < len(outputs) else link_type
            inputs = source.get("inputs") or []
            candidates = []
            if slot < len(inputs) and _types_match(inputs[slot].get("type"), out_type):
                candidates.append(inputs[slot])
            candidates += [i for i in inputs if _types_match(i.get("type"), out_type)]
            for candidate in candidates:
                if candidate.get("link") is not None:
                    return resolve(candidate.get("link"), seen)
            return None
        return ("link", [str(source_id), slot])

    prompt = {}
    for node_id, node in sorted(nodes.items()):
        kind = node.get("type")
        if kind in FRONTEND_ONLY or node.get("mode", 0) in (MODE_MUTED, MODE_BYPASSED):
            continue
        info = object_info[kind]
        inputs: dict = {}
        values = node.get("widgets_values")
        widgets = widget_inputs(info)
        if isinstance(values, dict):
            for name, _ in widgets:
                if name in values:
                    inputs[name] = values[name]
        elif isinstance(values, list):
            inputs.update(map_widget_values(widgets, values)[0])
        known = {name for name, _, _ in node_inputs(info)}
        for slot in node.get("inputs") or []:
            name = slot.get("name")
            if name not in known:
                widget = slot.get("widget") or {}
                name = widget.get("name", name)
            if name not in known or slot.get("link") is None:
                continue
            value = resolve(slot["link"])
            if value is None:  # from a muted node: a converted widget keeps its own value
                continue
            inputs[name] = value[1]
        title = node.get("title") or info.get("display_name") or kind
        prompt[str(node_id)] = {"class_type": kind, "inputs": inputs, "_meta": {"title": title}}
    if not prompt:
        raise WorkflowError("the workflow has no nodes to run (all are notes, muted or bypassed)")
    return prompt


# --------------------------------------------------------------------------------------------------
# Substitutions on an API prompt

# role -> (node type, input) pairs it sets; where the files go, for error messages
MODEL_ROLES: dict[str, tuple[tuple[str, str], ...]] = {
    "unet": (("UNETLoader", "unet_name"),),
    "lora": (
        ("LoraLoaderModelOnly", "lora_name"),
        ("LoraLoader", "lora_name"),
        ("X2EditMoELoRALoader", "lora_name"),
    ),
    "vae": (("VAELoader", "vae_name"),),
    "clip_l": (("DualCLIPLoader", "clip_name1"),),
    "t5": (("DualCLIPLoader", "clip_name2"),),
    "checkpoint": (("CheckpointLoaderSimple", "ckpt_name"),),
}
MODEL_FOLDERS = {
    "UNETLoader": "models/diffusion_models",
    "LoraLoaderModelOnly": "models/loras",
    "LoraLoader": "models/loras",
    "X2EditMoELoRALoader": "models/loras",
    "VAELoader": "models/vae",
    "DualCLIPLoader": "models/text_encoders",
    "CLIPLoader": "models/text_encoders",
    "CheckpointLoaderSimple": "models/checkpoints",
}
# Every node that reads the edit instruction: the prompt, the text encoder, the task router and the
# early filter's judge must all see the same text.
INSTRUCTION_INPUTS = (
    ("X2EditICPrompt", "instruction"),
    ("X2EditTextEncode", "instruction"),
    ("X2EditTaskRouter", "instruction"),
    ("X2EditEarlyFilter", "instruction"),
)
IMAGE_INPUTS = (("LoadImage", "image"),)


def _nodes_of_type(prompt: dict, pairs) -> list[tuple[str, str]]:
    return [(nid, name) for nid, node in prompt.items() for kind, name in pairs if node["class_type"] == kind]


def find_nodes(prompt: dict, ref: str) -> list[str]:
    """Node ids matching ``ref``: an id, else a title (case-insensitive), else a node type."""
    ref = str(ref).strip()
    if ref in prompt:
        return [ref]
    by_title = [
        nid for nid, n in prompt.items() if n.get("_meta", {}).get("title", "").lower() == ref.lower()
    ]
    if by_title:
        return by_title
    by_type = [nid for nid, n in prompt.items() if n["class_type"] == ref]
    if by_type:
        return by_type
    listing = ", ".join(
        f"{nid} {n.get('_meta', {}).get('title', n['class_type'])!r}" for nid, n in prompt.items()
    )
    raise WorkflowError(f"no node with id, title or type {ref!r} in the workflow; its nodes: {listing}")


def coerce_value(spec, raw, where: str):
    """A command-line string as the value an input of type ``spec`` takes."""
    if not isinstance(raw, str):
        return raw
    kind = spec_type(spec)
    try:
        if kind == "INT":
            return int(raw)
        if kind == "FLOAT":
            return float(raw)
    except ValueError:
        raise WorkflowError(f"{where} takes a number ({kind}), got {raw!r}") from None
    if kind == "BOOLEAN":
        low = raw.strip().lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise WorkflowError(f"{where} takes true or false, got {raw!r}")
    if kind in ("STRING", "COMBO"):
        return raw
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _where(prompt: dict, nid: str, name: str) -> str:
    node = prompt[nid]
    title = node.get("_meta", {}).get("title")
    shown = f" {title!r}" if title and title != node["class_type"] else ""
    return f"node {nid} ({node['class_type']}{shown}).{name}"


def set_input(prompt: dict, object_info: dict, ref: str, name: str, raw) -> list[str]:
    """Set input ``name`` of the nodes ``ref`` names (see find_nodes) to ``raw``; returns their ids."""
    ids = find_nodes(prompt, ref)
    for nid in ids:
        info = object_info.get(prompt[nid]["class_type"], {})
        spec = input_spec(info, name)
        if spec is None:
            names = ", ".join(n for n, _, _ in node_inputs(info))
            raise WorkflowError(
                f"{_where(prompt, nid, name)}: this node has no input {name!r}; its inputs: {names}"
            )
        prompt[nid]["inputs"][name] = coerce_value(spec, raw, _where(prompt, nid, name))
    return ids


def parse_assignment(text: str) -> tuple[str, str, str]:
    """``"NODE.input=value"`` -> (node ref, input, value); the node ref may contain dots."""
    target, sep, value = text.partition("=")
    ref, dot, name = target.rpartition(".")
    if not sep or not dot or not ref.strip() or not name.strip():
        raise WorkflowError(f"--set expects NODE.input=value (NODE: id, title or type), got {text!r}")
    return ref.strip(), name.strip(), value


def set_role_model(prompt: dict, role: str, name: str) -> list[str]:
    if role not in MODEL_ROLES:
        raise WorkflowError(f"unknown model role {role!r}; roles: {', '.join(MODEL_ROLES)}")
    targets = _nodes_of_type(prompt, MODEL_ROLES[role])
    if not targets:
        kinds = ", ".join(k for k, _ in MODEL_ROLES[role])
        raise WorkflowError(f"--model {role}=...: the workflow has no {kinds} node")
    for nid, input_name in targets:
        prompt[nid]["inputs"][input_name] = name
    return [nid for nid, _ in targets]


def _set_all(prompt: dict, pairs, value, what: str) -> list[str]:
    targets = _nodes_of_type(prompt, pairs)
    if not targets:
        raise WorkflowError(f"the workflow has no node that takes {what} ({', '.join(k for k, _ in pairs)})")
    for nid, input_name in targets:
        prompt[nid]["inputs"][input_name] = value
    return [nid for nid, _ in targets]


def set_instruction(prompt: dict, instruction: str) -> list[str]:
    if not isinstance(instruction, str) or not instruction.strip():
        raise WorkflowError(
            "the instruction is empty; say what should change, e.g. --instruction 'make the car red'"
        )
    return _set_all(prompt, INSTRUCTION_INPUTS, instruction, "an instruction")


def set_image(prompt: dict, image_name: str) -> list[str]:
    return _set_all(prompt, IMAGE_INPUTS, image_name, "an input image")


def set_seed(prompt: dict, object_info: dict, seed: int) -> list[str]:
    """Set every seed input (INT inputs with a control_after_generate widget, or named seed/noise_seed)."""
    done = []
    for nid, node in prompt.items():
        for name, spec, _ in node_inputs(object_info.get(node["class_type"], {})):
            if (
                spec_type(spec) == "INT"
                and has_control_widget(name, spec)
                and not isinstance(node["inputs"].get(name), list)
            ):
                node["inputs"][name] = int(seed)
                done.append(nid)
    if not done:
        raise WorkflowError("--seed: the workflow has no seed input (KSampler, RandomNoise, ...)")
    return done


def replace_node_type(prompt: dict, object_info: dict, old: str, new: str) -> list[str]:
    """Swap every ``old`` node for a ``new`` one (a testing/debugging aid, e.g. a stand-in loader).

    Inputs the new type also has are kept; its missing widget inputs get their defaults.
    """
    if new not in object_info:
        raise WorkflowError(f"--replace-node-type {old}={new}: ComfyUI has no node type {new!r}")
    ids = [nid for nid, node in prompt.items() if node["class_type"] == old]
    if not ids:
        raise WorkflowError(f"--replace-node-type {old}={new}: the workflow has no {old} node")
    info = object_info[new]
    for nid in ids:
        old_inputs = prompt[nid]["inputs"]
        inputs = {}
        for name, spec, required in node_inputs(info):
            if name in old_inputs:
                inputs[name] = old_inputs[name]
            elif required and is_widget(spec) and "default" in _spec_options(spec):
                inputs[name] = _spec_options(spec)["default"]
            elif required and combo_options(spec):
                inputs[name] = combo_options(spec)[0]
        prompt[nid] = {"class_type": new, "inputs": inputs, "_meta": {"title": f"{new} (for {old})"}}
    return ids


def check_combo_values(prompt: dict, object_info: dict) -> None:
    """Raise MissingModelError for a combo value the server does not list (typically a model file)."""
    problems = []
    for nid, node in prompt.items():
        info = object_info.get(node["class_type"], {})
        for name, spec, _ in node_inputs(info):
            value = node["inputs"].get(name)
            options = combo_options(spec)
            if (
                options is None
                or isinstance(value, list)
                or name not in node["inputs"]
                or is_upload_input(spec)
            ):
                continue
            if value in options:
                continue
            folder = MODEL_FOLDERS.get(node["class_type"])
            roles = [r for r, pairs in MODEL_ROLES.items() if (node["class_type"], name) in pairs]
            shown = ", ".join(repr(o) for o in options[:40]) + (
                f", ... ({len(options)} in all)" if len(options) > 40 else ""
            )
            line = f"{_where(prompt, nid, name)} = {value!r} is not available. "
            line += f"ComfyUI lists: {shown}." if options else "ComfyUI lists nothing for it."
            if folder:
                line += f" Put the file in ComfyUI's {folder} folder"
                line += f", or pass --model {roles[0]}=NAME." if roles else "."
            problems.append(line)
    if problems:
        raise MissingModelError(
            "the workflow names values the server does not have:\n  " + "\n  ".join(problems)
        )


# --------------------------------------------------------------------------------------------------
# Server error text


def format_rejection(data, body: str, prompt: dict | None = None) -> str:
    """A readable summary of a POST /prompt 400 answer, followed by the body verbatim."""
    lines = ["ComfyUI rejected the prompt."]
    if isinstance(data, dict):
        error = data.get("error") or {}
        if isinstance(error, dict) and error.get("message"):
            details = f": {error['details']}" if error.get("details") else ""
            lines.append(f"{error['message']}{details}")
        for nid, node_error in (data.get("node_errors") or {}).items():
            kind = node_error.get("class_type", "?")
            title = ((prompt or {}).get(str(nid), {}).get("_meta") or {}).get("title")
            label = f"node {nid} ({kind}{f' {title!r}' if title and title != kind else ''})"
            for e in node_error.get("errors", []):
                details = f": {e['details']}" if e.get("details") else ""
                lines.append(f"  {label}: {e.get('message', '')}{details}")
    lines.append(f"server response: {body}")
    return "\n".join(lines)


def format_execution_error(prompt_id: str, messages: list) -> str:
    for message in messages or []:
        if isinstance(message, (list, tuple)) and len(message) == 2 and message[0] == "execution_error":
            data = message[1]
            trace = "".join(data.get("traceback") or [])
            return (
                f"ComfyUI failed while running node {data.get('node_id')} ({data.get('node_type')}): "
                f"{data.get('exception_type')}: {data.get('exception_message')}\n"
                f"server traceback:\n{trace}".rstrip()
            )
        if isinstance(message, (list, tuple)) and len(message) == 2 and message[0] == "execution_interrupted":
            return f"ComfyUI prompt {prompt_id} was interrupted (node {message[1].get('node_id')})"
    return f"ComfyUI prompt {prompt_id} failed; status messages: {json.dumps(messages)}"


# --------------------------------------------------------------------------------------------------
# HTTP client


def _multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes, str]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        )
    for name, (filename, data, content_type) in files.items():
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n"
        )
        parts.append(head.encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


class ComfyAPI:
    """The few ComfyUI HTTP endpoints x2edit-run needs."""

    def __init__(self, url: str = "http://127.0.0.1:8188", timeout: float = 60.0):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.client_id = uuid.uuid4().hex

    def _open(self, path: str, data: bytes | None = None, headers: dict | None = None, method=None):
        request = urllib.request.Request(f"{self.url}{path}", data=data, headers=headers or {}, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError:
            raise
        except (TimeoutError, urllib.error.URLError, ConnectionError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ComfyServerError(
                f"cannot reach ComfyUI at {self.url} ({reason}); start it, check --url, or pass "
                "--comfyui-root to let x2edit-run start one"
            ) from None

    def get_json(self, path: str):
        try:
            return json.loads(self._open(path) or b"null")
        except urllib.error.HTTPError as e:
            body = e.read().decode("utf-8", errors="replace")
            raise ComfyServerError(f"GET {path} answered HTTP {e.code}: {body}") from None

    def post_json(self, path: str, payload):
        data = json.dumps(payload).encode()
        return json.loads(self._open(path, data, {"Content-Type": "application/json"}) or b"null")

    def alive(self) -> bool:
        try:
            self._open("/system_stats")
            return True
        except (ComfyServerError, urllib.error.HTTPError):
            return False

    def object_info(self) -> dict:
        return self.get_json("/object_info")

    def upload_image(self, path: str | Path, name: str | None = None) -> str:
        """POST /upload/image into the input folder; returns the value for LoadImage's image input."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise WorkflowError(f"cannot read the input image {str(path)!r}: {e.strerror or e}") from None
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        body, header = _multipart(
            {"type": "input", "overwrite": "true"}, {"image": (name or path.name, data, content_type)}
        )
        try:
            answer = json.loads(self._open("/upload/image", body, {"Content-Type": header}, method="POST"))
        except urllib.error.HTTPError as e:
            text = e.read().decode("utf-8", errors="replace")
            raise ComfyServerError(f"ComfyUI refused the image upload (HTTP {e.code}): {text}") from None
        subfolder = answer.get("subfolder") or ""
        return f"{subfolder}/{answer['name']}" if subfolder else answer["name"]

    def queue(self, prompt: dict) -> str:
        """POST /prompt; returns the prompt id. PromptRejectedError carries the 400 body verbatim."""
        try:
            answer = self.post_json("/prompt", {"prompt": prompt, "client_id": self.client_id})
        except urllib.error.HTTPError as e:
            raise PromptRejectedError(e.read().decode("utf-8", errors="replace"), prompt) from None
        if answer.get("node_errors"):
            raise PromptRejectedError(json.dumps(answer), prompt)
        return answer["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        return (self.get_json(f"/history/{prompt_id}") or {}).get(prompt_id)

    def queue_position(self, prompt_id: str) -> int | None:
        """0 while running, n when n prompts run or wait before it, None when not in the queue."""
        queue = self.get_json("/queue") or {}
        for item in queue.get("queue_running", []):
            if len(item) > 1 and item[1] == prompt_id:
                return 0
        pending = sorted(queue.get("queue_pending", []), key=lambda item: item[0])
        for i, item in enumerate(pending):
            if len(item) > 1 and item[1] == prompt_id:
                return i + len(queue.get("queue_running", []))
        return None

    def wait(
        self, prompt_id: str, timeout: float = 600.0, progress: Callable[[str], None] | None = None
    ) -> dict:
        """Poll until the prompt ends; returns its history entry. PromptFailedError on an execution error."""
        deadline = time.monotonic() + timeout
        delay, last = 0.05, None
        while True:
            entry = self.history(prompt_id)
            if entry is not None:
                status = entry.get("status", {}) or {}
                if status.get("status_str") == "error":
                    raise PromptFailedError(prompt_id, status.get("messages", []))
                if status.get("completed", True):
                    return entry
            if progress is not None:
                position = self.queue_position(prompt_id)
                state = "running" if position == 0 else (f"waiting ({position} ahead)" if position else None)
                if state and state != last:
                    progress(state)
                    last = state
            if time.monotonic() > deadline:
                self.interrupt(prompt_id)
                raise ComfyServerError(
                    f"prompt {prompt_id} did not finish within {timeout:.0f} s (interrupted)"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def interrupt(self, prompt_id: str) -> None:
        """Best effort: drop ``prompt_id`` from the queue, or stop it if it is running (not other prompts)."""
        for path, payload in (("/queue", {"delete": [prompt_id]}), ("/interrupt", {"prompt_id": prompt_id})):
            try:
                self.post_json(path, payload)
            except (ComfyServerError, urllib.error.HTTPError, ValueError):
                pass

    def download(self, filename: str, subfolder: str = "", kind: str = "output") -> bytes:
        query = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": kind})
        try:
            return self._open(f"/view?{query}")
        except urllib.error.HTTPError as e:
            raise ComfyServerError(f"cannot download {filename!r} from ComfyUI (HTTP {e.code})") from None


def output_images(entry: dict, prompt: dict | None = None) -> list[dict]:
    """Images a history entry reports, saved ones (type "output") first, in node-id order."""
    found = []
    for nid, outputs in sorted((entry.get("outputs") or {}).items(), key=lambda kv: (len(kv[0]), kv[0])):
        for item in outputs.get("images", []) or []:
            if isinstance(item, dict) and "filename" in item:
                found.append({**item, "node_id": nid})
    return sorted(found, key=lambda item: item.get("type", "output") != "output")


# --------------------------------------------------------------------------------------------------
# Progress messages over ComfyUI's websocket (websocket-client, the `run` extra; polling decides
# completion either way)

WEBSOCKET_MISSING = (
    "progress over ComfyUI's websocket needs the websocket-client package (pip install 'x2edit[run]'); "
    "polling the queue instead"
)


def websocket_url(url: str, client_id: str) -> str:
    """ComfyUI's /ws address for ``url`` (http -> ws, https -> wss) and one client id."""
    parsed = urllib.parse.urlsplit(url)
    scheme = "wss" if parsed.scheme == "https" else "ws"
    query = urllib.parse.urlencode({"clientId": client_id})
    return urllib.parse.urlunsplit((scheme, parsed.netloc, f"{parsed.path.rstrip('/')}/ws", query, ""))


class ProgressListener:
    """Reads ComfyUI's /ws messages for one client id in a thread and reports progress lines.

    Best effort: when websocket-client is not installed or the socket cannot be opened, ``start``
    returns False, ``unavailable`` says why, and the caller polls instead.
    """

    def __init__(self, url: str, client_id: str, report: Callable[[str], None], prompt: dict | None = None):
        self.url, self.client_id, self.report = url, client_id, report
        self.prompt = prompt or {}
        self.prompt_id: str | None = None
        self.unavailable: str | None = None
        self._ws = None
        self._thread = None
        self._last_step = (None, -1.0)

    def start(self, timeout: float = 5.0) -> bool:
        import threading

        try:
            import websocket  # websocket-client
        except ImportError:
            self.unavailable = WEBSOCKET_MISSING
            return False
        try:
            self._ws = websocket.create_connection(websocket_url(self.url, self.client_id), timeout=timeout)
        except (OSError, ValueError, websocket.WebSocketException) as e:
            self.unavailable = f"no progress from ComfyUI's websocket ({e}); polling the queue instead"
            return False
        self._ws.settimeout(None)
        self._thread = threading.Thread(target=self._run, args=(self._ws,), name="x2edit-run-ws", daemon=True)
        self._thread.start()
        return True

    def stop(self) -> None:
        ws, self._ws = self._ws, None
        if ws is not None:
            try:
                ws.close()
            except Exception:  # noqa: BLE001 - closing a socket that is already gone
                pass

    def _run(self, ws) -> None:
        try:
            while self._ws is ws:
                message = ws.recv()
                if not message and not ws.connected:
                    return
                if isinstance(message, str):  # binary frames are preview images
                    self._handle(message.encode())
        except Exception:  # noqa: BLE001 - closed or broken socket: progress simply stops
            return

    def _node(self, node_id) -> str:
        node = self.prompt.get(str(node_id), {})
        title = (node.get("_meta") or {}).get("title")
        kind = node.get("class_type", "?")
        return f"node {node_id} ({kind}{f' {title!r}' if title and title != kind else ''})"

    def _handle(self, raw: bytes) -> None:
        try:
            message = json.loads(raw)
        except ValueError:
            return
        kind, data = message.get("type"), message.get("data") or {}
        if self.prompt_id is not None and data.get("prompt_id") not in (None, self.prompt_id):
            return
        if kind == "executing" and data.get("node") is not None:
            self.report(f"running {self._node(data['node'])}")
        elif kind == "execution_cached" and data.get("nodes"):
            self.report(f"cached: {len(data['nodes'])} node(s)")
        elif kind == "progress":
            value, total = data.get("value", 0), data.get("max", 0)
            now = time.monotonic()
            node, last = self._last_step
            if value == total or node != data.get("node") or now - last >= 1.0:
                self._last_step = (data.get("node"), now)
                self.report(f"  step {value}/{total}")
