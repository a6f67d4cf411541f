"""mmcl image-text model <-> Hugging Face transformers `CLIPModel` directory, by declarative tables.

The route is mmcl -> open_clip layout (convert.py's prefix table) -> CLIPModel names (the table below:
a key's layer index is abstracted to "{i}", the template looked up, the index put back). Three
transformations are data too:
open_clip's fused attention input projection is split into q/k/v (and joined back), the two
projections are transposed (open_clip multiplies x @ proj, transformers uses Linear weights), and the
logit scale is 0-dim. Each tower's activation becomes its `hidden_act` (gelu or quick_gelu) and back.
Architectures CLIPModel cannot express fail with the setting that blocks them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, Tuple

import torch
from open_clip.tokenizer import SimpleTokenizer

from mmcl import config as config_lib
from mmcl.checkpoint.convert import check_open_clip_compatible, from_open_clip_state, to_open_clip_state
from mmcl.config import Config
from mmcl.errors import CheckpointError, ConfigError
from mmcl.models.towers import OpenClipTextTower, OpenClipVisionTower, TextSettings, VisionSettings

# (open_clip key, CLIPModel key); "{i}" stands for a layer index, carried over.
BLOCK = [
    ("ln_1.weight", "layer_norm1.weight"),
    ("ln_1.bias", "layer_norm1.bias"),
    ("ln_2.weight", "layer_norm2.weight"),
    ("ln_2.bias", "layer_norm2.bias"),
    ("attn.out_proj.weight", "self_attn.out_proj.weight"),
    ("attn.out_proj.bias", "self_attn.out_proj.bias"),
    ("mlp.c_fc.weight", "mlp.fc1.weight"),
    ("mlp.c_fc.bias", "mlp.fc1.bias"),
    ("mlp.c_proj.weight", "mlp.fc2.weight"),
    ("mlp.c_proj.bias", "mlp.fc2.bias"),
]
KEY_TABLE: Dict[str, str] = dict(
    [
        ("visual.class_embedding", "vision_model.embeddings.class_embedding"),
        ("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
        ("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight"),
        ("visual.ln_pre.weight", "vision_model.pre_layrnorm.weight"),  # sic: transformers' name
        ("visual.ln_pre.bias", "vision_model.pre_layrnorm.bias"),
        ("visual.ln_post.weight", "vision_model.post_layernorm.weight"),
        ("visual.ln_post.bias", "vision_model.post_layernorm.bias"),
        ("visual.proj", "visual_projection.weight"),  # transposed
        ("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
        ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
        ("ln_final.weight", "text_model.final_layer_norm.weight"),
        ("ln_final.bias", "text_model.final_layer_norm.bias"),
        ("text_projection", "text_projection.weight"),  # transposed
        ("logit_scale", "logit_scale"),
        *[(f"visual.transformer.resblocks.{{i}}.{a}", f"vision_model.encoder.layers.{{i}}.{b}") for a, b in BLOCK],
        *[(f"transformer.resblocks.{{i}}.{a}", f"text_model.encoder.layers.{{i}}.{b}") for a, b in BLOCK],
    ]
)
REVERSE_TABLE = {target: source for source, target in KEY_TABLE.items()}
TRANSPOSED = {"visual.proj", "text_projection"}
# open_clip's fused q/k/v input projection <-> three CLIPModel projections, per block.
FUSED: Dict[str, str] = {
    "visual.transformer.resblocks.{i}.attn.in_proj_": "vision_model.encoder.layers.{i}.self_attn.",
    "transformer.resblocks.{i}.attn.in_proj_": "text_model.encoder.layers.{i}.self_attn.",
}
QKV = ("q_proj", "k_proj", "v_proj")
EOT_TOKEN = 49407  # open_clip's end-of-text id: the text embedding is read there (argmax pooling)
LAYER = re.compile(r"\.(\d+)\.")


def _template(key: str) -> Tuple[str, str]:
    """A key with its (first) layer index abstracted: ("a.{i}.b", "3"); ("a.b", "") without one."""
    match = LAYER.search(key)
    if match is None:
        return key, ""
    return key[: match.start()] + ".{i}." + key[match.end() :], match.group(1)


def _map(key: str, table: Dict[str, str]) -> str:
    template, layer = _template(key)
    if template not in table:
        raise CheckpointError(f"no CLIPModel mapping for parameter {key!r}")
    return table[template].replace("{i}", layer)


def _open_clip_to_hf(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        template, layer = _template(key)
        if template.endswith(("in_proj_weight", "in_proj_bias")):  # fused: split into q, k, v
            stem, kind = template.rsplit("_", 1)  # ".../attn.in_proj", "weight"
            target = FUSED[stem + "_"].replace("{i}", layer)
            for name, part in zip(QKV, value.chunk(3), strict=True):  # (3W, ...) -> 3 x (W, ...)
                out[f"{target}{name}.{kind}"] = part
            continue
        out[_map(key, KEY_TABLE)] = value.T.contiguous() if key in TRANSPOSED else value
    return out


def _hf_to_open_clip(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    fused_reverse = {target: source for source, target in FUSED.items()}
    out: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        template, layer = _template(key)
        head, _, tail = template.rpartition(".")  # ".../self_attn.q_proj", "weight"
        stem, _, projection = head.rpartition(".")
        if projection in QKV:
            if projection == "q_proj":  # the three parts are joined once, at their q part
                parts = [state[key.replace(".q_proj.", f".{name}.")] for name in QKV]
                out[fused_reverse[stem + "."].replace("{i}", layer) + tail] = torch.cat(parts)  # (3W, ...)
            continue
        name = _map(key, REVERSE_TABLE)
        out[name] = value.T.contiguous() if name in TRANSPOSED else value
    return out


def _check_expressible(cfg: Config) -> Tuple[VisionSettings, TextSettings]:
    """The (vision, text) settings, or a ConfigError naming the setting CLIPModel cannot express."""
    check_open_clip_compatible(cfg)
    vision = OpenClipVisionTower.settings(cfg.model.towers["image"])
    text = OpenClipTextTower.settings(cfg.model.towers["text"])
    blockers = {
        "model.towers.image.options.pool_type": (vision.pool_type, "tok", "CLIPModel pools the class token"),
        "model.towers.image.options.attentional_pool": (vision.attentional_pool, False, "no attentional pooling"),
        "model.towers.image.options.final_ln_after_pool": (
            vision.final_ln_after_pool,
            False,
            "layer norm before pooling",
        ),
        "model.towers.image.options.no_ln_pre": (vision.no_ln_pre, False, "CLIPModel has a pre-layer-norm"),
        "model.towers.image.options.ls_init_value": (vision.ls_init_value, None, "no layer scale"),
        "model.towers.text.options.pool_type": (text.pool_type, "argmax", "CLIPModel reads the end-of-text token"),
        "model.towers.text.options.ls_init_value": (text.ls_init_value, None, "no layer scale"),
        "model.towers.text.options.embed_cls": (text.embed_cls, False, "no text class token"),
        "model.towers.text.options.proj_bias": (text.proj_bias, False, "CLIPModel's projections have no bias"),
        "model.towers.text.options.no_causal_mask": (text.no_causal_mask, False, "CLIPModel's text is causal"),
        "model.init_logit_bias": (cfg.model.init_logit_bias, None, "CLIPModel has no logit bias (SigLIP)"),
    }
    for key, (value, needed, why) in blockers.items():
        if value != needed:
            raise ConfigError(
                f"config key '{key}': {value!r} cannot be expressed as a CLIPModel ({why}; needs {needed!r})"
            )
    if isinstance(vision.image_size, (tuple, list)) or isinstance(vision.patch_size, (tuple, list)):
        raise ConfigError(
            "config key 'model.towers.image.options.image_size': CLIPModel needs square images and patches"
        )
    return vision, text


def activation(quick_gelu: bool) -> str:
    """A tower's activation by transformers' name (its `hidden_act`)."""
    return "quick_gelu" if quick_gelu else "gelu"


def hf_config(cfg: Config) -> Dict[str, Any]:
    vision, text = _check_expressible(cfg)
    return {
        "projection_dim": cfg.model.embed_dim,
        "logit_scale_init_value": 2.6592,
        "text_config": {
            "vocab_size": text.vocab_size,
            "hidden_size": text.width,
            "num_hidden_layers": text.layers,
            "num_attention_heads": text.heads,
            "intermediate_size": int(text.width * text.mlp_ratio),
            "max_position_embeddings": text.context_length,
            "hidden_act": activation(text.quick_gelu),
            "layer_norm_eps": 1e-5,
            "bos_token_id": 49406,
            "eos_token_id": EOT_TOKEN,
            "pad_token_id": 0,
            "projection_dim": cfg.model.embed_dim,
        },
        "vision_config": {
            "hidden_size": vision.width,
            "num_hidden_layers": vision.layers,
            "num_attention_heads": vision.width // vision.head_width,
            "intermediate_size": int(vision.width * vision.mlp_ratio),
            "image_size": vision.image_size,
            "patch_size": vision.patch_size,
            "num_channels": 3,
            "hidden_act": activation(vision.quick_gelu),
            "layer_norm_eps": 1e-5,
            "projection_dim": cfg.model.embed_dim,
        },
    }


def export_hf_clip(state: Dict[str, torch.Tensor], cfg: Config, out_dir: Path) -> Path:
    """A directory loadable with transformers' CLIPModel.from_pretrained (config.json + safetensors)
    and CLIPTokenizer.from_pretrained (open_clip's BPE vocabulary as vocab.json + merges.txt)."""
    # Imported here: transformers takes seconds to import, and only the Hugging Face conversions need it.
    from transformers import CLIPConfig, CLIPModel

    out_dir = Path(out_dir)
    config = hf_config(cfg)
    model = CLIPModel(CLIPConfig(**config))
    hf_state = _open_clip_to_hf(to_open_clip_state(state))
    missing, unexpected = model.load_state_dict(hf_state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise CheckpointError(f"CLIPModel state mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.save_pretrained(out_dir)
    _write_tokenizer(out_dir, config["text_config"]["max_position_embeddings"])
    return out_dir


def _write_tokenizer(out_dir: Path, context_length: int) -> None:
    from transformers import CLIPTokenizer  # imported here: see export_hf_clip

    bpe = SimpleTokenizer()
    # The same ids; the two special tokens under the names transformers' CLIPTokenizer expects.
    special = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {special.get(token, token): index for token, index in bpe.encoder.items()}
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.__getitem__)
    (out_dir / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )
    tokenizer = CLIPTokenizer(str(out_dir / "vocab.json"), str(out_dir / "merges.txt"), model_max_length=context_length)
    tokenizer.save_pretrained(out_dir)


def hf_clip_config(directory: Path) -> Config:
    """The mmcl config of a CLIPModel directory, read from its config.json alone (no weights loaded)."""
    from transformers import CLIPConfig  # imported here: see export_hf_clip

    if not (Path(directory) / "config.json").is_file():
        raise FileNotFoundError(f"{directory}: not a CLIPModel directory (no config.json)")
    return _config_of(CLIPConfig.from_pretrained(directory), directory)


def _config_of(clip_config: Any, directory: Path) -> Config:
    text: Any = clip_config.text_config
    vision: Any = clip_config.vision_config
    for name, act in (("text", text.hidden_act), ("vision", vision.hidden_act)):
        if act not in ("gelu", "quick_gelu"):
            raise CheckpointError(
                f"{directory}: the {name} activation {act!r} has no open_clip tower (gelu, quick_gelu)"
            )
    settings = {
        "model.embed_dim": clip_config.projection_dim,
        "model.towers.image.type": "open_clip_vision",
        "model.towers.text.type": "open_clip_text",
        "model.towers.image.options.width": vision.hidden_size,
        "model.towers.image.options.layers": vision.num_hidden_layers,
        "model.towers.image.options.head_width": vision.hidden_size // vision.num_attention_heads,
        "model.towers.image.options.mlp_ratio": vision.intermediate_size / vision.hidden_size,
        "model.towers.image.options.image_size": vision.image_size,
        "model.towers.image.options.patch_size": vision.patch_size,
        "model.towers.image.options.pool_type": "tok",
        "model.towers.image.options.quick_gelu": vision.hidden_act == "quick_gelu",
        "model.towers.text.options.width": text.hidden_size,
        "model.towers.text.options.layers": text.num_hidden_layers,
        "model.towers.text.options.heads": text.num_attention_heads,
        "model.towers.text.options.mlp_ratio": text.intermediate_size / text.hidden_size,
        "model.towers.text.options.context_length": text.max_position_embeddings,
        "model.towers.text.options.vocab_size": text.vocab_size,
        "model.towers.text.options.quick_gelu": text.hidden_act == "quick_gelu",
    }
    return config_lib.load(
        None, ["data.train=unused", f"run.name={Path(directory).name}", *(f"{k}={v}" for k, v in settings.items())]
    )


def import_hf_clip(directory: Path) -> Tuple[Dict[str, torch.Tensor], Config]:
    """mmcl weights and config from a CLIPModel directory (config.json + safetensors)."""
    from transformers import CLIPModel  # imported here: see export_hf_clip

    if not (Path(directory) / "config.json").is_file():
        raise FileNotFoundError(f"{directory}: not a CLIPModel directory (no config.json)")
    model = CLIPModel.from_pretrained(directory)
    cfg = _config_of(model.config, directory)
    state = from_open_clip_state(_hf_to_open_clip(model.state_dict()))
    return state, cfg
