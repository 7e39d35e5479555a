"""Peak GPU memory and time per method on a LLaVA-1.5-7B-shaped model (random weights, bf16).

    python bench/gpu_memory_7b.py [--cases 4] [--dtype bfloat16] [--out DIR]

The model is built from LLaVA-1.5-7B's configuration (CLIP ViT-L/14 at 336 px, 576 image tokens
per image, a 32-layer 4096-wide Llama) with random weights directly on the GPU, so no download is
needed; the tokenizer is the lab's byte-level one. Each method runs the full case loop (pre-edit
locality answers, edit, every probe scored teacher-forced and by greedy decoding, restore) on the
sample E-VQA cases, and the script prints peak allocated memory above the loaded model.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig

from backbones import LlavaVLM
from backbones.tiny import byte_tokenizer
from datamodules.dataset import load_edit_dataset
from editors import IKE, FineTune
from lightning_modules.case_scoring import reference_outputs, score_cases

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample"


def llava_7b_dir(out: Path) -> Path:
    """Write LLaVA-1.5-7B's config (no weights), a tokenizer and an image processor to `out`."""
    tokenizer = byte_tokenizer(("<image>",))
    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
    )
    text = LlamaConfig(
        vocab_size=32064,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    CLIPImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}
    ).save_pretrained(out)
    return out


def run_method(vlm: LlavaVLM, editor, cases, generation: bool) -> dict[str, float]:
    editor.setup(vlm)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    edit_s = 0.0
    rel = []
    for case in cases:
        reference = reference_outputs(vlm, [case], "strict", generation)
        t = time.perf_counter()
        with torch.enable_grad():
            handle = editor.apply(vlm, [case])
        torch.cuda.synchronize()
        edit_s += time.perf_counter() - t
        (record,) = score_cases(vlm, [(case, handle)], reference, "strict", generation, vlm.tokenizer.decode)
        handle.restore()
        rel.append(record["scores"]["rel"])
    torch.cuda.synchronize()
    n = len(cases)
    return {
        "method": editor.name,
        "s_per_case": (time.perf_counter() - start) / n,
        "edit_s_per_case": edit_s / n,
        "peak_extra_gib": (torch.cuda.max_memory_allocated() - base) / 2**30,
        "peak_total_gib": torch.cuda.max_memory_allocated() / 2**30,
        "rel_mean": sum(rel) / n,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--no-generation", action="store_true")
    # Six 576-token images (k=4) plus byte-level text overrun LLaVA-1.5's 4096 positions.
    parser.add_argument("--ike-k", type=int, default=2, help="IKE demonstrations (each brings an image)")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    assert torch.cuda.is_available(), "this benchmark needs a GPU"
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        vlm = LlavaVLM(pretrained=str(llava_7b_dir(Path(tmp))), random_init=True, dtype=args.dtype)
        vlm.max_batch_size = 16
        torch.cuda.synchronize()
        print(
            f"built {sum(p.numel() for p in vlm.model.parameters()) / 1e9:.2f} B parameters "
            f"in {time.perf_counter() - t:.1f} s on {torch.cuda.get_device_name()}; "
            f"model {torch.cuda.memory_allocated() / 2**30:.1f} GiB ({args.dtype})",
            flush=True,
        )
    images = str(SAMPLE / "images")
    data = load_edit_dataset(str(SAMPLE / "mmedit" / "vqa_eval.json"), images, limit=args.cases)
    cases = [data[i] for i in range(len(data))]
    editors = [
        FineTune(["ffn:-1"], lr=5e-3, steps=10, name="ft_llm"),
        FineTune(["projector"], lr=5e-3, steps=10, name="ft_vis"),
        IKE(
            train_file=str(SAMPLE / "mmedit" / "vqa_train.json"), image_root=images, k=args.ike_k, name="ike"
        ),
    ]
    rows = []
    for editor in editors:
        rows.append(run_method(vlm, editor, cases, not args.no_generation))
        r = rows[-1]
        print(
            f"{r['method']:8} {r['s_per_case']:8.3f} s/case  edit {r['edit_s_per_case']:7.3f} s  "
            f"peak +{r['peak_extra_gib']:6.2f} GiB  (total {r['peak_total_gib']:6.2f} GiB)",
            flush=True,
        )
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_memory_7b.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
