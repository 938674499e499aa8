"""Captions (issue 11): digit templates, emoji names, metadata.jsonl folders, HF text columns, and the
trainer's caption -> token states path with caption dropout."""
from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_forge import training as T
from diffusion_forge.data import load_dataset
from diffusion_forge.data.captions import (DIGIT_TEMPLATES, DIGIT_WORDS, HELD_OUT_DIGIT_TEMPLATES, digit_caption,
                                           digit_captions, sample_prompts)
from diffusion_forge.training.determinism import batch_indices, dropout_mask


def test_digit_captions_name_their_digit_and_are_fixed_per_image():
    digits = load_dataset("digits")
    labels = digits.labels.tolist()
    assert len(digits.captions) == len(digits) and digits.has_captions
    for caption, y in zip(digits.captions, labels):
        words = re.findall(r"[a-z]+|\d", caption)
        named = [w for w in words if w in DIGIT_WORDS or w.isdigit()]
        assert named in ([DIGIT_WORDS[y]], [str(y)]), (caption, y)        # exactly its own digit, once
    assert load_dataset("digits").captions == digits.captions               # the same every load
    assert digit_captions(labels) == digits.captions
    assert digit_captions(labels, split="test") != digits.captions          # another split, another draw
    used = Counter(next(t for t in DIGIT_TEMPLATES for d in range(10) if digit_caption(t, d) == c)
                   for c in digits.captions)
    assert set(used) == set(DIGIT_TEMPLATES)                               # every template, about evenly:
    assert min(used.values()) > len(digits) / len(DIGIT_TEMPLATES) * 0.75   # 1437 / 6 = 240 expected each


def test_held_out_templates_are_not_training_captions():
    training = {digit_caption(t, d) for t in DIGIT_TEMPLATES for d in range(10)}
    held = {digit_caption(t, d) for t in HELD_OUT_DIGIT_TEMPLATES for d in range(10)}
    assert len(held) == 10 * len(HELD_OUT_DIGIT_TEMPLATES) and not training & held
    for t in HELD_OUT_DIGIT_TEMPLATES:                 # nor does any held-out phrasing contain a training one
        assert not any(digit_caption(s, 3) in digit_caption(t, 3) for s in DIGIT_TEMPLATES if s != "{word}")
    assert sample_prompts("mnist") == [f"a handwritten {w}" for w in DIGIT_WORDS]


def test_mnist_and_emoji_are_captioned():
    mnist = load_dataset("mnist")
    assert len(mnist.captions) == 60_000 and mnist.has_captions
    assert DIGIT_WORDS[5] in mnist.captions[0] or "5" in mnist.captions[0]   # the first training image is a 5
    emoji = load_dataset("emoji", conditioning="text")
    dog = emoji.captions.index("dog face")
    cond = emoji.get_batch([dog])[1]
    assert cond.keys() == {"caption_ids"} and cond["caption_ids"].tolist() == [dog]


def _folder(root, names, metadata=None):
    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8), 10 * i).save(root / name)
    for where, lines in (metadata or {}).items():
        (root / where).write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


def test_an_image_folder_with_metadata_jsonl_is_captioned(tmp_path):
    root = _folder(tmp_path / "imgs", ["a.png", "b.png", "sub/c.png"],
                   {"metadata.jsonl": [{"file_name": "a.png", "text": "a dark square"},
                                       {"file_name": "b.png", "text": "a grey square"}],
                    "sub/metadata.jsonl": [{"file_name": "c.png", "text": "a light square"}]})
    ds = load_dataset(str(root), conditioning="text")
    assert ds.captions == ["a dark square", "a grey square", "a light square"]
    x, cond = ds.get_batch([2, 0])
    assert x.shape == (2, 1, 8, 8) and cond.keys() == {"caption_ids"} and cond["caption_ids"].tolist() == [2, 0]
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "only a"}) + "\n")
    partial = load_dataset(str(root))
    assert partial.captions == ["only a", None, "a light square"] and not partial.has_captions
    with pytest.raises(ValueError, match="1 items without one"):
        partial.set_conditioning("text")
    (root / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\nnot json\n')
    with pytest.raises(ValueError, match=r"metadata\.jsonl:2: not a JSON object"):
        load_dataset(str(root))
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "label": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"metadata\.jsonl:1: needs the keys file_name and text"):
        load_dataset(str(root))
    (root / "sub" / "metadata.jsonl").unlink()
    assert load_dataset(str(root), text_column="label").captions == ["x", None, None]


def test_a_hugging_face_text_column(tmp_path):
    import datasets  # a dev dependency (pyproject), always installed by `make test`
    images = [Image.new("RGB", (8, 8), (40 * i, 0, 0)) for i in range(4)]
    ds = datasets.Dataset.from_dict({"image": images, "description": [f"red {i}" for i in range(4)],
                                     "text": ["x"] * 4},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "description": datasets.Value("string"),
                                                                "text": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "hf"))
    assert load_dataset(str(tmp_path / "hf")).captions == ["x"] * 4                     # none: 'text'
    assert load_dataset(str(tmp_path / "hf"), text_column="description").captions == [f"red {i}" for i in range(4)]
    with pytest.raises(ValueError, match="data.text_column='nope'.*no such column"):
        load_dataset(str(tmp_path / "hf"), text_column="nope")


def test_the_trainer_feeds_token_states_with_caption_dropout(tmp_path):
    """Caption ids -> encode(captions); the rows of dropout_mask(step) (the class-label dropout's own draw)
    get the empty prompt's states, every other row its caption's."""
    cfg = T.merge_config(flags={"data.source": "digits", "conditioning.kind": "text", "conditioning.dropout": 0.3,
                                "conditioning.max_length": 16, "model.preset": "tiny", "optim.batch_size": 32,
                                "run.mixed_precision": "no"})
    tr = T.Trainer(cfg, tmp_path / "r", progress=False)
    te = tr.text_encoder
    step = 7
    [(x0, cond, _, _)] = tr.global_batch(step)
    h = cond["encoder_hidden_states"]
    drop = dropout_mask(step, 32, 0.3, cfg.run.seed)
    idx = batch_indices(step, 32, tr.data.n, cfg.run.seed)
    expected = te.encode([tr.data.captions[int(i)] for i in idx])
    assert h.shape == (32, 16, 384) and 0 < int(drop.sum()) < 32
    assert torch.equal(h[~drop], expected[~drop])
    assert all(torch.equal(row, te.encode([""])[0]) for row in h[drop])
    null = tr.unwrapped.diffusion_config["null_cond"]["encoder_hidden_states"]
    assert torch.equal(null, te.encode([""])[0]) and tr.guidance_scale == 3.0
    assert np.isclose(float(drop.float().mean()), 0.3, atol=0.2)
