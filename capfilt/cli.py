"""The `capfilt` command line. `main(argv)` takes a list so tests drive the real entry point.

Exit codes: 0 success, 1 an unexpected failure, 2 a problem with the user's input (the message
names it). Heavy imports happen inside the commands so `capfilt --help` is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from .errors import CapfiltError

log = logging.getLogger("capfilt")
EXIT_USAGE = 2


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse names the option in its error)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_pth_args(p: argparse.ArgumentParser) -> None:
    """What an original BLIP `.pth` cannot tell about itself."""
    p.add_argument(
        "--tokenizer",
        metavar="DIR",
        default=None,
        help="tokenizer directory for an original .pth (default: look beside the .pth)",
    )
    p.add_argument(
        "--vision-heads", type=positive_int, default=None, help=".pth only: ViT heads (default: width / 64)"
    )
    p.add_argument(
        "--text-heads", type=positive_int, default=None, help=".pth only: text heads (default: width / 64)"
    )


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        metavar="CKPT",
        help="our checkpoint directory, a transformers BLIP directory, or an original BLIP .pth",
    )
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument(
        "--batch-size", type=positive_int, default=16, help="images per forward pass (default: 16)"
    )
    _add_pth_args(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capfilt",
        description="BLIP's CapFilt: caption and filter image-text pairs, and manage MED checkpoints.",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("caption", help="write captions for images with a captioner checkpoint")
    _add_model_args(p)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument(
        "--method",
        choices=["nucleus", "beam", "greedy"],
        default="nucleus",
        help="decoding: nucleus sampling (CapFilt's), beam search or greedy (default: nucleus)",
    )
    p.add_argument(
        "--num-captions",
        type=positive_int,
        default=1,
        metavar="K",
        help="captions per image: K samples (nucleus) or the K best beams, 1-64 (default: 1)",
    )
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus probability mass (default: 0.9)")
    p.add_argument(
        "--top-k",
        type=int,
        default=50,
        help="nucleus: sample among the K most likely tokens only, 0 for all (default: 50, as BLIP)",
    )
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1.0)")
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=None,
        help="penalty for repeated tokens (default: 1.1 for nucleus as in BLIP's CapFilt, else 1.0)",
    )
    p.add_argument("--num-beams", type=positive_int, default=3, help="beam width (default: 3, BLIP's)")
    p.add_argument(
        "--max-tokens",
        type=positive_int,
        default=30,
        help="most caption tokens, [SEP] included (default: 30)",
    )
    p.add_argument(
        "--min-tokens", type=int, default=5, help="fewest caption tokens before [SEP] (default: 5)"
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed; image i uses seed + i (default: 0)")
    p.add_argument("--json", action="store_true", help='print {"results": [{"image", "captions"}]}')

    p = sub.add_parser("score", help="score texts against an image with a filter checkpoint (ITM and ITC)")
    _add_model_args(p)
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--text", action="append", required=True, metavar="T", help="a text to score (repeatable)")
    p.add_argument(
        "--raw-text",
        action="store_true",
        help="score texts as given, without BLIP's caption cleaning (lower-case, punctuation)",
    )
    p.add_argument("--json", action="store_true", help='print {"image", "scores": [{"text", "itm", "itc"}]}')

    p = sub.add_parser("data", help="datasets: build the built-in synthetic web world")
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    p = data_sub.add_parser(
        "synth",
        help="write the built-in web world (human, web and test splits in img2dataset's layout + truth)",
    )
    p.add_argument(
        "--out", required=True, metavar="DIR", help="directory to write (replaced if it holds a world)"
    )
    p.add_argument("--web", type=int, default=4000, help="web pairs (default: 4000)")
    p.add_argument("--human", type=int, default=2000, help="human-annotated images (default: 2000)")
    p.add_argument("--test", type=int, default=500, help="test images (default: 500)")
    p.add_argument("--noise", type=float, default=0.4, help="fraction of noisy web texts (default: 0.4)")
    p.add_argument("--seed", type=int, default=0, help="random seed: same arguments, same bytes (default: 0)")
    p.add_argument(
        "--image-size", type=int, default=64, help="image side in pixels, 32 to 1024 (default: 64)"
    )
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default: 1000)")
    p.add_argument(
        "--labelled",
        type=int,
        default=24000,
        help="images with class labels and no captions, the ImageNet analogue that `capfilt train vit` "
        "pre-trains the image encoder on; 0 for none (default: 24000)",
    )

    from capfilt.pipelines.clean_cli import add_clean_parser
    from capfilt.pipelines.demo_cli import add_demo_parser
    from capfilt.pipelines.ingest_cli import add_ingest_parser
    from capfilt.pipelines.train_cli import add_train_parser

    add_clean_parser(sub)
    add_demo_parser(sub)
    add_ingest_parser(sub)
    add_train_parser(sub)

    from capfilt.services.bench_cli import add_bench_serve_parser
    from capfilt.services.serve_cli import add_serve_parser

    add_serve_parser(sub)
    from capfilt.pipelines.bench_cli import add_bench_throughput_parser

    p = sub.add_parser("bench", help="benchmarks: the REST service under load; CapFilt throughput")
    bench_sub = p.add_subparsers(dest="bench_command", metavar="WHAT", required=True)
    add_bench_serve_parser(bench_sub)
    add_bench_throughput_parser(bench_sub)

    p = sub.add_parser(
        "bootstrap",
        help="the paper's loop: pre-train, fine-tune captioner and filter, CapFilt the web, pre-train on D', evaluate",
    )
    p.add_argument("--data", required=True, metavar="DIR", help="a world made by `capfilt data synth`")
    p.add_argument(
        "--out", required=True, metavar="RUN", help="run directory (a rerun continues where it stopped)"
    )
    p.add_argument("--size", default="small", help="MED size (default: small)")
    p.add_argument("--seed", type=int, default=0, help="seed for training and sampling (default: 0)")
    p.add_argument(
        "--pretrain-epochs", type=int, default=10, help="epochs of each pre-training (default: 10)"
    )
    p.add_argument("--finetune-epochs", type=int, default=5, help="epochs of each fine-tuning (default: 5)")
    p.add_argument("--batch-size", type=int, default=32, help="training batch per worker (default: 32)")
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="Ray Train workers per training stage; 0 trains in this process (default: 0)",
    )
    p.add_argument(
        "--num-captions", type=int, default=1, help="nucleus samples per web image, 1-64 (default: 1, BLIP's)"
    )
    p.add_argument(
        "--threshold", type=float, default=0.5, help="ITM p(match) a text must exceed (default: 0.5)"
    )
    p.add_argument(
        "--variant",
        default="capfilt",
        choices=["none", "filter", "captioner", "capfilt", "blip2"],
        help="which web texts enter D' (default: capfilt = kept web + kept synthetic)",
    )
    p.add_argument("--max-steps", type=int, default=None, help="cap every training stage (smoke runs)")
    _add_vit_init_args(p)
    _add_gpu_arg(p)

    p = sub.add_parser(
        "eval", help="evaluate checkpoints (retrieval, captioning, filter) or run the bootstrap ablation"
    )
    eval_sub = p.add_subparsers(dest="eval_command", metavar="WHAT", required=True)
    p = eval_sub.add_parser(
        "ablation",
        help="BLIP's Table 1 rows (none, filter, captioner, capfilt) + BLIP-2's, over seeds, same budget",
    )
    p.add_argument("--data", required=True, metavar="DIR", help="a world made by `capfilt data synth`")
    p.add_argument("--out", required=True, metavar="RUN", help="run directory (a rerun continues)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    p.add_argument(
        "--variants",
        nargs="+",
        default=["none", "filter", "captioner", "capfilt", "blip2"],
        choices=["none", "filter", "captioner", "capfilt", "blip2"],
        help="rows to run (default: all)",
    )
    p.add_argument("--size", default="small", help="MED size (default: small)")
    p.add_argument(
        "--pretrain-epochs",
        type=int,
        default=10,
        help="epochs of the first pre-training; its steps are every row's budget (default: 10)",
    )
    p.add_argument("--finetune-epochs", type=int, default=5, help="epochs of each fine-tuning (default: 5)")
    p.add_argument("--batch-size", type=int, default=32, help="training batch (default: 32)")
    p.add_argument("--workers", type=int, default=0, help="Ray Train workers; 0 trains in this process")
    p.add_argument(
        "--num-captions",
        type=int,
        default=10,
        help="nucleus samples per web image (default: 10, as BLIP-2's variant needs)",
    )
    p.add_argument("--max-steps", type=int, default=None, help="cap every training stage (smoke runs)")
    _add_vit_init_args(p)
    _add_gpu_arg(p)
    p = eval_sub.add_parser(
        "retrieval", help="TR/IR R@1/5/10: ITC ranking, top-k re-ranked by ITM (BLIP's protocol)"
    )
    p.add_argument("--model", required=True, metavar="FILTER", help="filter (or pre-trained) checkpoint")
    p.add_argument(
        "--data", required=True, nargs="+", metavar="SHARDS", help="test shards (every caption a query)"
    )
    p.add_argument(
        "--k", type=positive_int, default=16, help="candidates re-ranked by ITM (default: 16; BLIP: 256)"
    )
    p = eval_sub.add_parser(
        "caption", help="BLEU-4, CIDEr-D and attribute accuracy of captions on test shards"
    )
    p.add_argument("--model", required=True, metavar="CAPTIONER", help="captioner checkpoint")
    p.add_argument(
        "--data", required=True, nargs="+", metavar="SHARDS", help="test shards with reference captions"
    )
    p.add_argument("--truth", default=None, help="the world's truth.parquet, for attribute accuracy")
    p.add_argument("--method", choices=["beam", "nucleus"], default="beam", help="decoding (default: beam)")
    p.add_argument("--seed", type=int, default=0, help="nucleus sampling seed (default: 0)")
    p = eval_sub.add_parser(
        "filter", help="precision / recall of web-text rejections against the world's truth"
    )
    p.add_argument("--model", required=True, metavar="FILTER", help="filter checkpoint")
    p.add_argument("--data", required=True, nargs="+", metavar="SHARDS", help="web shards")
    p.add_argument("--truth", required=True, help="the world's truth.parquet")
    p.add_argument("--threshold", type=float, default=0.5, help="ITM p(match) to keep a text (default: 0.5)")

    p = sub.add_parser(
        "convert", help="convert a checkpoint: BLIP .pth or transformers -> ours, or ours -> transformers"
    )
    p.add_argument("--input", required=True, metavar="PATH", help="checkpoint to read (any supported layout)")
    p.add_argument("--output", required=True, metavar="DIR", help="directory to write")
    p.add_argument(
        "--to",
        choices=["capfilt", "transformers"],
        default="capfilt",
        help="output layout (default: capfilt)",
    )
    p.add_argument(
        "--kind",
        choices=["captioning", "retrieval"],
        default=None,
        help="transformers class to export (default: by role; required for a pre-trained MED)",
    )
    p.add_argument(
        "--image-size",
        type=positive_int,
        default=None,
        help="resize position embeddings to this resolution (e.g. 384 for fine-tuning)",
    )
    _add_pth_args(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    console = Console(stderr=True)
    try:
        return int(COMMANDS[args.command](args) or 0)
    except CapfiltError as err:  # includes CheckpointError via _user_errors
        console.print(f"[red]error:[/red] {err}", highlight=False, soft_wrap=True)
        return EXIT_USAGE
    except KeyboardInterrupt as err:
        console.print(str(err) or "interrupted", highlight=False, soft_wrap=True)
        return 130
    except BrokenPipeError:  # `capfilt ... | head`: the reader has what it wanted
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 1


@contextlib.contextmanager
def stdout_to_stderr() -> Any:
    """Send what is printed on stdout to stderr while a command's work runs: stdout carries the
    command's result (JSON), and Ray's driver prints its raylet and worker messages (out-of-memory
    retries, task errors) on stdout. The work shuts Ray down before the result is printed."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _load(path: str, device: str, **kwargs: Any):  # -> Checkpoint
    from capfilt.model.checkpoint import CheckpointError, load_checkpoint

    try:
        return load_checkpoint(path, device=device, **kwargs)
    except CheckpointError as err:
        raise CapfiltError(str(err)) from err


