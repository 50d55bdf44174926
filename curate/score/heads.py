"""Score heads on CLIP image embeddings: the LAION aesthetic predictor format and heads like it.

A head file is one of:

- a PyTorch state dict (``.pth``/``.pt``/``.bin``, or ``.safetensors``) of linear layers, the architecture
  read from its keys and shapes: ``weight`` + ``bias`` is one ``Linear`` (LAION's
  ``sa_0_4_vit_l_14_linear.pth``, 768 -> 1); ``layers.0.weight ... layers.7.bias`` (any prefix before the
  index) is a chain of ``Linear`` layers applied in index order, the missing indices being dropout,
  which is the identity at inference (LAION's ``improved-aesthetic-predictor`` MLP 768 -> 1024 -> 128 ->
  64 -> 16 -> 1, which has no activations). A Lightning-style ``{"state_dict": ...}`` is unwrapped.
- a TorchScript module (``torch.jit.save``) taking (N, D) float32 embeddings and returning (N, K) logits:
  any other head, activations included.

Every head gets the L2-normalised image embedding, as the LAION predictors expect. Output to score: an
aesthetic head returns one value (LAION's scale, about 1..10); a probability head (nsfw, watermark) returns
one logit (sigmoid) or two (softmax, then the `positive` class, 1 by default).
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from typing import Any

from curate import storage

PROBABILITY_HEADS = ("nsfw", "watermark")
HEAD_NAMES = ("aesthetic", *PROBABILITY_HEADS)
_LAYER_KEY = re.compile(r"^(?P<prefix>.*?)(?P<index>\d+)\.(?P<part>weight|bias)$")


class HeadError(ValueError):
    """A head file this module cannot use, with the reason."""


@dataclass(frozen=True)
class LinearChain:
    """The layers a state dict describes: (key prefix of each layer, in width, out width), in order."""

    layers: tuple[tuple[str, int, int], ...]

    @property
    def input_width(self) -> int:
        return self.layers[0][1]

    @property
    def output_width(self) -> int:
        return self.layers[-1][2]


def _unwrap(state: Any) -> dict[str, Any]:
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise HeadError(f"expected a state dict of tensors, got {type(state).__name__}")
    return state


def linear_chain(shapes: dict[str, tuple[int, ...]]) -> LinearChain:
    """Read the architecture from key -> shape; HeadError naming what does not fit the supported formats."""
    if set(shapes) == {"weight", "bias"}:
        groups = {"": shapes}
    else:
        indexed: dict[int, dict[str, tuple[int, ...]]] = {}
        prefixes = set()
        for key, shape in shapes.items():
            match = _LAYER_KEY.match(key)
            if match is None:
                raise HeadError(
                    f"key {key!r} is neither `weight`/`bias` nor `<prefix><index>.weight|bias` "
                    "(heads with other layers than Linear must be saved as TorchScript)"
                )
            prefixes.add(match["prefix"])
            indexed.setdefault(int(match["index"]), {})[match["part"]] = shape
        if len(prefixes) > 1:
            raise HeadError(f"layer keys with different prefixes {sorted(prefixes)}")
        (prefix,) = prefixes
        groups = {f"{prefix}{index}.": indexed[index] for index in sorted(indexed)}
    layers = []
    for prefix, parts in groups.items():
        weight, bias = parts.get("weight"), parts.get("bias")
        if weight is None or len(weight) != 2:
            raise HeadError(f"layer {prefix or '(top)'} has no 2-D weight (heads are Linear layers)")
        if bias is not None and tuple(bias) != (weight[0],):
            raise HeadError(f"layer {prefix or '(top)'}: bias {tuple(bias)} does not match weight {tuple(weight)}")
        if layers and layers[-1][2] != weight[1]:
            raise HeadError(f"layer {prefix} takes {weight[1]} inputs but the layer before gives {layers[-1][2]}")
        layers.append((prefix, int(weight[1]), int(weight[0])))
    return LinearChain(tuple(layers))


def is_torchscript(path: str) -> bool:
    """TorchScript archives carry their code; plain torch.save state dicts do not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name or name.endswith("constants.pkl") for name in archive.namelist())


