"""The model card of an export folder (``README.md``, the page the Hugging Face Hub shows): what
was trained, with which method, hyper-parameters, input and budget (all read from the checkpoint),
its rows in a benchmark store, how to load each file, and that uploading is the user's step."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ssl_kit.bench.report.summary import CURVE, RANDOM_INIT, gain_text, percent, summarize
from ssl_kit.checkpoints import MOVED_CLASSES, saved_input_spec, upgrade_hparams
from ssl_kit.inputs import InputSpec
from ssl_kit.models.backbones import BackboneSpec
from ssl_kit.models.saved import ONNX_INPUT, ONNX_OUTPUT, build_instructions, timm_builds

#: Model hyper-parameters that a store row's config holds only as their defaults: the CLI links
#: them from the data when it builds the model, so they say nothing about the row's run.
LINKED_FROM_DATA = ("input_spec", "num_classes", "image_size")
#: How each modality's sample axes read, after the channels.
AXES = {"image": "height × width", "audio": "mel bands × frames", "video": "frames × height × width"}


def method_config(hparams: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's method hyper-parameters as a store row's ``config.fit.model.init_args`` holds
    them: JSON values, without Lightning's private keys and the data-linked ones."""
    plain = json.loads(json.dumps(upgrade_hparams(hparams), default=str))
    return {key: value for key, value in plain.items() if not key.startswith("_") and key not in LINKED_FROM_DATA}


def card_rows(rows: list[dict], hparams: dict[str, Any]) -> list[dict]:
    """The store rows of a checkpoint's configuration: ssl_kit's pipeline (not lightly's) of the
    same method class with the same value of every hyper-parameter both record (a row written
    before an argument existed has no say on it), and the random-init rows of the same dataset
    and backbone they are measured against."""
    class_path, wanted = upgrade_hparams(hparams).get("_class_path"), method_config(hparams)

    def same_configuration(row: dict) -> bool:
        model = row["config"].get("fit", {}).get("model", {})
        if row["config"].get("pipeline", "ssl_kit") != "ssl_kit" or MOVED_CLASSES.get(model.get("class_path"), model.get("class_path")) != class_path:
            return False
        recorded = model.get("init_args", {})
        return all(recorded[key] == value for key, value in wanted.items() if key in recorded)

    matched = [same_configuration(row) for row in rows]
    compared = {(row["dataset"], row["backbone"]) for row, match in zip(rows, matched) if match}
    return [
        row for row, match in zip(rows, matched)
        if row["protocol"] != CURVE and (match or (row["method"] == RANDOM_INIT and (row["dataset"], row["backbone"]) in compared))
    ]  # fmt: skip


