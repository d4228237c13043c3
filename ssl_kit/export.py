"""``python -m ssl_kit.export CKPT OUT``: the trained backbone of a checkpoint as a timm state dict.

Loads weights only (no optimizer, no trainer). ``ssl_kit.models.load_exported_backbone(OUT)``
rebuilds any export from ``OUT.json``; plain ``timm.create_model`` works with the keyword
arguments the command prints, except for small-image ResNets (their stem is ssl_kit's).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ssl_kit.models.backbones import BackboneSpec
from ssl_kit.models.saved import backbone_from_checkpoint, export_backbone


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="ssl_kit checkpoint (.ckpt)")
    parser.add_argument("out", help="output state-dict file, e.g. backbone.pt")
    args = parser.parse_args(argv)
    state, spec = backbone_from_checkpoint(args.checkpoint)
    out = export_backbone(state, spec, args.out)
    print(f"backbone {spec.name} ({len(state)} tensors) written to {out} (build spec in {out}.json)")
    print(f"load it with {loading_instructions(spec, out)}")
    return out


def loading_instructions(spec: BackboneSpec, out: Path) -> str:
    """How to load an export: plain timm where the spec is timm's model with keyword arguments,
    ``load_exported_backbone`` where ssl_kit changed the model (the small-image ResNet stem)."""
    if spec.cifar_stem:
        return f"ssl_kit.models.load_exported_backbone({str(out)!r}) (a small-image stem, which plain timm does not build)"
    kwargs = "".join(f", {key}={value!r}" for key, value in spec.kwargs.items())
    return f"timm.create_model({spec.name!r}{kwargs}).load_state_dict(torch.load({str(out)!r})), or ssl_kit.models.load_exported_backbone({str(out)!r})"


if __name__ == "__main__":
    main()
