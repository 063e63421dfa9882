"""Train a sentencepiece BPE tokenizer for code and text (byte fallback, split digits, whitespace kept), e.g.

    python tools/train_tokenizer.py --input data/corpus.jsonl.gz src/ --vocab-size 32000 --model-prefix tok/spm

writes tok/spm.model and tok/spm.vocab, trained on a seeded sample of --sample-bytes of the input.
See mtp_megatron.data.tokenizer_training.
"""

import argparse
import sys

from mtp_megatron.data.sources import DataError, add_input_arguments
from mtp_megatron.data.tokenizer import TokenizerError
from mtp_megatron.data.tokenizer_training import DEFAULT_SAMPLE_BYTES, train_tokenizer


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_arguments(parser)
    group = parser.add_argument_group("model")
    group.add_argument("--vocab-size", type=int, required=True, help="pieces in the model, special ids included")
    group.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    group.add_argument("--sample-bytes", type=int, default=DEFAULT_SAMPLE_BYTES,
                       help="train on a random sample of documents of at most this many bytes (default %(default)s)")
    group.add_argument("--seed", type=int, default=1234, help="seed of the sample (default %(default)s)")
    group.add_argument("--overwrite", action="store_true", help="replace an existing model")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        summary = train_tokenizer(args.input, args.model_prefix, args.vocab_size, sample_bytes=args.sample_bytes,
                                  json_keys=args.json_keys, suffixes=args.suffixes, seed=args.seed,
                                  on_error=args.on_error, overwrite=args.overwrite)
    except (DataError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