def state_dict_shapes(path: str) -> dict[str, tuple[int, ...]] | None:
    """key -> shape of a head state dict on this machine; None for TorchScript files (no shapes to read)."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="numpy") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118
    if is_torchscript(path):
        return None
    import torch

    state = _unwrap(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
    return {key: tuple(value.shape) for key, value in state.items() if hasattr(value, "shape")}


def describe_head(reference: str) -> LinearChain | None:
    """The chain of a local head file, for config checks; None when only loading can tell (TorchScript, remote)."""
    if storage.has_scheme(reference) and not reference.startswith("file://"):
        return None
    shapes = state_dict_shapes(storage.resolve(reference)[1])
    return None if shapes is None else linear_chain(shapes)


def check_output(name: str, width: int) -> str | None:
    """Why a head of this kind cannot have ``width`` outputs, or None."""
    if name == "aesthetic" and width != 1:
        return f"an aesthetic head returns 1 value, this one returns {width}"
    if name in PROBABILITY_HEADS and width not in (1, 2):
        return f"a {name} head returns 1 logit (sigmoid) or 2 (softmax), this one returns {width}"
    return None


@dataclass
class Head:
    name: str  # aesthetic | nsfw | watermark
    module: Any  # torch module: (N, D) float32 -> (N, K)
    input_width: int | None  # None for TorchScript until checked against the model
    output_width: int
    positive: int = 1  # the class a two-logit probability head scores

    def score(self, embeddings: Any) -> Any:
        """(N, D) L2-normalised float32 embeddings -> (N,) float32 scores."""
        import torch

        with torch.inference_mode():
            out = self.module(embeddings).float()
        if self.name == "aesthetic":
            return out[:, 0]
        if out.shape[1] == 1:
            return torch.sigmoid(out[:, 0])
        return torch.softmax(out, dim=1)[:, self.positive]


def build_chain(chain: LinearChain, state: dict[str, Any]) -> Any:
    """The chain as a torch module holding the state dict's weights (float32)."""
    import torch

    class LinearHead(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList(
                torch.nn.Linear(i, o, bias=f"{p}bias" in state) for p, i, o in chain.layers
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = layer(x)
            return x

    module = LinearHead()
    with torch.no_grad():
        for layer, (prefix, _, _) in zip(module.layers, chain.layers, strict=True):
            layer.weight.copy_(state[f"{prefix}weight"].float())
            if layer.bias is not None:
                layer.bias.copy_(state[f"{prefix}bias"].float())
    return module.eval()


def load_head(name: str, reference: str, device: str = "cpu", positive: int = 1) -> Head:
    """Load a head file (local path, URL or package://); HeadError when it has no supported format."""
    import torch

    from curate.model_paths import local_model_file

    path = local_model_file(reference)
    if is_torchscript(path):
        module = torch.jit.load(path, map_location=device).eval()
        return Head(name, module, None, 0, positive)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = _unwrap(torch.load(path, map_location="cpu", weights_only=True))
    chain = linear_chain({key: tuple(value.shape) for key, value in state.items()})
    problem = check_output(name, chain.output_width)
    if problem:
        raise HeadError(f"{reference}: {problem}")
    return Head(name, build_chain(chain, state).to(device), chain.input_width, chain.output_width, positive)


def check_against(head: Head, width: int, device: str, reference: str) -> None:
    """Fail at setup when the head does not take the model's embeddings or gives the wrong outputs."""
    import torch

    if head.input_width is not None:
        if head.input_width != width:
            raise HeadError(
                f"{reference}: the {head.name} head takes {head.input_width}-d embeddings, CLIP gives {width}-d"
            )
        return
    try:  # TorchScript: try it on one zero embedding
        with torch.inference_mode():
            out = head.module(torch.zeros(1, width, device=device))
    except Exception as e:
        raise HeadError(f"{reference}: the {head.name} head fails on a {width}-d embedding: {e}") from e
    if out.ndim != 2 or out.shape[0] != 1:
        raise HeadError(f"{reference}: the {head.name} head returns shape {tuple(out.shape)}, expected (N, K)")
    problem = check_output(head.name, int(out.shape[1]))
    if problem:
        raise HeadError(f"{reference}: {problem}")
    head.input_width, head.output_width = width, int(out.shape[1])
