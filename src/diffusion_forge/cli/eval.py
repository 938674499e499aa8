"""`dforge eval`: how good is a model, and does it copy its training data?"""
from __future__ import annotations

from ..io.files import PLOT_SUFFIXES
from . import HelpFormatter, UserError, add_force
from .guidance_args import (add_guidance_args, check_args, cluster_run, follows_data, guided_denoiser, has_null,
                            with_run_defaults)

EXAMPLES = """examples:
  dforge eval runs/mnist --n 2000                       sample 2000 images from the run, score them
  dforge eval samples.npz --data mnist                  samples made anywhere (key "images", uint8 NxHxWxC)
  dforge eval samples.npz --data photos/ --features effnet,inception --inception-weights pt_inception-2015-12-05-6726825d.pth
  dforge eval runs/mnist --n 500 --pairs-out nearest.png --json eval.json
  dforge eval runs/mnist-cond --class all --guidance-scale 3 --json cfg3.json   guided, balanced classes; on
                                                        MNIST also the accuracy of the requested digit

Scores carry the feature network and the sample count: "FD-EffNet@2k" is the Frechet distance in
EfficientNet-Lite0 features of 2,000 samples against 2,000 reference images. FD-EffNet is NOT FID: only
"FID" (Inception-v3 of pytorch-fid, with its weights file) is comparable with published FIDs, and only at
the same sample count. See docs/evaluation.md for the protocols.
"""


def register(sub) -> None:
    p = sub.add_parser("eval", help="score samples: FD/KID, precision/recall, near-copies, NLL (bits/dim)",
                       description="Score a run folder (samples are drawn from it) or a sample file against a "
                                   "data set: Frechet distance and KID in the features of real networks, "
                                   "precision and recall, the fraction of near-copies of training images, and "
                                   "for runs the NLL bound in bits/dim on held-out data.",
                       formatter_class=HelpFormatter, epilog=EXAMPLES)
    p.add_argument("target", help="a run folder of `dforge train`, or a .npz sample file with key 'images'")
    p.add_argument("--data", help="data set to compare with (a run's own by default): bundled name, folder, hf:NAME")
    p.add_argument("--n", type=int, default=2000, help="samples to score (a sample file: its first N)")
    p.add_argument("--n-ref", type=int, help="reference images (default: the same as --n); a fixed seed-0 subset")
    p.add_argument("--split", default="train", help="the data split the reference images come from")
    p.add_argument("--features", help="comma-separated feature networks: digits (MNIST only), effnet, inception "
                                      "(default: digits for MNIST, effnet, inception when its weights exist)")
    p.add_argument("--inception-weights", metavar="PATH",
                   help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth for real FID "
                        "(or set $DFORGE_INCEPTION_WEIGHTS)")
    p.add_argument("--no-kid", action="store_true", help="skip KID")
    p.add_argument("--no-pr", action="store_true", help="skip precision / recall")
    p.add_argument("--no-memorization", action="store_true", help="skip the nearest-training-image search")
    p.add_argument("--pairs-out", metavar="FILE.png",
                   help=f"picture of the closest sample / training pairs ({', '.join(PLOT_SUFFIXES)})")
    p.add_argument("--json", metavar="FILE.json", help="write every number to this JSON file")
    add_force(p)
    g = p.add_argument_group("run folders")
    g.add_argument("--sampler", default=None,
                   help="sampler for drawing the samples (default: the run's own, its config sample.sampler; "
                        "auto: the most accurate one for --steps)")
    g.add_argument("--steps", type=int, default=None, help="sampler steps (default: the run's sample.steps)")
    g.add_argument("--sampler-options", metavar="KEY=VALUE,...", help="options of the sampler, e.g. eta=0.5")
    g.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    g.add_argument("--batch-size", type=int, default=256, help="samples drawn per batch")
    g.add_argument("--no-ema", action="store_true", help="use the trained weights, not their EMA")
    g.add_argument("--save-samples", metavar="FILE.npz", help="also write the drawn samples")
    g.add_argument("--nll-n", type=int, default=100, help="held-out images for the NLL bound (0: skip)")
    g.add_argument("--nll-t", type=int, default=32, help="timestep strata per image for the NLL (network calls)")
    g.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help="text runs (conditioning.kind=text): what to draw, repeatable: sample i gets prompt i mod P "
                        "(default: the run's fixed grid prompts, saved in its checkpoints)")
    add_guidance_args(p)
    p.set_defaults(func=run)


