"""``python -m ssl_kit.export CKPT OUT``: the trained backbone of a checkpoint, ready to leave ssl_kit.

``OUT`` ending in ``.pt`` (or ``.pth``): a timm state dict, with its build spec in ``OUT.json``;
``ssl_kit.models.load_exported_backbone(OUT)`` rebuilds it, and plain ``timm.create_model`` with
the keyword arguments the command prints, except for small-image ResNets (their stem is ssl_kit's).

Any other ``OUT`` is a folder, laid out as timm and the Hugging Face Hub expect a model:
``model.safetensors`` (the weights), ``model.onnx`` (the feature function, any batch size; the
``export`` extra), ``config.json`` (timm's model config plus an ``ssl_kit`` section) and
``README.md``, a model card from the checkpoint's hyper-parameters and, with ``--store``, the
rows of a benchmark store for this configuration. ``--formats`` picks among safetensors and onnx.
``load_exported_backbone(OUT)`` rebuilds any folder; ``timm.create_model("local-dir:OUT",
pretrained=True)`` the plain timm architectures. Loads weights only (no optimizer, no trainer),
unpickles nothing and needs no network: uploading (``huggingface-cli upload USER/REPO OUT``) is
the user's step.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from ssl_kit.bench.store import ResultStore
from ssl_kit.checkpoints import read_checkpoint, saved_input_spec
from ssl_kit.model_card import model_card
from ssl_kit.models.backbones import BackboneSpec, build_from_spec
from ssl_kit.models.saved import FOLDER_FORMATS, backbone_from_checkpoint, export_backbone, export_folder

#: Suffixes that make ``OUT`` a single state-dict file rather than a folder.
STATE_DICT_SUFFIXES = (".pt", ".pth")
CARD_FILE = "README.md"


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="ssl_kit checkpoint (.ckpt)")
    parser.add_argument("out", help="a .pt file (the state dict, spec in OUT.json), or a folder for --formats, config.json and README.md")
    parser.add_argument(
        "--formats", nargs="+", choices=FOLDER_FORMATS, help=f"what a folder holds besides config.json and README.md (default: {' '.join(FOLDER_FORMATS)})"
    )
    parser.add_argument("--store", help="a benchmark results store (.sqlite): the model card lists its rows of this configuration")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.suffix in STATE_DICT_SUFFIXES:
        if args.formats or args.store:
            parser.error(f"--formats and --store write a folder: give a folder as OUT, not the state-dict file {out}")
        return export_state_dict(args.checkpoint, out)
    return export_release(args.checkpoint, out, args.formats or FOLDER_FORMATS, args.store)


def export_state_dict(checkpoint: str | Path, out: Path) -> Path:
    """``OUT.pt``: the backbone's state dict and ``OUT.pt.json``, its build spec."""
    state, spec = backbone_from_checkpoint(checkpoint)
    out = export_backbone(state, spec, out)
    print(f"backbone {spec.name} ({len(state)} tensors) written to {out} (build spec in {out}.json)")
    print(f"load it with {loading_instructions(spec, out)}")
    return out


def export_release(checkpoint: str | Path, folder: Path, formats: Sequence[str], store: str | Path | None) -> Path:
    """The export folder: the backbone in ``formats``, its ``config.json`` and the model card."""
    store_rows = None if store is None else ResultStore(store, read_only=True).rows()  # a bad store fails before anything is written
    state, spec = backbone_from_checkpoint(checkpoint)
    metadata = read_checkpoint(checkpoint, mmap=True)
    backbone = build_from_spec(spec)
    backbone.load_state_dict(state)
    files = export_folder(backbone, spec, saved_input_spec(metadata.get("hyper_parameters", {})), folder, formats)
    files["card"] = folder / CARD_FILE
    files["card"].write_text(model_card(metadata, checkpoint, spec, backbone.num_features, files, store_rows, store))
    print(f"backbone {spec.name} written to {folder}: " + ", ".join(path.name for path in files.values()))
    return folder


def loading_instructions(spec: BackboneSpec, out: Path) -> str:
    """How to load an export: plain timm where the spec is timm's model with keyword arguments,
    ``load_exported_backbone`` where ssl_kit changed the model (the small-image ResNet stem)."""
    if spec.cifar_stem:
        return f"ssl_kit.models.load_exported_backbone({str(out)!r}) (a small-image stem, which plain timm does not build)"
    kwargs = "".join(f", {key}={value!r}" for key, value in spec.kwargs.items())
    return f"timm.create_model({spec.name!r}{kwargs}).load_state_dict(torch.load({str(out)!r})), or ssl_kit.models.load_exported_backbone({str(out)!r})"


if __name__ == "__main__":
    main()
