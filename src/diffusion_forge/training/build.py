"""What a run is built from: its noise schedule, its data (batches of (x, cond)), and its network.

Conditioning travels with the batch: a data set's ``get_batch(idx)`` gives ``(x, cond)`` with ``cond`` a
dict (``{"class_labels": int64 (B,)}`` for labelled sets, ``{}`` otherwise; ``conditioning.kind=cluster`` puts the
items' k-means cluster ids there instead, ``data.clusters``). With ``conditioning.kind=class`` (or cluster)
the network gets ``num_class_embeds = K + 1`` for K classes: ids 0..K-1 are the classes and id K is the null
class, which condition dropout puts in place of a label (and classifier-free guidance later samples with).
``conditioning.dropout=0`` trains no null class: K embeddings, ``null_cond`` None (so no classifier-free guidance).

With ``conditioning.kind=text`` the data set yields caption ids (``data.captions``), turned here into the token
states of the run's frozen text encoder (``models.text``): cond ``{"encoder_hidden_states": (B, L, D)}``, fed to
the cross-attention of ``UNet2DConditionModel`` (model.type diffusers_cond_unet, the default for text); the
null condition is the empty prompt's (L, D) states, which caption dropout trains.
"""
from __future__ import annotations

import hashlib
import sys
import time

import numpy as np
import torch

from ..core.schedules import NoiseSchedule
from .config import Config, ConfigError


def build_schedule(cfg: Config) -> NoiseSchedule:
    """The training process: named betas (custom beta_start / beta_end where given), T steps, zero-SNR rescale."""
    from .init_from import adopt_process

    adopt_process(cfg)  # model.init_from: the pipeline's process for the keys left at their defaults
    d = cfg.diffusion
    return NoiseSchedule.from_name(d.schedule, d.num_timesteps, beta_start=d.beta_start, beta_end=d.beta_end,
                                   zero_terminal_snr=d.zero_terminal_snr)


def _label_info(ds) -> tuple[bool, int | None, torch.Tensor | None]:
    """(has labels, number of classes, all labels if the data set exposes them)."""
    labels = getattr(ds, "labels", None)
    labels = torch.as_tensor(labels) if labels is not None else None
    has = getattr(ds, "has_labels", None)
    if has is None:  # a data set of the first release: labels -1 mean none
        has = labels is not None and bool((labels >= 0).any())
    n = getattr(ds, "num_classes", None)
    if n is None and has and labels is not None:
        n = int(labels.max()) + 1
    return bool(has), n, labels


def class_frequencies(ds, num_classes: int) -> list[float] | None:
    """p(c): the share of each of the K classes among the data's labels (None when the data set does not expose
    them all), recorded with a class-conditional run so that `dforge sample --class data` can draw p(x)."""
    labels = _label_info(ds)[2]
    if labels is None or len(labels) == 0:
        return None
    counts = torch.bincount(labels.reshape(-1).long(), minlength=num_classes)[:num_classes].double()
    return (counts / counts.sum()).tolist()