def _load_model(args: argparse.Namespace):  # -> Checkpoint
    """--model with the `.pth` options, on --device."""
    _check_device(args.device)
    overrides = {k: v for k, v in (("vision_heads", args.vision_heads), ("text_heads", args.text_heads)) if v}
    return _load(args.model, args.device, tokenizer=args.tokenizer, overrides=overrides)


def _check_device(device: str) -> None:
    """CapfiltError for a --device torch cannot name or this machine does not have."""
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError) as err:
        raise CapfiltError(f"--device {device!r}: {err}; use cpu, cuda or cuda:N") from err
    if kind == "cuda" and not torch.cuda.is_available():
        raise CapfiltError(f"--device {device}: no CUDA GPU is visible here; use --device cpu")


def _images(paths: Sequence[str]) -> list:
    from .images import open_image

    return [open_image(p) for p in paths]  # ImageError (a CapfiltError) names the bad file


def _require(ckpt: Any, task: str, path: str) -> None:
    from capfilt.model.checkpoint import CheckpointError

    try:
        ckpt.require(task, path)
    except CheckpointError as err:
        raise CapfiltError(str(err)) from err


def cmd_caption(args: argparse.Namespace) -> int:
    from capfilt.model.generate import GenerationConfig

    from .inference import Captioner

    rep = (
        args.repetition_penalty
        if args.repetition_penalty is not None
        else (1.1 if args.method == "nucleus" else 1.0)
    )
    gen = GenerationConfig(
        method=args.method,
        num_captions=args.num_captions,
        num_beams=args.num_beams,
        top_p=args.top_p,
        top_k=args.top_k,
        temperature=args.temperature,
        repetition_penalty=rep,
        max_tokens=args.max_tokens,
        min_tokens=args.min_tokens,
        seed=args.seed,
    )
    try:
        gen.validate()
    except ValueError as err:
        raise CapfiltError(f"invalid caption options: {err}") from err
    images = _images(args.images)  # all decoded before the model loads: fail fast on a bad file
    ckpt = _load_model(args)
    _require(ckpt, "caption", args.model)
    captioner = Captioner(ckpt, device=args.device, batch_size=args.batch_size, generation=gen)
    try:
        captions = captioner.caption(images)
    except ValueError as err:  # options this checkpoint cannot take (max tokens beyond its positions)
        raise CapfiltError(f"invalid caption options for {args.model}: {err}") from err
    results = [{"image": path, "captions": caps} for path, caps in zip(args.images, captions)]
    if args.json:
        print(json.dumps({"results": results}, ensure_ascii=False))
    else:
        for r in results:
            for c in r["captions"]:
                print(f"{r['image']}\t{c}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from .inference import Filter

    image = _images([args.image])[0]
    ckpt = _load_model(args)
    _require(ckpt, "score", args.model)
    scores = Filter(ckpt, device=args.device, batch_size=args.batch_size, clean_text=not args.raw_text).score(
        [image], [args.text]
    )[0]
    rows = [{"text": s.text, "itm": s.itm, "itc": s.itc} for s in scores]
    if args.json:
        print(json.dumps({"image": args.image, "scores": rows}, ensure_ascii=False))
    else:
        for r in rows:
            print(f"itm={r['itm']:.4f}\titc={r['itc']:+.4f}\t{r['text']}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from capfilt.model.checkpoint import CheckpointError, export_transformers, save_checkpoint

    overrides = {k: v for k, v in (("vision_heads", args.vision_heads), ("text_heads", args.text_heads)) if v}
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise CapfiltError(f"--output {out} is a file; give a directory")
    ckpt = _load(args.input, "cpu", tokenizer=args.tokenizer, image_size=args.image_size, overrides=overrides)
    if out.exists() and any(out.iterdir()) and (out / "config.json").exists():
        raise CapfiltError(f"{out} already holds a checkpoint; choose an empty output directory")
    try:
        if args.to == "transformers":
            export_transformers(ckpt, out, args.kind)
        else:
            ckpt.provenance = {**ckpt.provenance, "converted_from": str(args.input)}
            save_checkpoint(ckpt, out)
    except CheckpointError as err:
        raise CapfiltError(str(err)) from err
    except OSError as err:  # under a file, on a read-only or virtual filesystem, no space...
        raise CapfiltError(
            f"--output {out}: cannot write the checkpoint there ({err.strerror or err})"
        ) from err
    print(
        json.dumps(
            {"output": str(out), "format": args.to, "role": ckpt.role, "source_format": ckpt.source_format}
        )
    )
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from capfilt.progress import progress_bar
    from capfilt.world import synthesize

    with progress_bar() as bar:
        tasks: dict[str, Any] = {}

        def progress(split: str, done: int, total: int) -> None:
            if split not in tasks:
                tasks[split] = bar.add_task(f"writing {split}", total=total)
            bar.update(tasks[split], completed=done)

        out = Path(args.out)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CapfiltError(f"--out {out}: cannot create it ({err.strerror or err})") from err
        summary = synthesize(
            out,
            web=args.web,
            human=args.human,
            test=args.test,
            noise=args.noise,
            seed=args.seed,
            image_size=args.image_size,
            shard_size=args.shard_size,
            labelled=args.labelled,
            progress=progress,
        )
    print(
        json.dumps(
            {
                "out": str(summary.out),
                "counts": summary.counts,
                "noise": summary.noise_counts,
                "truth": str(summary.truth),
            }
        )
    )
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    from capfilt.pipelines.clean_cli import run_clean

    with stdout_to_stderr():
        summary = run_clean(args)
    print(json.dumps(summary))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from capfilt.pipelines.demo_cli import run_demo_cli

    return run_demo_cli(args)


def cmd_ingest(args: argparse.Namespace) -> int:
    from capfilt.pipelines.ingest_cli import run_ingest

    return run_ingest(args)


def cmd_serve(args: argparse.Namespace) -> int:
    from capfilt.services.serve_cli import run_serve

    return run_serve(args)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.bench_command == "throughput":
        from capfilt.pipelines.bench_cli import run_bench_throughput_cli

        return run_bench_throughput_cli(args)
    from capfilt.services.bench_cli import run_bench_serve

    return run_bench_serve(args)


def cmd_train(args: argparse.Namespace) -> int:
    from capfilt.model.checkpoint import CheckpointError
    from capfilt.pipelines.train_cli import run_train

    try:
        with stdout_to_stderr():
            summary = run_train(args)
    except CheckpointError as err:  # an --init or --vit-init that cannot be loaded
        raise CapfiltError(str(err)) from err
    print(json.dumps(summary, allow_nan=False))
    return 0


def _add_vit_init_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--vit-steps",
        type=int,
        default=2000,
        help="steps of the image encoder's supervised init on the world's labelled/ split (BLIP's "
        "ImageNet stage); 0: the image encoder starts from scratch (default: 2000)",
    )
    p.add_argument(
        "--vit-stem",
        choices=("patch", "conv"),
        default="conv",
        help="the image encoder's stem: conv learns object shape on this world; patch is BLIP's and "
        "exports to transformers (default: conv)",
    )


def _add_gpu_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--gpu",
        dest="use_gpu",
        action="store_true",
        help="train, caption, score and evaluate on this machine's CUDA device (default: CPU); with "
        "--workers N, one GPU per Ray Train worker",
    )