NOTES = {
    "FD-Digits": "digit-classifier features (128-d); lower is better",
    "FD-EffNet": "EfficientNet-Lite0 features at 128 px (1280-d); not FID, not comparable with it",
    "FID": "Inception-v3 (pytorch-fid weights), 2048-d at 299 px",
    "KID": "unbiased MMD^2, cubic kernel; ~0 when the distributions match",
    "precision": "fraction of samples inside the data's k=3 manifold (realism)",
    "recall": "fraction of data inside the samples' k=3 manifold (variety)",
    "near_copies": "samples whose nearest training image is < 1/3 the distance of the second nearest",
    "digit_confidence": "samples the classifier labels with probability >= 0.9",
    "digit_accuracy": "samples the digit classifier assigns to the requested digit",
}
GUIDANCE_FLAGS = ("prompt", "class_", "guidance_scale", "guidance_rescale", "guidance_interval", "classifier",
                  "classifier_scale", "autoguidance", "guide_with", "autoguidance_scale")


def _note(key: str) -> str:
    for head, note in NOTES.items():
        if key.startswith(head):
            return note
    return ""


LATENT_NLL_NOTE = ("a latent run models the VAE's latents, and their likelihood is not the likelihood of the "
                   "images (the decoder's own is missing), so it is not comparable with pixel runs' bits/dim")
CLUSTER_NLL_NOTE = ("a cluster run trained with conditioning.dropout=0 has no null cluster, and a held-out image's "
                    "cluster is unknown, so no bound on -log p(x) is at hand")


def _format(metrics: dict) -> list[str]:
    lines = []
    for key, value in metrics.items():
        if key == "n" or key.endswith(" std"):
            continue
        if key.startswith("KID") and f"{key} std" in metrics:
            text = f"{value:.5f} +- {metrics[key + ' std']:.5f}"
        elif key.startswith(("precision", "recall", "near_copies", "digit_confidence", "digit_accuracy")):
            text = f"{value:.2%}" if key.startswith(("near_copies", "digit_accuracy")) else f"{value:.3f}"
        else:
            text = f"{value:.3f}"
        lines.append(f"  {key:<26} {text:<22} {_note(key)}")
    return lines


