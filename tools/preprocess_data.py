"""Tokenize JSONL files or folders of text/source files into megatron-core .bin/.idx datasets.

Flags and output names follow Megatron-LM's tools/preprocess_data.py, e.g.

    python tools/preprocess_data.py --input data/corpus.jsonl.gz --output-prefix data/corpus \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok/spm.model --append-eod --workers 8

writes data/corpus_text_document.bin and .idx (one dataset per --json-keys key). See mtp_megatron.data.preprocess.
"""

import argparse
import signal
import sys

from mtp_megatron.data.preprocess import TOKENIZER_TYPES, preprocess
from mtp_megatron.data.sources import DataError, add_input_arguments
from mtp_megatron.data.tokenizer import TokenizerError


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_arguments(parser)
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", choices=list(TOKENIZER_TYPES), default="SentencePieceTokenizer",
                       help="default: %(default)s")
    group.add_argument("--tokenizer-model", default=None, help="the sentencepiece .model (not for ByteTokenizer)")
    group.add_argument("--append-eod", action="store_true", help="append the EOD token after each document")
    group = parser.add_argument_group("output")
    group.add_argument("--output-prefix", required=True,
                       help="writes {prefix}_{key}_document.bin/.idx for each JSON key")
    group.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, required=True, help="tokenizing processes")
    group.add_argument("--log-interval", type=int, default=1000,
                       help="redraw the progress line every this many documents (and every second)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # A scheduler's kill (SIGTERM, e.g. scancel) unwinds like Ctrl-C, so the temporary outputs are removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        summary = preprocess(args.input, args.output_prefix, tokenizer_type=args.tokenizer_type,
                             tokenizer_model=args.tokenizer_model, json_keys=args.json_keys,
                             append_eod=args.append_eod, workers=args.workers, on_error=args.on_error,
                             overwrite=args.overwrite, suffixes=args.suffixes, log_interval=args.log_interval)
    except (DataError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