def _bootstrap_config(args: argparse.Namespace) -> Any:  # -> BootstrapConfig
    from capfilt.pipelines.bootstrap import BootstrapConfig

    shared = (
        "data",
        "out",
        "size",
        "pretrain_epochs",
        "finetune_epochs",
        "batch_size",
        "workers",
        "num_captions",
        "max_steps",
        "vit_steps",
        "vit_stem",
        "use_gpu",
    )
    own = ("seed", "threshold", "variant")  # bootstrap only; the ablation sets them per row
    return BootstrapConfig(**{k: getattr(args, k) for k in (*shared, *own) if hasattr(args, k)})


def _with_stage_bar(label: str, total: int, run: Any) -> Any:
    """Run `run(progress)` under a transient progress bar of named stages on stderr."""
    from capfilt.progress import progress_bar

    with progress_bar() as bar, stdout_to_stderr():
        task = bar.add_task(label, total=total)

        def progress(stage: str, done: int, _total: int) -> None:
            bar.update(task, completed=done, description=f"{label}: {stage}")

        return run(progress)


def cmd_bootstrap(args: argparse.Namespace) -> int:
    from capfilt.pipelines.bootstrap import run_bootstrap

    cfg = _bootstrap_config(args)
    summary = _with_stage_bar("bootstrap", 7, lambda progress: run_bootstrap(cfg, progress))
    Console(stderr=True).print(Path(args.out, "summary.md").read_text(), highlight=False)
    print(
        json.dumps(
            {"out": args.out, "wall_seconds": summary["wall_seconds"], "stages": summary["stage_seconds"]}
        )
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from capfilt.pipelines import evaluate

    if args.eval_command == "ablation":
        return _ablation(args)
    try:
        if args.eval_command == "retrieval":
            result = evaluate.eval_retrieval(args.model, args.data, k=args.k)
        elif args.eval_command == "caption":
            result = evaluate.eval_caption(args.model, args.data, args.truth, args.method, args.seed)
        else:
            if not 0.0 <= args.threshold <= 1.0:
                raise CapfiltError(f"--threshold is a probability in [0, 1]; got {args.threshold}")
            result = evaluate.eval_filter(args.model, args.data, args.truth, args.threshold)
            Console(stderr=True).print(result["markdown"], highlight=False)
    except ValueError as err:  # "retrieval needs images and texts; got 0 images", "no captions to score"
        if isinstance(err, CapfiltError):
            raise
        raise CapfiltError(f"eval {args.eval_command} on {' '.join(args.data)}: {err}") from err
    print(evaluate.dump(result))
    return 0


def _ablation(args: argparse.Namespace) -> int:
    from capfilt.pipelines.bootstrap import run_ablation

    cfg, seeds, variants = _bootstrap_config(args), list(args.seeds), tuple(args.variants)
    total = len(seeds) * len(variants)
    result = _with_stage_bar("ablation", total, lambda progress: run_ablation(cfg, seeds, variants, progress))
    Console(stderr=True).print(Path(args.out, "ablation.md").read_text(), highlight=False)
    print(json.dumps({"out": args.out, "table": result["table"]}, allow_nan=False))
    return 0


COMMANDS = {
    "caption": cmd_caption,
    "score": cmd_score,
    "convert": cmd_convert,
    "data": cmd_data,
    "train": cmd_train,
    "demo": cmd_demo,
    "ingest": cmd_ingest,
    "serve": cmd_serve,
    "bench": cmd_bench,
    "bootstrap": cmd_bootstrap,
    "eval": cmd_eval,
    "clean": cmd_clean,
}


if __name__ == "__main__":
    sys.exit(main())