def run(args) -> int:
    import time
    from pathlib import Path

    from .. import evaluate as ev

    target = Path(args.target)
    if args.n < 2:
        raise UserError("--n must be at least 2")
    _check_outputs(args)
    networks = [s.strip() for s in args.features.split(",") if s.strip()] if args.features else None
    for name in networks or []:
        if name not in ev.FEATURE_NETWORKS:
            raise UserError(f"unknown feature network {name!r}; choose from: {', '.join(ev.FEATURE_NETWORKS)}")
    if networks and "inception" in networks:
        ev.inception_weights_path(args.inception_weights)   # a clear error before any work
    check_args(args)                                       # the guidance flags' forms, before any work
    start = time.time()
    report: dict = {"target": str(target)}
    trained, labels = None, None
    if not target.exists():
        raise UserError(f"{target} does not exist (give a run folder of `dforge train`, or a .npz file with key "
                        "'images')")
    if target.is_dir():
        from ..data import TOY_SETS, to_uint8
        from ..io.checkpoint import load_model_from_run
        from ..sampling.generate import generate
        from .sample import parse_options, prompt_guidance, run_settings, text_prompts, write_npz

        options = parse_options(args.sampler_options)
        trained = load_model_from_run(target, use_ema=not args.no_ema)
        args = with_run_defaults(args, trained)                   # a cluster run: --class data
        sampler, steps, options = run_settings(trained, args.sampler, args.steps, options, follows_data(args))
        prompts = text_prompts(args, trained)                            # a text run: the run's prompts or --prompt
        denoiser, classes, guidance = guided_denoiser(args, trained)     # every check before any sampling
        labels = classes.labels(args.n)
        cond = classes.cond(args.n) if prompts is None else prompt_guidance(trained, prompts, guidance)
        data = args.data or trained.config["data"]["source"]
        print(f"dforge eval: drawing {args.n} samples from {target} (step {trained.step}, {sampler}"
              f"{' ' + str(options) if options else ''}, {steps} steps, seeds {args.seed}..{args.seed + args.n - 1}; "
              f"{guidance['text']})")
        x = generate(denoiser, args.n, seed=args.seed, sampler=sampler, steps=steps, sampler_options=options,
                     cond=cond, batch_size=args.batch_size, progress=True)
        guidance = {k: v for k, v in guidance.items() if k != "text"} | {"text": guidance["text"]}
        report.update(step=trained.step, sampler=sampler, steps=steps, sampler_options=options, seed=args.seed,
                      guidance=guidance)
        if prompts is not None:
            report["prompts"] = list(dict.fromkeys(prompts))
        if str(data).lower() in TOY_SETS:
            return _toy_report(args, trained, data, x, report)
        images = to_uint8(x)
        if args.save_samples:
            arrays = {"images": images} | ({"labels": labels.numpy()} if labels is not None else {})
            if prompts is not None:
                import numpy as np

                arrays["prompts"] = np.array(prompts, dtype=str)           # the prompt of each sample
            write_npz(args.save_samples, arrays)
            print(f"  wrote {args.save_samples} (key 'images', uint8 N x H x W x C"
                  f"{'; labels, int64 N' if labels is not None else ''}{'; prompts, str N' if prompts else ''})")
    elif target.suffix.lower() == ".npz":
        given = [f"--{f.rstrip('_').replace('_', '-')}" for f in GUIDANCE_FLAGS if getattr(args, f, None) is not None]
        if given:
            raise UserError(f"{', '.join(given)} steer sampling, and a sample file is already sampled: give a run "
                            "folder to draw guided samples from")
        if not args.data:
            raise UserError("a sample file needs --data NAME (the data set to compare with)")
        data = args.data
        images = read_sample_file(target, args.n)
    else:
        raise UserError(f"{target} is neither a run folder nor a .npz sample file")

    n = len(images)
    n_ref = args.n_ref or n
    print(f"dforge eval: {n} samples of {images.shape[1]}x{images.shape[2]}x{images.shape[3]} vs {data} "
          f"({args.split} split, {n_ref} reference images: the first {n_ref} of a seed-0 permutation)")
    metrics, extras = ev.evaluate_images(images, data, networks=networks, n_ref=n_ref, split=args.split,
                                         kid=not args.no_kid, pr=not args.no_pr, memorize=not args.no_memorization,
                                         inception_weights=args.inception_weights)
    if labels is not None and str(data).lower() == "mnist" and trained.num_classes == 10 and not cluster_run(trained):
        from ..evaluate.digits import digit_accuracy

        metrics["digit_accuracy"] = digit_accuracy(images, labels.numpy())
    report.update(data=str(data), n=n, n_ref=n_ref, split=args.split, metrics=metrics)
    if trained is not None and args.nll_n > 0 and getattr(trained, "vae", None) is not None:
        report["nll_skipped"] = LATENT_NLL_NOTE
    elif trained is not None and args.nll_n > 0 and cluster_run(trained) and not has_null(trained):
        report["nll_skipped"] = CLUSTER_NLL_NOTE
    elif trained is not None and args.nll_n > 0:
        report["nll"] = _nll(args, trained, data)
    for line in _format(metrics):
        print(line)
    if "guidance" in report:
        print(f"  {'guidance':<26} {report['guidance']['text']}")
    if "nll" in report:
        r = report["nll"]
        given = f" given {r['given']}" if r.get("given") else ""
        print(f"  {'NLL (bits/dim)':<26} {r['bpd']:.3f} +- {r['ci95']:.3f}{'':<8} 95% interval; {r['n']} "
              f"{r['source']} images{given}, {r['num_t']} t-strata each (variational bound, Monte Carlo over t)")
    if "nll_skipped" in report:
        print(f"  note: no NLL (bits/dim): {report['nll_skipped']}")
    if any(k.startswith("FD-EffNet") for k in metrics):
        print("  note: FD-EffNet is not FID; compare it only with FD-EffNet at the same sample count.")
    if "memorization" in extras and args.pairs_out:
        from ..viz import plot_nearest_pairs
        plot_nearest_pairs(args.pairs_out, images, extras["train_images"], extras["memorization"])
        print(f"  wrote {args.pairs_out} (closest sample / training pairs)")
    report["seconds"] = round(time.time() - start, 1)
    if args.json:
        _write_json(args.json, report)
        print(f"  wrote {args.json}")
    return 0