class TrainingData:
    """The training set, fetched by indices as ``(x, cond)``; cond holds only what the run conditions on."""

    def __init__(self, cfg: Config):
        from .. import data as data_module

        source = cfg.data.source
        ds = data_module.load_dataset(source, image_size=cfg.data.image_size, channels=cfg.data.channels,
                                      split="train", flip=False,  # flips are drawn by the trainer, from (seed, step)
                                      text_column=cfg.data.text_column)
        if len(ds) == 0:
            raise ConfigError(f"data set {source!r} is empty")
        from .init_from import check_data

        check_data(cfg, ds)  # model.init_from: the data fit the pipeline (Stable Diffusion: channels, image size)
        self.text_encoder, self.captions = self._text_setup(cfg, ds), getattr(ds, "captions", None)
        self.vae = None
        if cfg.data.latent:  # latent diffusion: the items are the images' VAE latents, encoded once (data/latents.py)
            from ..data.latents import latent_training_set

            ds, self.vae = latent_training_set(ds, cfg)
        self.dataset, self.n = ds, len(ds)
        self.sample_shape = tuple(getattr(ds, "shape", None) or torch.as_tensor(ds[0][0]).shape)
        self.kind = getattr(ds, "kind", None) or {3: "image", 1: "vector", 2: "signal"}.get(len(self.sample_shape))
        if cfg.data.flip and self.kind != "image":
            raise ConfigError(f"data.flip=true needs images, and {source!r} holds {self.kind}s of shape "
                              f"{self.sample_shape}; drop data.flip")
        self.conditional = cfg.conditioning.kind in ("class", "cluster")
        self.cluster_ids = self._clusters(cfg, ds) if cfg.conditioning.kind == "cluster" else None
        if self.cluster_ids is not None:   # K cluster ids stand in for labels; p(c): each cluster's share
            self.num_classes = cfg.conditioning.clusters
            counts = torch.bincount(self.cluster_ids, minlength=self.num_classes).double()
            self.class_frequencies = (counts / counts.sum()).tolist()
        else:
            self.num_classes = self._check_labels(cfg, ds) if self.conditional else 0
            self.class_frequencies = class_frequencies(ds, self.num_classes) if self.conditional else None

    @staticmethod
    def _clusters(cfg: Config, ds) -> torch.Tensor:
        """kind=cluster: the k-means cluster id of every training item (data.clusters), drawn by run.seed."""
        from ..data.clusters import cluster_ids

        k = cfg.conditioning.clusters
        if k > len(ds):
            raise ConfigError(f"conditioning.clusters={k} is more than the {len(ds)} items of {cfg.data.source!r}; "
                              f"set conditioning.clusters to at most {len(ds)} (a few items per cluster or more)")
        start = time.perf_counter()
        ids = cluster_ids(ds, k, seed=cfg.run.seed)
        print(f"conditioning.kind=cluster: {len(ds)} items in {k} k-means clusters ({time.perf_counter() - start:.1f} s; "
              f"the largest holds {int(torch.bincount(ids).max())})", file=sys.stderr)
        return ids

    @staticmethod
    def _text_setup(cfg: Config, ds):
        """kind=text: the data set's captions checked, its cond switched to caption ids, and the text encoder."""
        if cfg.conditioning.kind != "text":
            return None
        source, captions = cfg.data.source, getattr(ds, "captions", None)
        if captions is None or not all(isinstance(c, str) for c in captions):
            have = "none" if captions is None else f"none for {sum(not isinstance(c, str) for c in captions)} items"
            raise ConfigError(f"conditioning.kind=text needs captions, and data set {source!r} has {have}; use a "
                              "captioned set (mnist, digits, emoji, an image folder with a metadata.jsonl of "
                              "file_name / text, an HF set with a text column: data.text_column) or "
                              "conditioning.kind=class / none")
        ds.set_conditioning("text")
        from ..models.text import load_text_encoder

        try:
            return load_text_encoder(cfg.conditioning.text_encoder, cfg.conditioning.max_length)
        except ValueError as e:
            raise ConfigError(f"conditioning.text_encoder: {e}") from None

    @staticmethod
    def _check_labels(cfg: Config, ds) -> int:
        """The number of classes K of a class-conditional run, checked against the data's labels."""
        source, wanted = cfg.data.source, cfg.conditioning.num_classes
        has, n, labels = _label_info(ds)
        if not has:
            raise ConfigError(f"conditioning.kind=class needs class labels, and data set {source!r} has none; use a "
                              "labelled set (mnist, digits, an image folder with one sub-folder per class), "
                              "conditioning.kind=cluster (k-means clusters of the images stand in for labels) or "
                              "conditioning.kind=none")
        if labels is not None and bool((labels < 0).any()):
            raise ConfigError(f"conditioning.kind=class: {int((labels < 0).sum())} items of {source!r} have no "
                              "label; give every item a class or use conditioning.kind=none")
        if n is None:
            raise ConfigError(f"the number of classes of {source!r} is unknown; set conditioning.num_classes")
        if wanted is not None and wanted < n:
            raise ConfigError(f"conditioning.num_classes={wanted} is below the {n} classes of {source!r}; "
                              f"set it to at least {n} (or none: from the data)")
        return n if wanted is None else wanted

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """x float32 (B, *sample_shape) and cond: {"class_labels": int64 (B,)} for a class-conditional run, else {}."""
        ds = self.dataset
        if hasattr(ds, "get_batch"):
            x, cond = ds.get_batch(idx)
        else:
            items = [ds[int(i)] for i in idx]
            x = torch.stack([torch.as_tensor(item[0]) for item in items])
            cond = [item[1] for item in items]
        if self.text_encoder is not None:   # caption ids -> the prompts' token states (cached per prompt)
            ids = cond["caption_ids"] if isinstance(cond, dict) else torch.as_tensor([c["caption_ids"] for c in cond])
            prompts = [self.captions[int(i)] for i in torch.as_tensor(ids).reshape(-1)]
            return x.float(), {"encoder_hidden_states": self.text_encoder.encode(prompts)}
        if not self.conditional:
            return x.float(), {}
        if self.cluster_ids is not None:  # kind=cluster: the items' cluster ids are their classes
            return x.float(), {"class_labels": self.cluster_ids[torch.as_tensor(idx).long()]}
        if isinstance(cond, dict):  # the data protocol: a dict of batched tensors
            labels = cond.get("class_labels")
        elif isinstance(cond, list):  # items without get_batch
            labels = [c["class_labels"] if isinstance(c, dict) else c for c in cond]
        else:  # data sets of the first release: (x, labels)
            labels = cond
        if labels is None:
            raise ConfigError(f"conditioning.kind=class: the data set {ds!r} gave no class_labels")
        return x.float(), {"class_labels": torch.as_tensor(labels).reshape(len(idx)).long()}