def model_card(
    checkpoint: dict[str, Any], source: str | Path, spec: BackboneSpec, num_features: int, files: dict[str, Path],
    store_rows: list[dict] | None = None, store_path: str | Path | None = None,
) -> str:  # fmt: skip
    """The card of an export folder: ``checkpoint`` (read from ``source``) gives the method,
    hyper-parameters, input and budget; ``files`` (by format, from ``export_folder``) what to load;
    ``store_rows`` (all rows of the store at ``store_path``) the results of this configuration."""
    hparams = checkpoint.get("hyper_parameters", {})
    input_spec = saved_input_spec(hparams)
    class_path = upgrade_hparams(hparams).get("_class_path", "an ssl_kit method")
    method = class_path.rsplit(".", 1)[-1]
    folder = files["config"].parent
    lines = ["---", "tags:", "- ssl_kit", "- self-supervised-learning", f"- {input_spec.modality}"]
    lines += ["library_name: timm"] if timm_builds(spec) else []
    lines += [
        "---", "", f"# {method} backbone: {spec.name}", "",
        f"A backbone for {input_spec.modality} inputs pretrained with ssl_kit's `{class_path}`, exported from `{source}`. "
        f"It maps a batch of inputs to {num_features}-d features: the pooled features ssl_kit's linear, kNN and few-label probes read.",
        "", "## Backbone", "",
        f"- architecture: `{spec.name}`, built by `timm.create_model` with `{json.dumps(spec.kwargs)}`" + (", and ssl_kit's small-image stem (3×3 stride-1 first convolution, no max-pool)" if spec.cifar_stem else ""),
        f"- input: {describe_input(input_spec)}",
        f"- output: {num_features}-d features",
        "", "## Training", "",
        f"- method: `{class_path}`",
        f"- budget: this checkpoint was saved at epoch {checkpoint.get('epoch', '?')} (counted from 0), after {checkpoint.get('global_step', '?')} optimizer steps",
        "", "| hyper-parameter | value |", "|---|---|",
        *(f"| `{key}` | `{json.dumps(value)}` |" for key, value in method_config(hparams).items()),
        "", "## Results", "", *results_section(store_rows, store_path, hparams, method),
        "", "## Files and how to load them", "", *loading_section(spec, input_spec, files, folder),
        "", "## Uploading", "",
        "ssl_kit wrote these files without any network access, and uploads nothing. Publishing them is your step, for "
        f"example to the Hugging Face Hub: `huggingface-cli login`, then `huggingface-cli upload USER/REPO {folder} .` "
        "(`hf upload` in recent huggingface_hub releases).",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def describe_input(input_spec: InputSpec) -> str:
    """One sample's shape and how it is normalised, in words."""
    shape = " × ".join(map(str, (input_spec.channels, *input_spec.shape)))
    text = f"{input_spec.modality}, {shape} (channels × {AXES[input_spec.modality]})"
    if input_spec.front_end is not None:
        settings = ", ".join(f"{key}={value}" for key, value in asdict(input_spec.front_end).items())
        text += f", log-mel spectrograms made by ssl_kit's front end ({settings})"
    if input_spec.mean is not None:
        text += f", normalised with mean {list(input_spec.mean)} and std {list(input_spec.std or ())}"
    return text


def results_section(store_rows: list[dict] | None, store_path: str | Path | None, hparams: dict[str, Any], method: str) -> list[str]:
    """The store's rows of this configuration as a table (mean ± std over seeds, in %), or why there is none."""
    if store_rows is None:
        return ["No results store was given: `python -m ssl_kit.export CKPT FOLDER --store benchmarks/results/NAME.sqlite` lists its rows of this configuration here."]
    entries = summarize(card_rows(store_rows, hparams))
    if not entries:
        return [f"`{store_path}` has no rows of this configuration (ssl_kit's {method} with these hyper-parameters)."]
    return [
        f"From `{store_path}`: the rows of ssl_kit's {method} with these hyper-parameters, and the random-init rows of the same "
        "backbone and dataset they are measured against. Mean ± sample std over seeds (over folds for cross-validated rows), in %; "
        "the gain is in points.",
        "", "| dataset | method | backbone | protocol | metric | value | seeds | gain over random init |", "|---|---|---|---|---|---:|---:|---:|",
        *(
            f"| {e['dataset']} | {e['method']} | `{e['backbone']}` | {e['protocol']} | {e['metric']} | {percent(e)} | {e['n']} | {gain_text(e)} |"
            for e in entries
        ),
    ]  # fmt: skip


def loading_section(spec: BackboneSpec, input_spec: InputSpec, files: dict[str, Path], folder: Path) -> list[str]:
    """How to load each file the export wrote."""
    shape = ", ".join(map(str, (input_spec.channels, *input_spec.shape)))
    lines = [f"- `config.json`: timm's model config (`architecture`, `model_args`, `pretrained_cfg`) and an `ssl_kit` section (input, small-image stem, how to build)."]
    if "safetensors" in files:
        lines += [
            f"- `{files['safetensors'].name}`: the weights under timm's parameter names, read without unpickling. "
            f"Rebuild the backbone with {build_instructions(spec, str(folder))}:",
            "", "```python", "from ssl_kit.models import load_exported_backbone", "",
            f"backbone = load_exported_backbone({str(folder)!r}).eval()", "```", "",
        ]  # fmt: skip
        if timm_builds(spec):
            lines += ["  Once uploaded, `timm.create_model('hf-hub:USER/REPO', pretrained=True)` builds it from the Hub.", ""]
    if "onnx" in files:
        lines += [
            f"- `{files['onnx'].name}`: the feature function, input `{ONNX_INPUT}` of shape (batch, {shape}) with any batch size, output `{ONNX_OUTPUT}` (batch, features):",
            "", "```python", "import numpy as np", "import onnxruntime", "",
            f"session = onnxruntime.InferenceSession({str(files['onnx'])!r})",
            f"features = session.run([{ONNX_OUTPUT!r}], {{{ONNX_INPUT!r}: np.zeros((4, {shape}), dtype=np.float32)}})[0]", "```",
        ]  # fmt: skip
    return lines