def _check_outputs(args) -> None:
    """Every output of the command writable (and not there already unless --force), before any work."""
    from ..io.files import check_output

    if args.pairs_out and args.no_memorization:
        raise UserError("--pairs-out shows the nearest-training-image search: drop --no-memorization")
    for path, suffixes in ((args.json, (".json",)), (args.pairs_out, PLOT_SUFFIXES), (args.save_samples, (".npz",))):
        if path:
            check_output(path, suffixes, force=args.force)


ZIP_MAGIC, NPY_MAGIC = (b"PK\x03\x04", b"PK\x05\x06"), b"\x93NUMPY"
LAYOUT = "uint8 N x H x W x C (channels last, values 0..255)"


def read_sample_file(path, n: int):
    """The first ``n`` images of a sample file (key ``images``, uint8 N x H x W x C), or a UserError that
    names what the file is instead. Never unpickles (allow_pickle=False)."""
    import zipfile

    import numpy as np

    with open(path, "rb") as f:
        head = f.read(6)
    if head == NPY_MAGIC:
        raise UserError(f"{path} is a .npy array file, not an .npz archive; write it with "
                        "np.savez(path, images=array) (images: " + LAYOUT + ")")
    if head[:4] not in ZIP_MAGIC:
        raise UserError(f"{path} is not an .npz file (not a zip archive of arrays); write one with "
                        "np.savez(path, images=array) (images: " + LAYOUT + ")")
    try:
        with np.load(path, allow_pickle=False) as f:
            if "images" not in f:
                raise UserError(f"{path} has no 'images' array (found: {', '.join(f.files) or 'none'})")
            images = f["images"][:n]
    except (zipfile.BadZipFile, EOFError) as e:
        raise UserError(f"{path} is a damaged .npz file ({e}); write it again") from None
    except ValueError as e:
        if "pickle" not in str(e):
            raise
        raise UserError(f"{path}: 'images' holds Python objects, not an array of numbers; expected {LAYOUT}") from None
    found = f"{images.dtype} {' x '.join(map(str, images.shape))}"
    if images.ndim == 4 and images.shape[1] in (1, 3) and images.shape[-1] not in (1, 3):
        raise UserError(f"{path}: 'images' is channels first (N x C x H x W: {found}); dforge eval expects "
                        f"{LAYOUT}: use np.transpose(images, (0, 2, 3, 1))")
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise UserError(f"{path}: 'images' must be {LAYOUT} with C = 1 or 3, found {found}")
    if images.dtype != np.uint8:
        raise UserError(f"{path}: 'images' must be {LAYOUT}, found {found}; convert [-1, 1] floats with "
                        "((x + 1) * 127.5).round().clip(0, 255).astype(np.uint8)")
    if len(images) < 2:
        raise UserError(f"{path} holds fewer than 2 images")
    return images