def null_class(cfg: Config, num_classes: int = 0) -> int | None:
    """The null class id K of a run with K classes trained with condition dropout (None: no null class)."""
    return num_classes if num_classes and cfg.conditioning.dropout > 0 else None


_NOTED_TEXT_UNET: list = []


def network_type(cfg: Config, sample_shape=None) -> str:
    """model.type, resolved: ``auto`` (the default) is mlp for vectors (items of one axis: the 2-D sets),
    diffusers_cond_unet for text runs and unet for other images; text runs with model.type=unet also get
    diffusers_cond_unet (said once); a network that cannot take text, or the text U-Net without text:
    ConfigError."""
    kind, text = cfg.model.type, cfg.conditioning.kind == "text"
    if kind == "auto":
        if text:
            return "diffusers_cond_unet"
        return "mlp" if sample_shape is not None and len(sample_shape) == 1 else "unet"
    if text and kind == "unet":
        if not _NOTED_TEXT_UNET:
            _NOTED_TEXT_UNET.append(True)
            print("note: conditioning.kind=text trains model.type=diffusers_cond_unet (diffusers' "
                  "UNet2DConditionModel: cross-attention to the prompt)")
        return "diffusers_cond_unet"
    if text and kind != "diffusers_cond_unet":
        raise ConfigError(f"conditioning.kind=text needs a network with cross-attention: model.type="
                          f"diffusers_cond_unet (or unet, which becomes it); model.type={kind} takes no text")
    if kind == "diffusers_cond_unet" and not text:
        raise ConfigError(f"model.type=diffusers_cond_unet is the text-conditional U-Net: set conditioning.kind="
                          f"text (a captioned data set), or use model.type=unet for conditioning.kind="
                          f"{cfg.conditioning.kind}")
    return kind


def model_config(cfg: Config, sample_shape: tuple[int, ...], num_classes: int = 0,
                 cross_attention_dim: int | None = None) -> dict:
    """What ``models.build_model`` gets: type, preset, the data's shape, the class embedding (K + 1 ids for
    K classes, the last one null; K when conditioning.dropout=0), the text encoder's width D for a text run's
    cross-attention, then the user's overrides (model.options)."""
    kind = network_type(cfg, sample_shape)
    mc: dict = {"type": kind, "preset": cfg.model.preset}
    if kind == "mlp":
        mc["dim"] = int(np.prod(sample_shape))
    else:
        if len(sample_shape) != 3:
            raise ConfigError(f"model.type={kind} is an image network, and the data's items have shape "
                              f"{tuple(sample_shape)}; use model.type=mlp (or auto, the default) for vectors")
        mc["in_channels"] = sample_shape[0]
        mc["sample_size"] = sample_shape[-1]
    if num_classes:  # K classes, plus the null class K when the run drops labels
        mc["num_class_embeds"] = num_classes + int(null_class(cfg, num_classes) is not None)
    if cross_attention_dim:  # text: keys and values of cross-attention come from (B, L, D) token states
        mc["cross_attention_dim"] = int(cross_attention_dim)
    mc.update(cfg.model.options)
    return mc


def diffusion_config(schedule: NoiseSchedule, cfg: Config, sample_shape, num_classes: int = 0,
                     text_encoder=None) -> dict:
    """What a trained network carries: the process it was trained on, and its null condition (a text run: the
    empty prompt's token states (L, D), when conditioning.dropout > 0)."""
    null_id = null_class(cfg, num_classes)
    null = {"class_labels": null_id} if null_id is not None else None
    if text_encoder is not None and cfg.conditioning.dropout > 0:
        null = {"encoder_hidden_states": text_encoder.null_embedding()}
    return {"schedule": schedule.to_dict(), "prediction": cfg.diffusion.prediction, "null_cond": null,
            "sample_shape": list(sample_shape)}


def build_network(cfg: Config, sample_shape, schedule: NoiseSchedule, num_classes: int = 0, text_encoder=None):
    """(network, its resolved build config); the initial weights depend only on run.seed. The network
    carries ``diffusion_config`` (schedule, prediction, null condition)."""
    from ..models import build_model
    from .init_from import init_network

    if cfg.model.init_from:  # fine-tuning: the pretrained U-Net's own architecture and weights
        return init_network(cfg, sample_shape, schedule, num_classes, text_encoder)
    mc = model_config(cfg, sample_shape, num_classes, text_encoder.dim if text_encoder is not None else None)
    torch.manual_seed(cfg.run.seed)
    model = build_model(mc)
    model.diffusion_config = diffusion_config(schedule, cfg, sample_shape, num_classes, text_encoder)
    return model, getattr(model, "build_config", mc)


def weights_digest(module: torch.nn.Module) -> str:
    """A SHA-256 over a module's state: equal digests mean bit-identical weights."""
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
