"""What one edit case costs: the project's loop against its forward-pass floor and a naive loop.

    python bench/eval_cost.py --config configs/edit/ike.yaml [--config ...] [--cases 12] [--no-generation]
                              [--no-share-prefixes] [--repeat 3]

All three run on the same backbone and cases, one after another in this process:
- floor: the forward passes a case needs, batched: one teacher-forced pass over all its probes (as
  the edited system asks them), plus the pre-edit locality answers once per dataset (and, with
  generation, the greedy answers: read off the teacher-forced pass where it decides them, one
  batched decode of the other probes); the teacher-forced passes share prompt
  prefixes exactly when the loop's do (the backbone's `share_prefixes`, where it supports it), and
  the output says which;
- loop: EditEval under a Lightning Trainer, as `edit.py test` runs it; its edit time is reported
  apart, since the floor cannot include what a method spends learning the edit;
- naive: what research scripts do - deep-copy the model to restore it, recompute the unedited
  model's locality answers for every case, run one full forward per probe (never a shared prefix),
  decode every greedy answer, and fine-tune through the whole model at every step (`FineTune.cache_frozen` off).
`--accelerator gpu` runs all three on the GPU (the backbone's dtype comes from the configs).
The loop's and the naive loop's summaries must agree; the script prints both and the ratios.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import torch

from backbones.prefix_cache import MIN_SAVED_WORK, MIN_SAVING
from core.case import PROBE_KINDS, EditCase
from lightning_modules.case_scoring import reference_outputs, score_cases
from lightning_modules.edit_cli import EditCLI, edit_trainer
from lightning_modules.edit_eval import EditEval
from metrics.protocols import topk_needed
from metrics.scores import ScoreSet

ROOT = Path(__file__).resolve().parent.parent


def build(
    configs: list[str], generation: bool, cases: int, accelerator: str = "cpu"
) -> tuple[EditEval, list[EditCase], object]:
    args = [a for c in configs for a in ("--config", c)]
    args += ["--trainer.accelerator", accelerator]
    args += [
        "--trainer.logger",
        "false",
        "--model.generation",
        str(generation).lower(),
        "--data.limit",
        str(cases),
    ]
    cli = EditCLI(args=args, run=False)
    data = cli.datamodule
    data.setup("test")
    return cli.model, [data.dataset[i] for i in range(len(data.dataset))], data


def floor_seconds(module: EditEval, cases: list[EditCase]) -> float:
    """The passes a case needs, batched: its probes as the edited system asks them, in one pass.

    The edit itself is applied untimed (an in-context editor's probes carry its context, so the
    floor includes that context); the locality references are one batched pass for the dataset.
    """
    vlm, editor, generation = module.backbone, module.editor, module.hparams.generation
    k = max(topk_needed(module.hparams.protocol, kind) for kind in PROBE_KINDS)
    loc = [p for c in cases for p in c.locality_probes()]
    start = time.perf_counter()
    tf = vlm.teacher_forced(loc, all_topk=k)
    if generation:
        vlm.generate(loc, teacher_forced=tf)
    spent = time.perf_counter() - start
    for case in cases:
        with torch.enable_grad():
            handle = editor.apply(vlm, [case])
        probes = handle.prepare(case.all_probes())
        start = time.perf_counter()
        tf = vlm.teacher_forced(probes, all_topk=k)
        if generation:
            vlm.generate(probes, teacher_forced=tf)
        spent += time.perf_counter() - start
        handle.restore()
    return spent


def loop_seconds(module: EditEval, data, accelerator: str = "cpu") -> tuple[float, float, dict[str, float]]:
    trainer = edit_trainer(accelerator=accelerator)
    start = time.perf_counter()
    trainer.test(module, datamodule=data, verbose=False)
    total = time.perf_counter() - start
    return total, module.counters.edit_seconds, module.scores.compute()


def naive_seconds(module: EditEval, cases: list[EditCase]) -> tuple[float, float, dict[str, float]]:
    """Deep copy to restore, locality references recomputed per case, one forward per probe."""
    vlm, editor = module.backbone, module.editor
    protocol, generation = module.hparams.protocol, module.hparams.generation
    scores = ScoreSet(max_hops=module.hparams.max_hops)
    edit_time = 0.0
    chunk, share, reuse = vlm.max_batch_size, vlm.share_prefixes, vlm.reuse_teacher_forced
    frozen_cache = None
    start = time.perf_counter()
    try:
        vlm.max_batch_size = 1  # one forward per probe
        vlm.share_prefixes = False  # and each one whole (a chunk of one shares nothing anyway)
        vlm.reuse_teacher_forced = False  # and every greedy answer decoded
        # Research scripts' fine-tuning runs the whole model at every step; same weights either way.
        frozen_cache = getattr(editor, "cache_frozen", None)
        if frozen_cache is not None:
            editor.cache_frozen = False
        for case in cases:
            saved = copy.deepcopy(vlm.model.state_dict())
            reference = reference_outputs(vlm, [case], protocol, generation)
            t = time.perf_counter()
            with torch.enable_grad():
                handle = editor.apply(vlm, [case])
            edit_time += time.perf_counter() - t
            (record,) = score_cases(
                vlm, [(case, handle)], reference, protocol, generation, vlm.tokenizer.decode
            )
            scores.update_case(record["scores"])
            vlm.model.load_state_dict(saved)
    finally:
        vlm.max_batch_size, vlm.share_prefixes, vlm.reuse_teacher_forced = chunk, share, reuse
        if frozen_cache is not None:
            editor.cache_frozen = frozen_cache
    return time.perf_counter() - start, edit_time, scores.compute()


def same(a: dict[str, float], b: dict[str, float]) -> bool:
    return all((math.isnan(a[k]) and math.isnan(b[k])) or abs(a[k] - b[k]) < 1e-6 for k in a)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", required=True, help="edit config(s), stacked in order")
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--no-generation", action="store_true", help="teacher-forced scores only")
    parser.add_argument("--accelerator", default="cpu", choices=("cpu", "gpu"), help="where all three run")
    parser.add_argument(
        "--no-share-prefixes", action="store_true", help="floor and loop run every probe row whole"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds of floor, loop and naive; each reports its fastest round",
    )
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    module, cases, data = build(args.config, not args.no_generation, args.cases, args.accelerator)
    if args.accelerator == "gpu":
        module.to("cuda")  # floor and naive run outside the Trainer, on the same device
    if args.no_share_prefixes:
        module.backbone.share_prefixes = False
    vlm = module.backbone
    sharing = vlm.share_prefixes and vlm.supports_prefix_cache
    module.editor.setup(module.backbone)
    n = len(cases)
    floor_seconds(module, cases[:1])  # warm-up: first calls pay for thread pools and lazy inits
    floor = math.inf
    loop_total = loop_edit = naive_total = naive_edit = math.inf
    agree = True
    # Rounds interleave the three, so a busy spell on the machine hits each alike; the fastest
    # round of each is the least disturbed measurement of it.
    for _ in range(args.repeat):
        floor = min(floor, floor_seconds(module, cases))
        total, edit, loop_scores = loop_seconds(module, data, args.accelerator)
        if total < loop_total:
            loop_total, loop_edit = total, edit
        if args.accelerator == "gpu":
            module.to("cuda")  # the Trainer hands the module back on the CPU after test
        total, edit, naive_scores = naive_seconds(module, cases)
        if total < naive_total:
            naive_total, naive_edit = total, edit
        agree = agree and same(loop_scores, naive_scores)  # every round gives the same summary
    rounds = f", fastest of {args.repeat} rounds" if args.repeat > 1 else ""
    print(
        f"\nbackbone {module.backbone.describe()['model_class']}, editor {module.editor.name}, {n} cases{rounds}"
    )
    print(
        f"shared prompt prefixes (teacher-forced, floor and loop): {'on' if sharing else 'off'}"
        f" (share_prefixes={vlm.share_prefixes}, supports_prefix_cache={vlm.supports_prefix_cache};"
        f" a chunk is split only where that saves >= {MIN_SAVING:.0%} of its tokens"
        f" and >= {MIN_SAVED_WORK:.0e} saved tokens x width^2)"
    )
    print(f"{'':28}{'s/case':>10}{'eval s/case':>13}")
    floor_name = "floor (batched, sharing on)" if sharing else "floor (batched passes)"
    print(f"{floor_name:28}{floor / n:>10.4f}{floor / n:>13.4f}")
    print(f"{'loop (EditEval)':28}{loop_total / n:>10.4f}{(loop_total - loop_edit) / n:>13.4f}")
    print(f"{'naive loop':28}{naive_total / n:>10.4f}{(naive_total - naive_edit) / n:>13.4f}")
    print(f"edit time per case: loop {loop_edit / n:.4f} s, naive {naive_edit / n:.4f} s")
    print(f"ratio naive / loop (whole case):      {naive_total / loop_total:6.2f}x")
    naive_eval, loop_eval = naive_total - naive_edit, loop_total - loop_edit
    print(f"ratio naive / loop (evaluation only): {naive_eval / loop_eval:6.2f}x")
    print(f"ratio loop / floor (evaluation only): {loop_eval / floor:6.2f}x")
    print(f"summaries identical: {agree}")
    if not agree:
        for key in loop_scores:
            print(f"  {key:14} loop {loop_scores[key]:8.3f}  naive {naive_scores[key]:8.3f}")


if __name__ == "__main__":
    main()
