"""Convert checkpoints between this trainer, Hugging Face and Meta's multi-token-prediction format.

    # ours (any TP x PP x DP, megatron or DeepSpeed backend) -> Hugging Face Llama + mtp_heads.safetensors
    python tools/convert_checkpoint.py --input runs/13b/checkpoints/iter_0025000 --output hf/mtp-13b --to hf
    # Hugging Face Llama (ours or any) -> ours, for continued pretraining or MTP fine-tuning with n heads
    python tools/convert_checkpoint.py --input hf/llama-7b --output ckpt/llama-7b-n4 --to megatron --n-heads 4 \\
        --target-tp 2 --target-pp 2
    # Meta's MTP release (consolidated.pth + params.json) -> ours
    python tools/convert_checkpoint.py --input meta/7B_1T_4 --output ckpt/meta-7b --to megatron
    # ours -> ours at another layout
    python tools/convert_checkpoint.py --input runs/a/checkpoints/iter_0001000 --output ckpt/b --to megatron \\
        --target-tp 4

The source format is detected (``--from`` forces it): a folder with ``metadata.json`` is ours, with
``config.json`` Hugging Face, with ``params.json`` Meta's. Checkpoints written for us are weights only: start a
run from one with ``checkpoint.load=PATH checkpoint.finetune=true`` (they load at any layout; ``--target-tp``
and ``--target-pp`` are checked against the model and recorded in its config). Heads a source lacks start as
copies of head 1, as the paper does when fine-tuning an existing model. Outputs appear under their final name
only when complete. Exit codes: 0 done, 2 bad input (named).

Hugging Face Llama input converts exactly or not at all: head_dim, rope_theta (any float), attention_bias together
with mlp_bias, rope_type default / linear / llama3 (megatron-core's fixed llama3 parameters) are read; other
settings that change the function (hidden_act other than silu, attention_bias != mlp_bias, dynamic / yarn / other
RoPE scaling, partial rotary, quantized weights, tied embeddings without --untie-embeddings) stop with exit 2
naming the key and value (mtp_megatron/convert/hf_config.py lists them). Hugging Face output writes all of these
settings, the tokenizer (tokenizer.json for AutoTokenizer; sentencepiece or byte) and its special ids, and
suppresses the padded vocabulary rows in generation_config.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", category=UserWarning)  # megatron-core's notices about optional kernels

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--to", required=True, choices=["hf", "megatron"])
    parser.add_argument("--from", dest="source", choices=["megatron", "hf", "meta"], default=None,
                        help="default: detected")
    parser.add_argument("--target-tp", type=int, default=1)
    parser.add_argument("--target-pp", type=int, default=1)
    parser.add_argument("--n-heads", type=int, default=None,
                        help="heads of the converted model (Hugging Face input; default: the folder's, or 1)")
    parser.add_argument("--seq-length", type=int, default=4096, help="context length recorded for Meta input")
    parser.add_argument("--untie-embeddings", action="store_true",
                        help="import a Hugging Face Llama with tie_word_embeddings=true: lm_head becomes a copy of "
                             "the embedding and the converted model is untied (refused without this flag)")
    args = parser.parse_args(argv)

    from mtp_megatron.checkpoint.store import CheckpointError
    from mtp_megatron.config import ConfigError
    from mtp_megatron.convert import hf, native
    from mtp_megatron.convert.formats import detect_format, read_any

    try:
        source = args.source or detect_format(args.input)
        if os.path.exists(args.output):
            raise ValueError(f"{args.output} exists; choose a new output folder")
        print(f"[convert] reading {args.input} ({source})", flush=True)
        cfg, dense, tokenizer = read_any(args.input, source, args.n_heads, args.seq_length, args.untie_embeddings)
        print(f"[convert] {sum(t.numel() for t in dense.values()):,} parameters, {cfg.mtp.n_heads} heads, "
              f"{cfg.trunk_num_layers()} trunk layers; writing {args.output} ({args.to})", flush=True)
        if args.to == "hf":
            hf.write_folder(cfg, dense, args.output, tokenizer_model=tokenizer)
        else:
            if tokenizer:
                cfg.tokenizer.model, cfg.tokenizer.type = tokenizer, "sentencepiece"
            elif source != "megatron":
                print("[convert] the input has no tokenizer.model: the checkpoint names no tokenizer; give "
                      "tokenizer.model=... when training from it", flush=True)
            native.write_checkpoint(cfg, dense, args.output, args.target_tp, args.target_pp)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError, ConfigError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"[convert] done: {args.output}", flush=True)
    return 0


if __name__ == "__main__":  # the guard matters: dist_checkpointing's spawned helper re-imports this module
    sys.exit(main())