def _nll(args, trained, data) -> dict:
    import numpy as np
    import torch

    from .. import evaluate as ev
    from ..data import BUNDLED, load_dataset

    c, h = trained.sample_shape[0], trained.sample_shape[-1]
    held_out = str(data).lower() in BUNDLED
    te = getattr(trained, "text_encoder", None)
    ds = load_dataset(data, image_size=h, channels=c, split="test" if held_out else "train",
                      text_column=trained.config["data"].get("text_column"))
    captions = ds.captions if te is not None and getattr(ds, "has_captions", False) else None
    if captions is not None:
        ds.set_conditioning("text")                                     # cond: caption ids into ds.captions
    idx = torch.as_tensor(np.sort(np.random.default_rng(0).permutation(len(ds))[: args.nll_n]))
    x0, cond = ds.get_batch(idx)
    given = None
    if te is not None:       # a text run: -log p(x | its caption), else -log p(x | "") (the unconditional model)
        ids = cond.get("caption_ids") if captions is not None else None
        texts = [captions[int(i)] for i in ids] if ids is not None else [""] * len(idx)
        cond, given = {"encoder_hidden_states": te.encode(texts)}, ("their captions" if ids is not None
                                                                   else "the empty prompt")
    elif cluster_run(trained):   # the held-out images' clusters are unknown: the null cluster, p(x) itself
        cond = {"class_labels": torch.full((len(idx),), int(trained.null_cond["class_labels"]))}
        given = "the null cluster (the unconditional model that cluster dropout trains)"
    else:
        cond = {"class_labels": cond["class_labels"]} if trained.num_classes and "class_labels" in cond else None
        given = "their labels" if cond is not None else None   # class-conditional: -log p(x | y), y their own
    r = ev.nll_bits_per_dim(trained.model, x0.to(next(trained.model.parameters()).dtype), trained.schedule,
                            trained.prediction, num_t=min(args.nll_t, trained.schedule.num_timesteps),
                            generator=torch.Generator().manual_seed(0), progress="NLL bound", cond=cond)
    r.pop("per_image")
    r["source"] = "held-out test" if held_out else "training (no held-out split)"
    r["given"] = given
    return r


def _toy_report(args, trained, data, x, report) -> int:
    from .. import evaluate as ev
    from ..data import load_dataset

    real = load_dataset(data, split="train").data
    ref = real[: (args.n_ref or len(x))]
    n = len(x)
    metrics = {"n": n, f"FD-xy@{ev.count_label(n)}": ev.frechet_distance_features(ref, x)}
    if not args.no_kid:
        metrics[f"KID-xy@{ev.count_label(n)}"], metrics[f"KID-xy@{ev.count_label(n)} std"] = \
            ev.kernel_inception_distance(ref, x)
    if not args.no_pr:
        metrics[f"precision-xy@{ev.count_label(n)}"], metrics[f"recall-xy@{ev.count_label(n)}"] = \
            ev.precision_recall(ref, x)
    print(f"dforge eval: {n} points vs {data} ({len(ref)} training points); features = the coordinates")
    for line in _format(metrics):
        print(line)
    if "guidance" in report:
        print(f"  {'guidance':<26} {report['guidance']['text']}")
    report.update(data=str(data), n=n, metrics=metrics)
    if args.json:
        _write_json(args.json, report)
    return 0


def _write_json(path, report) -> None:
    import json
    from pathlib import Path

    from ..io.files import atomic_write

    text = json.dumps(report, indent=2, default=float)
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))
